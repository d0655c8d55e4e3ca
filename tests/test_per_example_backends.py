"""`keras_clars.per_example_norms` on every backend.

The brute-force checks of tests/test_per_example.py (which runs them on
TensorFlow, with the TensorFlow-only tests) on JAX and PyTorch: the norms
against one gradient per example, and one CLARS update through `fit`
against the float64 reference. The BatchNorm semantics, the no-op and the
unsupported-layer error run on every backend, TensorFlow included.
tests/test_backends.py runs this file under KERAS_BACKEND=jax and torch,
in one subprocess per backend. The JAX run has two CPU devices, for the
DataParallel test.
"""

import numpy as np
import pytest

import keras

import keras_clars
from keras_clars import CLARS, LARS, _per_example_norms
from numpy_reference import reference_update
from per_example_models import (BATCH, HYPER, LR, NORM_TOLERANCE,
                                WEIGHT_TOLERANCE, bn_model, brute_norms,
                                conv_model, data, loss_fn, small_model)

BACKEND = keras.backend.backend()
not_tensorflow = pytest.mark.skipif(
    BACKEND == "tensorflow", reason="TensorFlow: tests/test_per_example.py")


def per_example_gradients(model, x, y):
    """The gradient of each example's loss alone, by the backend's autodiff
    (JAX: vectorized over the examples, one compilation)."""
    trainable = [v.value for v in model.trainable_variables]
    others = [v.value for v in model.non_trainable_variables]

    def loss(trainable, x, y):
        y_pred, _ = model.stateless_call(trainable, others, x, training=True)
        return loss_fn()(y, y_pred)

    if BACKEND == "jax":
        import jax

        grads = jax.jit(jax.vmap(
            jax.grad(lambda t, x, y: loss(t, x[None], y[None])),
            in_axes=(None, 0, 0)))(trainable, x, y)
        grads = [np.asarray(g, np.float64) for g in grads]
        return [[g[i] for g in grads] for i in range(len(x))]
    import torch

    samples = []
    for i in range(len(x)):
        leaves = [t.detach().clone().requires_grad_(True) for t in trainable]
        grads = torch.autograd.grad(loss(leaves, x[i:i + 1], y[i:i + 1]), leaves)
        samples.append([np.asarray(g.detach().cpu().numpy(), np.float64)
                        for g in grads])
    return samples


def fit_one_update(model, x, y, optimizer=None):
    wrapped = keras_clars.per_example_norms(model)
    wrapped.compile(optimizer=optimizer or CLARS(learning_rate=LR, **HYPER),
                    loss=loss_fn())
    wrapped.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    return wrapped


@not_tensorflow
@pytest.mark.parametrize("form", ["chosen", "gram"])
def test_norms_and_update_match_brute_force_and_reference(form, monkeypatch):
    if form != "chosen":
        monkeypatch.setattr(_per_example_norms, "choose", lambda *args: form)
    x, y = data(BATCH)
    model = conv_model()
    initial = model.get_weights()
    samples = per_example_gradients(model, x, y)
    optimizer = CLARS(learning_rate=LR, **HYPER)
    optimizer._is_layer_adapted = lambda v: True  # the biases' norms too
    fit_one_update(model, x, y, optimizer)
    statistics = optimizer.layer_statistics()
    for variable, norm in zip(model.trainable_variables, brute_norms(samples)):
        np.testing.assert_allclose(statistics[variable.path]["complete_norm"],
                                   norm, err_msg=variable.path, **NORM_TOLERANCE)
    weights, _, _ = reference_update(
        initial, [np.zeros_like(w) for w in initial], samples,
        learning_rate=LR, complete=True, adapted=[True] * len(initial), **HYPER)
    for variable, a, b in zip(model.weights, model.get_weights(), weights):
        np.testing.assert_allclose(a, b, err_msg=variable.path, **WEIGHT_TOLERANCE)


def test_batchnorm_model_trains_with_mean_contribution_norms():
    """With BatchNorm, c_i is example i's contribution to the batch gradient:
    they average to the batch gradient, so N_l > ||g_l|| > 0."""
    x, y = data(BATCH, shape=(8, 8, 2))
    model = bn_model()
    statistics = fit_one_update(model, x, y).optimizer.layer_statistics()
    for layer in (model.layers[1], model.layers[4], model.layers[-1]):
        values = statistics[layer.trainable_weights[0].path]
        assert values["complete_norm"] > values["gradient_norm"] > 0


@pytest.mark.parametrize("make", [
    lambda: LARS(learning_rate=LR, **HYPER),
    lambda: keras.optimizers.SGD(0.1, momentum=0.9),
], ids=["LARS", "SGD"])
def test_wrapper_is_a_no_op_for_lars_and_keras_optimizers(make):
    x, y = data(2 * BATCH)
    plain, base = small_model(), small_model()
    plain.compile(optimizer=make(), loss=loss_fn())
    plain.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    wrapped = keras_clars.per_example_norms(base)
    wrapped.compile(optimizer=make(), loss=loss_fn())
    wrapped.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    for a, b in zip(plain.get_weights(), base.get_weights()):
        np.testing.assert_array_equal(a, b)


@not_tensorflow
def test_unsupported_layer_raises_naming_the_layer():
    model = keras.Sequential([keras.Input((5, 2)), keras.layers.Conv1D(3, 2, name="c1"),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    wrapped = keras_clars.per_example_norms(model)
    wrapped.compile(optimizer=CLARS(), loss=loss_fn())
    with pytest.raises(ValueError, match=r"layer='c1'.*gradient_accumulation"):
        wrapped.fit(np.zeros((4, 5, 2), "float32"), np.zeros(4, "int32"), verbose=0)


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution is JAX's")
def test_data_parallel_gives_one_norm_per_example_of_the_global_batch():
    import jax

    devices = jax.devices("cpu")
    if len(devices) < 2:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=2")
    x, y = data(2 * BATCH)
    model = small_model()
    samples = per_example_gradients(model, x, y)
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=devices[:2]))
    try:
        model = small_model()
        optimizer = CLARS(learning_rate=LR, **HYPER)
        fit_one_update(model, x, y, optimizer)
    finally:
        keras.distribution.set_distribution(None)
    statistics = optimizer.layer_statistics()
    for variable, norm in zip(model.trainable_variables, brute_norms(samples)):
        if len(variable.shape) > 1:
            np.testing.assert_allclose(
                statistics[variable.path]["complete_norm"], norm,
                err_msg=variable.path, **NORM_TOLERANCE)
