"""PyTorch side of `keras_clars.per_example_norms` (private).

Keras's PyTorch trainer runs eagerly. The forward pass runs through the
`Recorder`, which keeps each target layer's input A and a tensor E with
dL/dE = D = dL/dZ (requiring grad), and one `torch.autograd.grad` gives
dL/dW for the variables and D for the recorded E in a single backward
pass.
"""

import torch
from keras.src import tree
import keras

from keras_clars import _per_example_norms as norms_lib
from keras_clars.layerwise import apply_with_sample_norms


def _requiring_grad(index, e):
    # E = stop_gradient(Z) (a non-linear activation) is a leaf without grad.
    return e if e.requires_grad else e.requires_grad_()


def train_step(model, data, targets):
    """Keras's PyTorch train step, plus the per-example norms."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    examples = next(i for i in tree.flatten(x) if i is not None).shape[0]
    optimizer = model.optimizer
    recorder = norms_lib.Recorder(targets.layers, end=_requiring_grad)
    with model.recording(recorder):
        if model._call_has_training_arg:
            y_pred = model(x, training=True)
        else:
            y_pred = model(x)
    model.zero_grad()
    loss = model._compute_loss(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
    model._loss_tracker.update_state(
        loss, sample_weight=examples)
    loss = optimizer.scale_loss(loss)
    records = recorder.records()
    variables = model.trainable_weights[:]
    outputs = torch.autograd.grad(
        loss, [v.value for v in variables] + [e for _, e in records],
        allow_unused=True)
    grads, ds = outputs[:len(variables)], outputs[len(variables):]
    with torch.no_grad():
        samples = norms_lib.samples(
            targets, [(a.detach(), d) for (a, _), d in zip(records, ds)], grads, examples)
        apply_with_sample_norms(optimizer, list(grads), variables, **samples)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
