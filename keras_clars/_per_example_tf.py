"""TensorFlow side of `keras_clars.per_example_norms` (private).

The maths is backend-free (`_per_example_norms`). What is TensorFlow's is
how D = dL/dZ is obtained: the training forward pass runs through the
`Recorder`, which keeps each target layer's input A and a tensor E with
dL/dE = D (watched by the tape), and the one `GradientTape` then gives
dL/dW for the variables and D for the recorded E in a single backward
pass. Under tf.distribute each replica computes its own examples' norms,
and `layerwise.apply_with_sample_norms` hands them to CLARS.
"""

import keras
import tensorflow as tf

from keras_clars import _per_example_norms as norms_lib
from keras_clars.layerwise import apply_with_sample_norms


def _watched(tape):
    def end(index, e):
        tape.watch(e)
        return e

    return end


def train_step(model, data, targets):
    """Keras's TensorFlow train step, plus the per-example norms."""
    from keras.src import tree
    from keras.src.losses import loss as loss_module

    optimizer = model.optimizer
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    examples = tf.shape(next(i for i in tree.flatten(x) if i is not None))[0]
    with tf.GradientTape() as tape:
        recorder = norms_lib.Recorder(targets.layers, end=_watched(tape))
        with model.recording(recorder):
            if model._call_has_training_arg:
                y_pred = model(x, training=True)
            else:
                y_pred = model(x)
        loss = model._compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
        )
        model._loss_tracker.update_state(
            loss_module.unscale_loss_for_distribution(loss),
            sample_weight=examples,
        )
        loss = optimizer.scale_loss(loss)
    records = recorder.records()
    variables = model.trainable_weights
    outputs = tape.gradient(loss, list(variables) + [e for _, e in records])
    grads, ds = outputs[: len(variables)], outputs[len(variables):]
    samples = norms_lib.samples(
        targets, [(a, d) for (a, _), d in zip(records, ds)], grads, examples)
    apply_with_sample_norms(optimizer, grads, variables, **samples)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
