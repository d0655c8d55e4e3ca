"""The gradient noise scale (`noise_scale=True`) against a float64 reference.

The reference takes explicit per-example gradients (one tape per example),
forms the update's S samples of b examples, and computes per layer
m2 = mean_s ||g_s||^2, G2 = ||mean_s g_s||^2 and McCandlish et al.'s
unbiased estimates in float64 NumPy. One update, so the weights the samples
were taken at are the model's initial ones.
"""

import warnings

import numpy as np
import pytest

import keras
import keras_clars
from keras_clars import _noise_scale
import per_example_models as models
from numpy_reference import noise_reference as reference, slices

N = 32  # examples in the update
TOLERANCE = dict(rtol=2e-4, atol=1e-7)


def per_example_gradients(model, x, y):
    """float64 [examples][layers] gradients of each example's loss."""
    import tensorflow as tf

    loss_fn = models.loss_fn()
    out = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = loss_fn(y[i:i + 1], model(x[i:i + 1], training=True))
        out.append([np.asarray(g, np.float64) for g in
                    tape.gradient(loss, model.trainable_variables)])
    return out


def check(optimizer, model, expected):
    stats = optimizer.layer_statistics()
    paths = [v.path for v in model.trainable_variables]
    got = np.array([[stats[p][k] for k in (
        "mean_squared_sample_norm", "gradient_norm", "samples", "sample_size",
        "squared_gradient_estimate", "trace_covariance_estimate")] for p in paths])
    got[:, 1] = got[:, 1] ** 2
    np.testing.assert_allclose(got, expected, **TOLERANCE)
    # One update: the averages are (1 - decay) times the estimates, and
    # B_simple is the ratio of their sums.
    # A |G|^2 whose sum is not positive gives no value (one noisy update).
    summary = optimizer.gradient_noise_scale()
    assert summary["updates"] == 1
    if expected[:, 4].sum() > 0:
        np.testing.assert_allclose(
            summary["b_simple"], expected[:, 5].sum() / expected[:, 4].sum(), rtol=2e-4)
    else:
        assert summary["b_simple"] is None
    return summary["b_simple"]


def fit(model, optimizer, x, y, batch_size):
    model.compile(optimizer=optimizer, loss=models.loss_fn())
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)


@pytest.mark.parametrize("b", [4, 16])
def test_slices_by_accumulation_equal_the_reference(b):
    x, y = models.data(N)
    model = models.small_model()
    expected = reference(slices(per_example_gradients(model, x, y), b), b)
    optimizer = keras_clars.CLARS(0.1, trust_coefficient=0.02, noise_scale=True,
                                  sample_size=b, gradient_accumulation_steps=N // b)
    fit(model, optimizer, x, y, b)
    check(optimizer, model, expected)


@pytest.mark.parametrize("method", ["CLARS", "SGD"])
def test_per_example_samples_equal_the_reference(method):
    """b = 1, S = N, for CLARS and momentum SGD (LARS with every variable
    excluded from adaptation, as the recipes' SGD: per-example norms for
    the noise scale alone). One label for
    all: a mean gradient large enough for a positive |G|^2 (a value)."""
    x, y = models.data(N)
    y = np.zeros_like(y)
    model = models.small_model()
    expected = reference(per_example_gradients(model, x, y), 1)
    optimizer = getattr(keras_clars, "LARS" if method == "SGD" else method)(
        0.1, trust_coefficient=0.02, noise_scale=True)
    if method == "SGD":
        optimizer.exclude_from_layer_adaptation(var_names=["/"])
    fit(keras_clars.per_example_norms(model), optimizer, x, y, N)
    assert check(optimizer, model, expected) > 0


def test_mixed_float16_per_example_within_its_tolerance():
    x, y = models.data(N)
    expected = reference(per_example_gradients(models.small_model(), x, y), 1)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = models.small_model()
        optimizer = keras_clars.CLARS(0.1, trust_coefficient=0.02, noise_scale=True)
        wrapped = keras_clars.per_example_norms(model)
        fit(wrapped, optimizer, x, y, N)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert isinstance(wrapped.optimizer, keras.optimizers.LossScaleOptimizer)
    stats = optimizer.layer_statistics()
    got = np.array([stats[v.path]["mean_squared_sample_norm"]
                    for v in model.trainable_variables])
    np.testing.assert_allclose(got, expected[:, 0], rtol=2e-2)
    # The loss scale (2**15 at the first step) is undone: far from scaled.
    assert np.all(got < 10 * expected[:, 0])


def test_one_sample_warns_and_gives_no_value():
    x, y = models.data(N)
    model = models.small_model()
    optimizer = keras_clars.LARS(0.1, noise_scale=True, sample_size=N)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model, optimizer, x, y, N)
    assert any("needs S >= 2 samples" in str(w.message) and "per_example_norms"
               in str(w.message) for w in caught)
    summary = optimizer.gradient_noise_scale()
    assert summary["b_simple"] is None and summary["updates"] == 0
    stats = optimizer.layer_statistics()
    assert all(s["b_simple"] is None and s["trace_covariance_estimate"] is None
               for s in stats.values())


def test_micro_batch_samples_need_their_size():
    x, y = models.data(N)
    model = models.small_model()
    optimizer = keras_clars.CLARS(0.1, noise_scale=True, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="sample_size must be the examples"):
        fit(model, optimizer, x, y, N // 2)


def test_off_adds_no_variable_and_bad_values_raise():
    model = models.small_model()
    off = keras_clars.CLARS()
    off.build(model.trainable_variables)
    assert not any("noise" in v.path for v in off.variables)
    with pytest.raises(ValueError, match="noise_scale=True"):
        off.gradient_noise_scale()
    for kwargs, name in ((dict(noise_scale=1), "noise_scale"),
                         (dict(noise_scale_decay=1.0), "noise_scale_decay"),
                         (dict(sample_size=0), "sample_size")):
        with pytest.raises(ValueError, match=f"{name} must be .*received {name}="):
            keras_clars.CLARS(**kwargs)
    config = keras_clars.CLARS(noise_scale=True, noise_scale_decay=0.9,
                               sample_size=8).get_config()
    again = keras_clars.CLARS.from_config(config)
    assert (again.noise_scale, again.noise_scale_decay, again.sample_size) == (True, 0.9, 8)


# ------------------------------------------------------------- statistics


def _linear_regression(b, stated_b, updates=300, steps=8, d=10, seed=0):
    """Known noise: x ~ N(0, I_d), y = x . w* + e with e ~ N(0, 1), the
    weights held at w* + delta (learning rate 0) with |delta| = 1. For the
    squared error, per example g = 2 r x with r = x . delta - e, so
    G = 2 delta and Sigma = 4 ((|delta|^2 + 1) I + delta delta^T), and
    B_noise = tr(Sigma) / |G|^2 = d (|delta|^2 + 1) + |delta|^2 = 2 d + 1."""
    rng = np.random.default_rng(seed)
    w_star = rng.normal(size=(d, 1))
    delta = rng.normal(size=(d, 1))
    delta /= np.linalg.norm(delta)
    count = updates * steps * b
    x = rng.normal(size=(count, d)).astype("float32")
    y = (x @ w_star + rng.normal(size=(count, 1))).astype("float32")
    model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(1, use_bias=False)])
    model.set_weights([(w_star + delta).astype("float32")])
    optimizer = keras_clars.LARS(0.0, noise_scale=True, noise_scale_decay=0.99,
                                 sample_size=stated_b, gradient_accumulation_steps=steps)
    model.compile(optimizer=optimizer, loss="mse", steps_per_execution=steps * 25)
    model.fit(x, y, batch_size=b, epochs=1, shuffle=False, verbose=0)
    return optimizer.gradient_noise_scale()["b_simple"], 2 * d + 1


def test_recovers_a_known_noise_scale_and_fails_when_b_is_misstated():
    estimate, truth = _linear_regression(b=16, stated_b=16)
    assert abs(estimate / truth - 1) < 0.10, (estimate, truth)
    wrong, _ = _linear_regression(b=16, stated_b=32)
    assert abs(wrong / truth - 1) > 0.5, (wrong, truth)


def test_summary_never_reports_a_non_value():
    stats = np.zeros((2, len(_noise_scale.NOISE_STATISTICS)))
    assert _noise_scale.summary(stats, 0, 0.9)["b_simple"] is None
    stats[:, _noise_scale.G2_AVERAGE] = [-1.0, 0.5]  # sum not positive
    stats[:, _noise_scale.TRACE_AVERAGE] = [3.0, 1.0]
    out = _noise_scale.summary(stats, 3, 0.9, {"a": [0], "b": [1]})
    assert out["b_simple"] is None and out["blocks"] == {"a": None, "b": 2.0}


# ------------------------------------------------------------ the logger


def test_logger_writes_b_simple_to_json_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator
    import tensorflow as tf

    from keras_clars.callbacks import LayerStatisticsLogger, load_layer_statistics

    x, y = models.data(4 * N)
    y = np.zeros_like(y)  # a strong mean gradient: B_simple has a value
    model = models.small_model()
    optimizer = keras_clars.CLARS(0.1, trust_coefficient=0.02, noise_scale=True)
    logger = LayerStatisticsLogger(interval=2, log_dir=str(tmp_path / "tb"),
                                   json_path=str(tmp_path / "stats.json"))
    wrapped = keras_clars.per_example_norms(model)
    wrapped.compile(optimizer=optimizer, loss=models.loss_fn())
    wrapped.fit(x, y, batch_size=N, epochs=1, shuffle=False, verbose=0,
                callbacks=[logger])
    data = load_layer_statistics(str(tmp_path / "stats.json"))
    assert "mean_squared_sample_norm" in data["statistics"]
    last = logger.records[-1]
    final = optimizer.gradient_noise_scale()
    assert last["update"] == 4 and last["b_simple"] == final["b_simple"] > 0
    # Blocks: one per layer here (conv2d, depthwise_conv2d, dense), each
    # the ratio of its variables' summed averages.
    stats = optimizer.layer_statistics()
    assert len(last["b_simple_blocks"]) == 3
    for block, value in last["b_simple_blocks"].items():
        rows = [v for path, v in stats.items() if path.startswith(block + "/")]
        assert len(rows) == 2  # kernel and bias
        expected = (sum(v["trace_covariance_average"] for v in rows)
                    / sum(v["squared_gradient_average"] for v in rows))
        np.testing.assert_allclose(value, expected, rtol=1e-5)
    events = event_accumulator.EventAccumulator(
        str(tmp_path / "tb"), size_guidance={event_accumulator.TENSORS: 0})
    events.Reload()
    logged = {e.step: float(tf.make_ndarray(e.tensor_proto))
              for e in events.Tensors("noise_scale/b_simple")}
    assert sorted(logged) == [1, 2, 4] and logged[4] == np.float32(final["b_simple"])
    assert {f"noise_scale/blocks/{b}" for b in last["b_simple_blocks"]} <= set(
        events.Tags()["tensors"])
