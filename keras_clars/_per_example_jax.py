"""JAX side of `keras_clars.per_example_norms` (private).

Keras's JAX trainer is stateless: it differentiates
`compute_loss_and_updates` with `jax.value_and_grad`. D = dL/dZ comes from
the same backward pass through a zero tap per target layer, E' = E + p
with p = 0 on the `Recorder`'s E (dL/dE = D), differentiated alongside
the trainable variables (dL/dp = D).
The taps' shapes come from one abstract evaluation (`jax.eval_shape`) of
the forward pass, at trace time only.

Under a `keras.distribution.DataParallel` distribution the step is one
program over the global batch (sharded by XLA), so the norms are one per
example of the global batch, as on one device.
"""

import jax
from keras.src import tree
from keras import StatelessScope
import keras

from keras_clars import _per_example_norms as norms_lib
from keras_clars.layerwise import apply_with_sample_norms


def train_step(model, state, data, targets):
    """Keras's JAX train step, plus the per-example norms."""
    trainable, non_trainable, optimizer_variables, metrics_variables = state
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    optimizer = model.optimizer

    def loss_and_records(trainable, taps):
        end = None if taps is None else (lambda index, e: e + taps[index])
        recorder = norms_lib.Recorder(targets.layers, end)
        with model.recording(recorder):
            loss, aux = model.compute_loss_and_updates(
                trainable, non_trainable, metrics_variables, x, y,
                sample_weight, training=True,
                optimizer_variables=optimizer_variables)
        return loss, (aux, recorder.records())

    shapes = jax.eval_shape(lambda t: loss_and_records(t, None)[1][1], trainable)
    taps = [jax.numpy.zeros(e.shape, e.dtype) for _, e in shapes]
    (_, (aux, records)), (grads, ds) = jax.value_and_grad(
        loss_and_records, argnums=(0, 1), has_aux=True)(trainable, taps)
    unscaled_loss, y_pred, non_trainable, metrics_variables = aux

    samples = norms_lib.samples(
        targets, [(a, d) for (a, _), d in zip(records, ds)], grads,
        next(i for i in tree.flatten(x) if i is not None).shape[0])
    # `optimizer.stateless_apply`, with the norms handed over.
    mapping = (list(zip(optimizer._trainable_variables, trainable))
               + list(zip(optimizer.variables, optimizer_variables)))
    with StatelessScope(state_mapping=mapping) as scope:
        apply_with_sample_norms(optimizer, grads, None, **samples)
    trainable = [scope.get_current_value(v)
                 for v in optimizer._trainable_variables]
    optimizer_variables = [scope.get_current_value(v)
                           for v in optimizer.variables]

    logs, metrics_variables = model._update_metrics_variables(
        metrics_variables, unscaled_loss, x, y, y_pred, sample_weight)
    return logs, (trainable, non_trainable, optimizer_variables,
                  metrics_variables)
