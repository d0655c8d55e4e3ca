"""Mixed precision: LossScaleOptimizer + mixed_float16, and mixed_bfloat16."""

import numpy as np
import pytest

import keras
from keras import ops

from keras_clars import CLARS
from numpy_reference import reference_update


@pytest.fixture
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    try:
        yield request.param
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _conv_model():
    return keras.Sequential([
        keras.Input((12, 12, 3)),
        keras.layers.Conv2D(8, 3, padding="same"),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Conv2D(8, 3, strides=2),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
        # Logits back in float32, as the Keras mixed-precision guide says.
        keras.layers.Activation("linear", dtype="float32"),
    ])


@pytest.mark.parametrize("k", [None, 2], ids=["k=1", "k=2"])
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"],
                         indirect=True)
def test_conv_model_trains(policy, k):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 12, 12, 3)).astype(np.float32)
    y = rng.integers(0, 10, size=96)
    model = _conv_model()
    assert model.layers[0].compute_dtype == policy.split("_")[1]
    model.compile(
        optimizer=CLARS(learning_rate=1.0, trust_coefficient=0.02,
                        weight_decay=1e-4, gradient_accumulation_steps=k),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)

    optimizer = model.optimizer
    if policy == "mixed_float16":
        assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        optimizer = optimizer.inner_optimizer
    assert isinstance(optimizer, CLARS)
    # 2 epochs of 6 batches, none skipped (the loss scale does not overflow
    # this model's gradients, and non_finite_updates below is 0).
    assert int(optimizer.iterations) == 12 // (k or 1)
    assert np.all(np.isfinite(history.history["loss"]))
    for weight in model.weights:
        assert np.all(np.isfinite(ops.convert_to_numpy(weight))), weight.path
    statistics = optimizer.layer_statistics()
    assert len(statistics) == len(model.trainable_variables)
    for path, values in statistics.items():
        assert np.all(np.isfinite(list(values.values()))), path
        assert values["gradient_norm"] > 0, path
    assert int(ops.convert_to_numpy(optimizer.non_finite_updates)) == 0

    # One more update, checked against the float64 reference computed from
    # the weights, velocities and gradients themselves (not from the
    # optimizer's own statistics).
    import tensorflow as tf

    variables = model.trainable_variables
    weights = [ops.convert_to_numpy(v).astype(np.float64) for v in variables]
    velocities = [ops.convert_to_numpy(optimizer._velocities[
        optimizer._get_variable_index(v)]).astype(np.float64)
        for v in variables]
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    samples = []
    for start in range(0, 16 * (k or 1), 16):
        with tf.GradientTape() as tape:
            loss = loss_fn(y[start:start + 16],
                           model(x[start:start + 16], training=True))
        grads = tape.gradient(loss, variables)
        samples.append([ops.convert_to_numpy(g) for g in grads])
        optimizer.apply(grads, variables)
    expected, _, expected_statistics = reference_update(
        weights, velocities, samples, learning_rate=1.0, complete=True,
        trust_coefficient=0.02, weight_decay=1e-4)
    for variable, value in zip(variables, expected):
        np.testing.assert_allclose(ops.convert_to_numpy(variable), value,
                                   rtol=1e-5, atol=1e-6, err_msg=variable.path)
    statistics = optimizer.layer_statistics()
    for variable, values in zip(variables, expected_statistics):
        for key, value in values.items():
            assert statistics[variable.path][key] == pytest.approx(
                value, rel=1e-5), (variable.path, key)
    kernel = statistics[model.layers[0].kernel.path]
    assert abs(kernel["trust_ratio"] - 1) > 1e-2  # adapted: not the default 1


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_norms_are_float32_for_half_precision_variables(dtype):
    """||g||^2 = 4e6 overflows float16 (max 65504); in float32 it does not."""
    w = np.full((10, 10), 0.5, np.float32)
    g = np.full((10, 10), 200.0, np.float32)
    variable = keras.Variable(w, dtype=dtype, name="half_kernel")
    optimizer = CLARS(learning_rate=1.0, trust_coefficient=0.1)
    optimizer.apply([ops.convert_to_tensor(g, dtype=dtype)], [variable])
    stats = optimizer.layer_statistics()["half_kernel"]
    assert stats["gradient_norm"] == pytest.approx(2000.0, rel=1e-3)
    assert int(ops.convert_to_numpy(optimizer.non_finite_updates)) == 0
    expected, _, _ = reference_update([w], [np.zeros_like(w)], [[g]],
                                      learning_rate=1.0, complete=True,
                                      trust_coefficient=0.1)
    actual = ops.convert_to_numpy(ops.cast(variable, "float32"))
    np.testing.assert_allclose(actual, expected[0], rtol=1e-2)
    assert not np.array_equal(actual, w)
