"""CLARS and LARS against the float64 NumPy reference of the spec.

Backend-agnostic (keras.ops and NumPy only): tests/test_backends.py runs
this file again under KERAS_BACKEND=jax and KERAS_BACKEND=torch. The TF-only
compilation checks skip on other backends.
"""

import warnings

import numpy as np
import pytest

import keras
from keras import ops

from keras_clars import CLARS, LARS
from keras_clars.schedules import WarmupDecay
from numpy_reference import (STATISTICS, default_masks, reference_run,
                             reference_update)

# Layers of a small network: rank <= 1 ones (bias, BatchNorm gamma) are
# excluded by default; `zero_kernel` starts at zero (trust ratio 1).
SHAPES = {
    "conv_kernel": (3, 3, 2, 4),
    "dense_kernel": (8, 5),
    "dense_bias": (5,),
    "bn_gamma": (4,),
    "zero_kernel": (4, 3),
    "head_kernel": (5, 3),
}
NAMES = list(SHAPES)
# Large enough that every option moves the weights by far more than float32
# rounding, so a wrong option cannot hide under the tolerance.
HYPER = dict(learning_rate=0.5, momentum=0.9, trust_coefficient=0.1)
RTOL = 2e-5
IS_TF = keras.backend.backend() == "tensorflow"


def float64_available():
    """JAX holds float64 only with JAX_ENABLE_X64 (tests/test_backends.py)."""
    if keras.backend.backend() != "jax":
        return True
    import jax

    return bool(jax.config.jax_enable_x64)


def make_problem(micro_steps, seed=0, samples=None):
    """Initial weights and fixed gradients (float32), one set per micro-step.

    With `samples`, each micro-step holds that many per-example gradients.
    """
    rng = np.random.default_rng(seed)
    weights = []
    for name, shape in SHAPES.items():
        if name == "zero_kernel":
            weights.append(np.zeros(shape, np.float32))
        elif name == "bn_gamma":
            weights.append((1 + 0.1 * rng.normal(size=shape)).astype(np.float32))
        else:
            weights.append((0.5 * rng.normal(size=shape)).astype(np.float32))
    scales = rng.uniform(0.05, 0.3, size=len(SHAPES))

    def sample():
        return [(s * rng.normal(size=shape)).astype(np.float32)
                for s, shape in zip(scales, SHAPES.values())]

    if samples is None:
        return weights, [sample() for _ in range(micro_steps)]
    return weights, [[sample() for _ in range(samples)]
                     for _ in range(micro_steps)]


def make_variables(weights):
    return [keras.Variable(w, name=n, dtype=w.dtype)
            for n, w in zip(NAMES, weights)]


def numpy_values(variables):
    return [ops.convert_to_numpy(v) for v in variables]


def velocities(optimizer, variables):
    return numpy_values(
        [optimizer._velocities[optimizer._get_variable_index(v)]
         for v in variables])


def applier(optimizer, variables, eager=False):
    """`optimizer.apply` on `variables`; on JAX, jitted and stateless.

    The JAX form is what Keras's JAX trainer runs (`stateless_apply` under
    `jax.jit`), and compiles once instead of tracing `ops.cond` per call.
    """
    optimizer.build(variables)
    if keras.backend.backend() != "jax" or eager:
        return lambda grads, **kwargs: optimizer.apply(grads, variables,
                                                       **kwargs)
    import jax

    state = list(optimizer.variables)

    def pure(state_values, values, grads, sample_norms):
        mapping = list(zip(variables, values)) + list(zip(state, state_values))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            optimizer.apply(grads, sample_norms=sample_norms)
        return ([scope.get_current_value(v) for v in variables],
                [scope.get_current_value(v) for v in state])

    jitted = jax.jit(pure)

    def apply(grads, sample_norms=None):
        values, state_values = jitted([v.value for v in state],
                                      [v.value for v in variables], grads,
                                      sample_norms)
        for v, x in zip(variables + state, values + state_values):
            v.assign(x)

    return apply


def run_optimizer(optimizer, weights, grads, configure=None, apply=None,
                  eager=False, **apply_kwargs):
    """Applies each micro-step; returns per-micro-step weights, velocities."""
    variables = make_variables(weights)
    if configure is not None:
        configure(optimizer, variables)
    optimizer.build(variables)
    apply = apply or applier(optimizer, variables, eager)
    history = {"weights": [], "velocities": [], "variables": variables}
    for i, g in enumerate(grads):
        kwargs = {k: v[i] for k, v in apply_kwargs.items()}
        apply([ops.convert_to_tensor(x, x.dtype) for x in g], **kwargs)
        history["weights"].append(numpy_values(variables))
        history["velocities"].append(velocities(optimizer, variables))
    return history


def assert_close(actual, expected, rtol=RTOL, what=""):
    """Elementwise, with an absolute floor scaled to the tensor's size."""
    for i, (a, e) in enumerate(zip(actual, expected)):
        e = np.asarray(e, np.float64)
        atol = rtol * max(float(np.max(np.abs(e))), 1e-12)
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol,
                                   err_msg=f"{what} layer {NAMES[i]}")


def assert_matches(history, expected, rtol=RTOL):
    for step, (w, v, ew, ev) in enumerate(zip(
            history["weights"], history["velocities"],
            expected["weights"], expected["velocities"])):
        assert_close(w, ew, rtol, f"weights after micro-step {step}")
        assert_close(v, ev, rtol, f"velocity after micro-step {step}")


def assert_statistics(optimizer, expected, rtol=RTOL):
    stats = optimizer.layer_statistics()
    assert list(stats) == NAMES
    for name, exp in zip(NAMES, expected):
        for key in STATISTICS:
            np.testing.assert_allclose(
                stats[name][key], exp[key], rtol=rtol, atol=1e-7,
                err_msg=f"{key} of {name}")


def micro_steps_for(k):
    return max(6, 2 * (k or 1))


# ------------------------------------------------------------- the update


@pytest.mark.parametrize("weight_decay", [None, 0.05])
@pytest.mark.parametrize("k", [None, 2, 4])
@pytest.mark.parametrize("cls", [CLARS, LARS])
def test_matches_reference(cls, k, weight_decay):
    weights, grads = make_problem(micro_steps_for(k), seed=1)
    optimizer = cls(weight_decay=weight_decay, gradient_accumulation_steps=k,
                    **HYPER)
    history = run_optimizer(optimizer, weights, grads)
    expected = reference_run(weights, grads, steps=k,
                             complete=cls is CLARS,
                             weight_decay=weight_decay, **HYPER)
    assert_matches(history, expected)
    assert_statistics(optimizer, expected["statistics"])
    assert int(optimizer.iterations) == len(grads) // (k or 1)


def test_eager_apply_matches_reference():
    """Op-by-op `apply` (on JAX the other tests run it jitted)."""
    if not IS_TF:
        pytest.skip("eager ops.cond on JAX recompiles per call: too slow")
    weights, grads = make_problem(4, seed=13)
    optimizer = CLARS(weight_decay=0.05, gradient_accumulation_steps=2,
                      **HYPER)
    history = run_optimizer(optimizer, weights, grads, eager=True)
    expected = reference_run(weights, grads, steps=2, complete=True,
                             weight_decay=0.05, **HYPER)
    assert_matches(history, expected)


@pytest.mark.parametrize("k", [None, 2])
@pytest.mark.parametrize("cls", [CLARS, LARS])
def test_nesterov(cls, k):
    weights, grads = make_problem(6, seed=2)
    optimizer = cls(nesterov=True, weight_decay=0.05,
                    gradient_accumulation_steps=k, **HYPER)
    history = run_optimizer(optimizer, weights, grads)
    expected = reference_run(weights, grads, steps=k, complete=cls is CLARS,
                             nesterov=True, weight_decay=0.05, **HYPER)
    assert_matches(history, expected)
    # The check can fail: classic momentum gives other weights.
    classic = reference_run(weights, grads, steps=k, complete=cls is CLARS,
                            weight_decay=0.05, **HYPER)
    assert not np.allclose(history["weights"][-1][0], classic["weights"][-1][0],
                           rtol=1e-3)


def test_complete_norm_differs_from_lars_with_samples():
    """With S = 2 the two optimizers differ, and CLARS's N_l is the larger."""
    weights, grads = make_problem(4, seed=3)
    clars, lars = CLARS(gradient_accumulation_steps=2, **HYPER), LARS(
        gradient_accumulation_steps=2, **HYPER)
    h_clars = run_optimizer(clars, weights, grads)
    h_lars = run_optimizer(lars, weights, grads)
    assert not np.allclose(h_clars["weights"][-1][0], h_lars["weights"][-1][0],
                           rtol=1e-4)
    s_clars, s_lars = clars.layer_statistics(), lars.layer_statistics()
    for name in NAMES:
        assert s_clars[name]["coherence"] < 1.0
        assert s_lars[name]["coherence"] == pytest.approx(1.0, rel=1e-6)
    # From the same weights (the first update), N_l(CLARS) >= N_l(LARS).
    first_c = reference_run(weights, grads[:2], steps=2, complete=True, **HYPER)
    first_l = reference_run(weights, grads[:2], steps=2, complete=False,
                            **HYPER)
    for c, l in zip(first_c["statistics"], first_l["statistics"]):
        assert c["complete_norm"] >= l["complete_norm"]


def test_clars_equals_lars_bit_exactly_with_one_sample():
    weights, grads = make_problem(6, seed=4)
    kwargs = dict(weight_decay=0.05, nesterov=True, **HYPER)
    clars, lars = CLARS(**kwargs), LARS(**kwargs)
    h_clars = run_optimizer(clars, weights, grads)
    h_lars = run_optimizer(lars, weights, grads)
    for key in ("weights", "velocities"):
        for a, b in zip(h_clars[key], h_lars[key]):
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)
    assert clars.layer_statistics() == lars.layer_statistics()


@pytest.mark.parametrize("cls", [CLARS, LARS])
def test_nothing_moves_on_non_update_micro_steps(cls):
    k = 4
    weights, grads = make_problem(2 * k, seed=5)
    optimizer = cls(gradient_accumulation_steps=k, weight_decay=0.05, **HYPER)
    variables = make_variables(weights)
    apply = applier(optimizer, variables)
    for i, g in enumerate(grads):
        if i % k == 0:
            before = (numpy_values(variables), velocities(optimizer, variables),
                      optimizer.layer_statistics())
        apply([ops.convert_to_tensor(x) for x in g])
        now = (numpy_values(variables), velocities(optimizer, variables),
               optimizer.layer_statistics())
        if (i + 1) % k:
            for a, b in zip(now[0] + now[1], before[0] + before[1]):
                np.testing.assert_array_equal(a, b)
            assert now[2] == before[2]
        else:
            assert not np.array_equal(now[0][0], before[0][0])
            assert now[2] != before[2]


# ------------------------------------------------------------- exclusions


def test_exclusions_by_name_and_by_list():
    weights, grads = make_problem(6, seed=6)
    optimizer = CLARS(weight_decay=0.05, gradient_accumulation_steps=2,
                      **HYPER)

    def configure(opt, variables):
        opt.exclude_from_layer_adaptation(var_names=["head"])
        opt.exclude_from_weight_decay(var_list=[variables[0]],
                                      var_names=["dense_kernel"])

    history = run_optimizer(optimizer, weights, grads, configure=configure)
    adapted, decayed = default_masks(
        weights, 0.05, no_adaptation={NAMES.index("head_kernel")},
        no_decay={0, NAMES.index("dense_kernel")})
    expected = reference_run(weights, grads, steps=2, complete=True,
                             weight_decay=0.05, adapted=adapted,
                             decayed=decayed, **HYPER)
    assert_matches(history, expected)
    assert_statistics(optimizer, expected["statistics"])
    assert optimizer.layer_statistics()["head_kernel"]["trust_ratio"] == 1.0
    # The check can fail: without the exclusions the weights differ.
    plain = reference_run(weights, grads, steps=2, complete=True,
                          weight_decay=0.05, **HYPER)
    for i in (0, NAMES.index("dense_kernel"), NAMES.index("head_kernel")):
        assert not np.allclose(history["weights"][-1][i],
                               plain["weights"][-1][i], rtol=1e-4)


@pytest.mark.parametrize("method", ["exclude_from_layer_adaptation",
                                    "exclude_from_weight_decay"])
def test_exclusion_after_build_raises(method):
    optimizer = CLARS(weight_decay=0.05)
    optimizer.build(make_variables(make_problem(1)[0]))
    with pytest.raises(ValueError, match="before the optimizer is built"):
        getattr(optimizer, method)(var_names=["head"])


@pytest.mark.parametrize("cls", [CLARS, LARS])
def test_exclusions_by_name_survive_get_config(cls):
    """from_config(get_config()) keeps both exclusion lists, by name."""
    weights, grads = make_problem(4, seed=6)
    original = cls(weight_decay=0.05, gradient_accumulation_steps=2, **HYPER)
    original.exclude_from_layer_adaptation(var_names=["head"])
    original.exclude_from_weight_decay(var_names=["dense_kernel"])
    config = original.get_config()
    assert config["exclude_from_layer_adaptation"] == ["head"]
    assert config["exclude_from_weight_decay"] == ["dense_kernel"]
    optimizer = cls.from_config(config)
    assert optimizer.get_config() == config
    history = run_optimizer(optimizer, weights, grads)
    adapted, decayed = default_masks(
        weights, 0.05, no_adaptation={NAMES.index("head_kernel")},
        no_decay={NAMES.index("dense_kernel")})
    expected = reference_run(weights, grads, steps=2, complete=cls is CLARS,
                             weight_decay=0.05, adapted=adapted,
                             decayed=decayed, **HYPER)
    assert_matches(history, expected)


def test_zero_norms_give_trust_ratio_one():
    """A zero kernel (||w|| = 0) and a zero gradient (N = 0): ratio 1."""
    weights, grads = make_problem(4, seed=7)
    dense = NAMES.index("dense_kernel")
    for g in grads[:2]:
        g[dense] = np.zeros_like(g[dense])
    optimizer = CLARS(weight_decay=0.05, gradient_accumulation_steps=2,
                      **HYPER)
    variables = make_variables(weights)
    apply = applier(optimizer, variables)
    for g in grads[:2]:
        apply([ops.convert_to_tensor(x) for x in g])
    stats = optimizer.layer_statistics()
    assert stats["zero_kernel"]["trust_ratio"] == 1.0
    assert stats["zero_kernel"]["weight_norm"] == 0.0
    assert stats["dense_kernel"]["trust_ratio"] == 1.0
    assert stats["dense_kernel"]["complete_norm"] == 0.0
    assert stats["dense_kernel"]["coherence"] == 1.0
    expected = reference_run(weights, grads[:2], steps=2, complete=True,
                             weight_decay=0.05, **HYPER)
    assert_close(numpy_values(variables), expected["weights"][-1])
    for g in grads[2:]:
        apply([ops.convert_to_tensor(x) for x in g])
    # The zero kernel moved by the plain step; now it is adapted.
    assert 0 < optimizer.layer_statistics()["zero_kernel"]["trust_ratio"] < 1
    expected = reference_run(weights, grads, steps=2, complete=True,
                             weight_decay=0.05, **HYPER)
    assert_close(numpy_values(variables), expected["weights"][-1])
    for values in optimizer.layer_statistics().values():
        assert all(np.isfinite(list(values.values())))


# ------------------------------------------------------------- schedules


@pytest.mark.parametrize("schedule", [
    keras.optimizers.schedules.PolynomialDecay(
        1.0, decay_steps=4, end_learning_rate=0.05, power=2.0),
    WarmupDecay(1.0, total_steps=5, warmup_steps=2, decay="poly"),
], ids=["PolynomialDecay", "WarmupDecay"])
def test_schedule_is_evaluated_at_the_update_index(schedule):
    k, updates = 2, 5
    weights, grads = make_problem(k * updates, seed=8)
    hyper = dict(HYPER, learning_rate=schedule)
    optimizer = CLARS(gradient_accumulation_steps=k, weight_decay=0.05,
                      **hyper)
    history = run_optimizer(optimizer, weights, grads)
    rate = lambda t: float(ops.convert_to_numpy(schedule(t)))  # noqa: E731
    reference = dict(HYPER, weight_decay=0.05, steps=k, complete=True)
    del reference["learning_rate"]
    expected = reference_run(weights, grads, learning_rate=rate, **reference)
    assert_matches(history, expected)
    assert int(optimizer.iterations) == updates
    assert int(optimizer._iterations) == k * updates
    # The check can fail: Keras core's micro-step index gives other weights.
    micro = reference_run(weights, grads, learning_rate=lambda t: rate(
        k * t + k - 1), **reference)
    assert not np.allclose(history["weights"][-1][0], micro["weights"][-1][0],
                           rtol=1e-4)
    np.testing.assert_allclose(
        float(ops.convert_to_numpy(optimizer.learning_rate)), rate(updates),
        rtol=1e-6)


@pytest.mark.parametrize("k", [None, 2])
@pytest.mark.parametrize("excluded", [
    3.0, WarmupDecay(3.0, total_steps=5, warmup_steps=2, decay="poly"),
], ids=["float", "WarmupDecay"])
@pytest.mark.parametrize("cls", [CLARS, LARS])
def test_excluded_learning_rate_matches_reference(cls, excluded, k):
    """The excluded variables' own rate; the adapted layers' step unmoved."""
    weights, grads = make_problem(micro_steps_for(k), seed=21)
    optimizer = cls(weight_decay=0.05, gradient_accumulation_steps=k,
                    excluded_learning_rate=excluded, **HYPER)
    history = run_optimizer(optimizer, weights, grads)
    rate = excluded if not callable(excluded) else (
        lambda t: float(ops.convert_to_numpy(excluded(t))))
    reference = dict(weights=weights, micro_steps=grads, steps=k,
                     complete=cls is CLARS, weight_decay=0.05, **HYPER)
    expected = reference_run(excluded_learning_rate=rate, **reference)
    assert_matches(history, expected)
    # The check can fail: tied, the bias and gamma move differently, and
    # the adapted kernels exactly as here.
    tied = reference_run(**reference)
    for name in ("dense_bias", "bn_gamma"):
        i = NAMES.index(name)
        assert not np.allclose(history["weights"][-1][i],
                               tied["weights"][-1][i], rtol=1e-3)
    i = NAMES.index("conv_kernel")
    np.testing.assert_array_equal(expected["weights"][-1][i],
                                  tied["weights"][-1][i])


# ------------------------------------------------------- external norms


def test_sample_norms_from_elsewhere():
    """Per-example norms handed to apply(): S = examples x micro-steps."""
    weights, examples = make_problem(4, seed=9, samples=3)
    grads = [[np.mean(layer, axis=0) for layer in zip(*step)]
             for step in examples]
    norms = [[np.mean([np.linalg.norm(e[l]) for e in step])
              for l in range(len(NAMES))] for step in examples]
    optimizer = CLARS(gradient_accumulation_steps=2, **HYPER)
    history = run_optimizer(optimizer, weights, grads, sample_norms=norms)
    expected = reference_run(weights, examples, steps=2, complete=True,
                             **HYPER)
    assert_matches(history, expected)
    assert_statistics(optimizer, expected["statistics"])
    # The per-example norms exceed the micro-batch norms: CLARS sees S = 6.
    own = reference_run(weights, grads, steps=2, complete=True, **HYPER)
    assert not np.allclose(history["weights"][-1][0], own["weights"][-1][0],
                           rtol=1e-4)


def test_sample_norms_rejected_by_lars_and_checked_for_length():
    weights, grads = make_problem(1)
    variables = make_variables(weights)
    with pytest.raises(ValueError, match="only used by CLARS"):
        LARS().apply(grads[0], variables, sample_norms=[1.0] * len(NAMES))
    with pytest.raises(ValueError, match="one norm per trainable variable"):
        CLARS().apply(grads[0], variables, sample_norms=[1.0])


# ------------------------------------------------------------ compilation


@pytest.mark.skipif(not IS_TF, reason="tf.function is TensorFlow only")
@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("cls", [CLARS, LARS])
def test_compiled_apply_matches_reference(cls, jit_compile):
    import tensorflow as tf

    k = 2
    weights, grads = make_problem(6, seed=10)
    optimizer = cls(gradient_accumulation_steps=k, weight_decay=0.05, **HYPER)
    # Built by run_optimizer first; the variables are captured, not passed.
    compiled = tf.function(lambda g: optimizer.apply(g),
                           jit_compile=jit_compile)
    history = run_optimizer(optimizer, weights, grads,
                            apply=compiled)
    expected = reference_run(weights, grads, steps=k, complete=cls is CLARS,
                             weight_decay=0.05, **HYPER)
    assert_matches(history, expected)
    assert_statistics(optimizer, expected["statistics"])


def _linear_model(seed):
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(
            3, kernel_initializer=keras.initializers.RandomNormal(seed=seed),
            bias_initializer=keras.initializers.RandomNormal(seed=seed + 1)),
    ])
    return model


def _mse_gradients(weights, x, y):
    """d/dW, d/db of mean((x W + b - y)^2), as Keras's "mse" loss."""
    kernel, bias = weights
    residual = x @ kernel + bias - y
    scale = 2.0 / residual.size
    return [scale * x.T @ residual, scale * residual.sum(axis=0)]


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("cls", [CLARS, LARS])
def test_fit_matches_reference(cls, jit_compile):
    """model.fit (TF: tf.function / XLA; JAX: stateless_apply; PyTorch:
    eager) with k = 2."""
    if not jit_compile and keras.backend.backend() == "jax":
        pytest.skip("eager JAX fit is slow; the eager apply test covers it")
    if jit_compile and keras.backend.backend() == "torch":
        pytest.skip("torch.compile takes ~20 s per model; eager fit runs")
    k, batch, batches = 2, 8, 6
    rng = np.random.default_rng(11)
    x = rng.normal(size=(batch * batches, 4)).astype(np.float32)
    y = rng.normal(size=(batch * batches, 3)).astype(np.float32)
    model = _linear_model(seed=12)
    weights = [np.asarray(w, np.float64) for w in model.get_weights()]
    optimizer = cls(gradient_accumulation_steps=k, **HYPER)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)

    velocity = [np.zeros_like(w) for w in weights]
    for update in range(batches // k):
        samples = [
            _mse_gradients(weights, x[s * batch:(s + 1) * batch],
                           y[s * batch:(s + 1) * batch])
            for s in range(update * k, (update + 1) * k)
        ]
        weights, velocity, stats = reference_update(
            weights, velocity, samples, complete=cls is CLARS, **HYPER)
    for actual, expected in zip(model.get_weights(), weights):
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
    assert int(optimizer.iterations) == batches // k
    assert optimizer.layer_statistics()[model.weights[0].path][
        "trust_ratio"] == pytest.approx(stats[0]["trust_ratio"], rel=1e-5)


# --------------------------------------------------------------- clipping

CLIPPING = {"clipnorm": 0.05, "clipvalue": 0.02, "global_clipnorm": 0.1}


@pytest.mark.parametrize("clip", sorted(CLIPPING))
def test_clars_equals_lars_with_one_sample_under_clipping(clip):
    """S = 1 (one device, no accumulation): CLARS is LARS, clipped too."""
    weights, grads = make_problem(4, seed=14)
    kwargs = dict(weight_decay=0.05, **{clip: CLIPPING[clip]}, **HYPER)
    h_clars = run_optimizer(CLARS(**kwargs), weights, grads)
    h_lars = run_optimizer(LARS(**kwargs), weights, grads)
    for key in ("weights", "velocities"):
        for a, b in zip(h_clars[key], h_lars[key]):
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)
    expected = reference_run(weights, grads, complete=False, weight_decay=0.05,
                             **{clip: CLIPPING[clip]}, **HYPER)
    assert_matches(h_lars, expected)


@pytest.mark.parametrize("clip", sorted(CLIPPING))
@pytest.mark.parametrize("cls", [CLARS, LARS])
def test_clipping_matches_reference(cls, clip):
    """k = 2: each micro-step's mean gradient is clipped, and CLARS scales
    that micro-step's sample norms by ||clip(g_l)|| / ||g_l||."""
    weights, grads = make_problem(4, seed=15)
    optimizer = cls(gradient_accumulation_steps=2, weight_decay=0.05,
                    **{clip: CLIPPING[clip]}, **HYPER)
    history = run_optimizer(optimizer, weights, grads)
    expected = reference_run(weights, grads, steps=2, complete=cls is CLARS,
                             weight_decay=0.05, **{clip: CLIPPING[clip]},
                             **HYPER)
    assert_matches(history, expected)
    assert_statistics(optimizer, expected["statistics"])
    # The check can fail: unclipped gradients give other weights.
    plain = reference_run(weights, grads, steps=2, complete=cls is CLARS,
                          weight_decay=0.05, **HYPER)
    assert not np.allclose(history["weights"][-1][0], plain["weights"][-1][0],
                           rtol=1e-4)


@pytest.mark.parametrize("k", [None, 2])
@pytest.mark.parametrize("cls", [CLARS, LARS])
def test_inf_gradient_is_skipped_under_clipvalue(cls, k):
    """clipvalue turns inf into a number; the check sees it before."""
    weights, grads = make_problem(4, seed=16)
    grads[1][0][0, 0, 0, 0] = np.inf
    optimizer = cls(gradient_accumulation_steps=k, clipvalue=0.02, **HYPER)
    history = run_optimizer(optimizer, weights, grads)
    assert int(ops.convert_to_numpy(optimizer.non_finite_updates)) == 1
    expected = reference_run(weights, grads, steps=k, complete=cls is CLARS,
                             clipvalue=0.02, **HYPER)
    assert expected["non_finite_updates"] == 1
    assert_matches(history, expected)
    # The poisoned micro-step's update (k = 2: its whole window) moved nothing.
    before = weights if k else history["weights"][0]
    for a, b in zip(history["weights"][1], before):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------- float64 variables


@pytest.mark.parametrize("k", [None, 2])
@pytest.mark.parametrize("cls", [CLARS, LARS])
def test_float64_and_float32_variables_match_reference(cls, k):
    """Norms are float64 for a float64 variable, float32 for the others."""
    if not float64_available():
        pytest.skip("float64 on JAX needs JAX_ENABLE_X64=1")
    weights, grads = make_problem(4, seed=17)
    wide = {NAMES.index("conv_kernel"), NAMES.index("dense_bias")}
    weights = [w.astype(np.float64) if i in wide else w
               for i, w in enumerate(weights)]
    grads = [[g.astype(np.float64) if i in wide else g
              for i, g in enumerate(step)] for step in grads]
    optimizer = cls(gradient_accumulation_steps=k, weight_decay=0.05, **HYPER)
    history = run_optimizer(optimizer, weights, grads)
    expected = reference_run(weights, grads, steps=k, complete=cls is CLARS,
                             weight_decay=0.05, **HYPER)
    assert_matches(history, expected)
    assert_statistics(optimizer, expected["statistics"])
    for i, variable in enumerate(history["variables"]):
        assert str(variable.dtype) == ("float64" if i in wide else "float32")
    # The float64 layers are exact to float64 rounding, not float32's.
    for i in wide:
        np.testing.assert_allclose(history["weights"][-1][i],
                                   expected["weights"][-1][i], rtol=1e-12)


# ------------------------------------------------- one sample warns once


def _single_sample_warnings(record):
    return [w for w in record if "one gradient sample per update"
            in str(w.message)]


def test_one_sample_warns_once_through_fit_and_retraces():
    rng = np.random.default_rng(18)
    x = rng.normal(size=(32, 4)).astype(np.float32)
    y = rng.normal(size=(32, 3)).astype(np.float32)
    model = _linear_model(seed=12)
    optimizer = CLARS(**HYPER)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model.compile(optimizer=optimizer, loss="mse")
        model.fit(x, y, batch_size=8, epochs=2, verbose=0)
        # A new compile traces a new train step: no second warning.
        model.compile(optimizer=optimizer, loss="mse")
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    caught = _single_sample_warnings(record)
    assert len(caught) == 1, [str(w.message) for w in record]
    message = str(caught[0].message)
    for remedy in ("keras_clars.per_example_norms(model)",
                   "gradient_accumulation_steps", "tf.distribute"):
        assert remedy in message
    assert int(optimizer.iterations) == 12


@pytest.mark.parametrize("case", ["accumulation", "sample_norms", "LARS"])
def test_no_one_sample_warning_with_samples_or_for_lars(case):
    weights, grads = make_problem(4, seed=19)
    cls = LARS if case == "LARS" else CLARS
    k = 2 if case == "accumulation" else None
    kwargs = {}
    if case == "sample_norms":
        kwargs["sample_norms"] = [[2.0 * np.linalg.norm(g) for g in step]
                                  for step in grads]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run_optimizer(cls(gradient_accumulation_steps=k, **HYPER), weights,
                      grads, **kwargs)
    assert _single_sample_warnings(record) == []
