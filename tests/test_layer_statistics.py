"""The per-layer statistics of an update against the float64 spec.

tests/test_reference.py checks them on one device for many options; here:
a known update with k > 1 read the way the callback reads it, sample norms
given with R = k = 1 (also through `apply_with_sample_norms`, loss-scaled),
and R = 2 replicas x k = 2 micro-steps under MirroredStrategy, with sample
norms given through a LossScaleOptimizer (in a subprocess: the device count
is fixed at start).
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

from keras_clars import CLARS, LARS, apply_with_sample_norms
from keras_clars.callbacks import read_layer_statistics
from numpy_reference import STATISTICS, reference_run

HYPER = dict(learning_rate=0.5, momentum=0.9, trust_coefficient=0.1, weight_decay=0.05)
SHAPES = {"kernel": (4, 3), "bias": (3,), "head": (3, 2)}


def problem(micro_steps, samples=1, seed=0):
    """Float32 weights and, per micro-step, `samples` gradient samples."""
    rng = np.random.default_rng(seed)
    weights = [rng.normal(size=s).astype("float32") for s in SHAPES.values()]
    # Offsets shared by all samples make them agree partly (0 < rho < 1).
    shared = [rng.normal(size=s) for s in SHAPES.values()]
    steps = [
        [[(m + rng.normal(size=m.shape)).astype("float32") for m in shared]
         for _ in range(samples)]
        for _ in range(micro_steps)
    ]
    return weights, steps


def assert_statistics(actual, expected, rtol=2e-5):
    assert list(actual) == list(SHAPES)
    for name, exp in zip(SHAPES, expected):
        for key in STATISTICS:
            np.testing.assert_allclose(
                actual[name][key], exp[key], rtol=rtol, atol=1e-7,
                err_msg=f"{key} of {name}",
            )


def variables_for(weights):
    return [keras.Variable(w, name=n) for n, w in zip(SHAPES, weights)]


@pytest.mark.parametrize("cls", [CLARS, LARS])
def test_known_update_with_accumulation(cls):
    k = 3
    weights, steps = problem(2 * k, seed=1)
    grads = [step[0] for step in steps]
    optimizer = cls(gradient_accumulation_steps=k, **HYPER)
    variables = variables_for(weights)
    for g in grads:
        optimizer.apply(g, variables)
    expected = reference_run(weights, grads, steps=k, complete=cls is CLARS, **HYPER)
    stats = optimizer.layer_statistics()
    assert_statistics(stats, expected["statistics"])

    # The callback's single read holds the same numbers and the update index.
    update, paths, names, values = read_layer_statistics(optimizer)
    assert update == 2 and paths == list(SHAPES)
    assert values.dtype == np.float32 and values.shape == (3, len(STATISTICS))
    np.testing.assert_array_equal(
        values, [[stats[p][s] for s in STATISTICS] for p in paths]
    )
    coherence = values[:, STATISTICS.index("coherence")]
    if cls is CLARS:
        # S = 3 differing samples: N_l > ||g_l||; the bias is not adapted.
        assert np.all((coherence > 0.2) & (coherence < 0.99))
        assert stats["bias"]["trust_ratio"] == 1.0
    else:
        np.testing.assert_allclose(coherence, 1.0, rtol=1e-6)


def test_given_sample_norms_with_one_sample_per_update():
    """R = k = 1 but per-example norms given: ||g_l|| is still the mean's."""
    weights, steps = problem(2, samples=4, seed=2)
    grads = [[np.mean(layer, axis=0) for layer in zip(*step)] for step in steps]
    norms = [
        [float(np.mean([np.linalg.norm(s[l]) for s in step])) for l in range(3)]
        for step in steps
    ]
    optimizer = CLARS(**HYPER)
    variables = variables_for(weights)
    for g, n in zip(grads, norms):
        optimizer.apply(g, variables, sample_norms=n)
    expected = reference_run(weights, steps, complete=True, **HYPER)
    assert_statistics(optimizer.layer_statistics(), expected["statistics"])
    assert all(s["coherence"] < 0.99 for s in optimizer.layer_statistics().values())


def mean_and_norms(step):
    """A micro-step's mean gradient and the mean of its samples' norms."""
    mean = [np.mean(layer, axis=0) for layer in zip(*step)]
    return mean, [float(np.mean([np.linalg.norm(s[l]) for s in step]))
                  for l in range(len(SHAPES))]


@pytest.mark.parametrize("scaling", ["LossScaleOptimizer", "loss_scale_factor"])
def test_sample_norms_are_unscaled_as_the_gradients(scaling):
    """Norms on the scale of the gradients (of a loss scaled by 64) reach
    CLARS unscaled, through a LossScaleOptimizer or `loss_scale_factor`, and
    serve one `apply` only."""
    weights, steps = problem(3, samples=4, seed=5)
    if scaling == "LossScaleOptimizer":
        inner = CLARS(**HYPER)
        optimizer = keras.optimizers.LossScaleOptimizer(inner, initial_scale=64.0)
    else:
        inner = optimizer = CLARS(loss_scale_factor=64.0, **HYPER)
    variables = variables_for(weights)
    for step in steps[:2]:
        grads, norms = mean_and_norms(step)
        apply_with_sample_norms(optimizer, [64 * g for g in grads], variables,
                                [64 * n for n in norms])
    expected = reference_run(weights, steps[:2], complete=True, **HYPER)
    assert_statistics(inner.layer_statistics(), expected["statistics"])
    assert all(s["coherence"] < 0.99 for s in inner.layer_statistics().values())
    # Without norms, the next micro-step is one sample again: N_l = ||g_l||.
    with pytest.warns(UserWarning, match="one gradient sample"):
        optimizer.apply([64 * g for g in mean_and_norms(steps[2])[0]], variables)
    for values in inner.layer_statistics().values():
        assert values["coherence"] == pytest.approx(1.0)
    assert int(inner.iterations) == 3


@pytest.mark.parametrize("optimizer", [
    keras.optimizers.LossScaleOptimizer(LARS()), LARS(), keras.optimizers.SGD()],
    ids=["LossScaleOptimizer(LARS)", "LARS", "SGD"])
def test_sample_norms_need_clars(optimizer):
    with pytest.raises(ValueError, match="only used by CLARS"):
        apply_with_sample_norms(optimizer, [np.ones((2, 2), "float32")],
                                [keras.Variable(np.ones((2, 2), "float32"))],
                                [1.0])


def test_read_through_a_loss_scale_optimizer():
    weights, steps = problem(1, seed=3)
    inner = CLARS(**HYPER)
    optimizer = keras.optimizers.LossScaleOptimizer(inner)
    variables = variables_for(weights)
    with pytest.raises(ValueError, match="not built"):
        read_layer_statistics(optimizer)
    optimizer.build(variables)
    scale = float(ops.convert_to_numpy(optimizer.dynamic_scale))
    optimizer.apply([g * scale for g in steps[0][0]], variables)
    update, paths, names, values = read_layer_statistics(optimizer)
    assert update == 1
    expected = reference_run(weights, [steps[0][0]], complete=True, **HYPER)
    assert_statistics(inner.layer_statistics(), expected["statistics"])
    with pytest.raises(ValueError, match="noise scale.*exclude_from_layer_adaptation.*received <keras.*SGD"):
        read_layer_statistics(keras.optimizers.SGD())


# R = 2 replicas on 2 logical CPUs, k = 2: each replica applies its own
# gradient (scaled by 1/R, as Keras scales the loss), so S = 4 per update.
MIRRORED = r"""
import json, sys
import numpy as np
from recipes import strategies
strategies.use_logical_cpus(2)
import keras, tensorflow as tf
from keras_clars import CLARS, LARS, apply_with_sample_norms
from keras_clars.callbacks import read_layer_statistics

names, weights, steps, given_steps, hyper = json.loads(sys.stdin.read())
strategy = strategies.make_strategy("mirrored")
out = {}
for cls in (CLARS, LARS):
    with strategy.scope():
        variables = [keras.Variable(np.array(w, "float32"), name=n)
                     for n, w in zip(names, weights)]
        optimizer = cls(gradient_accumulation_steps=2, **hyper)
        optimizer.build(variables)

    @tf.function
    def micro_step(grads):
        strategy.run(lambda g: optimizer.apply(g, variables), args=(grads,))

    for step in steps:
        micro_step(strategy.experimental_distribute_values_from_function(
            lambda context: [tf.constant(np.array(g, "float32") / 2)
                             for g in step[context.replica_id_in_sync_group]]))
    out[cls.__name__] = {"replicas": strategy.num_replicas_in_sync,
                         "updates": int(optimizer.iterations.numpy()),
                         "statistics": optimizer.layer_statistics(),
                         "read": read_layer_statistics(optimizer)[3].tolist()}

# Sample norms handed through a LossScaleOptimizer, per replica (k = 1):
# replica r's gradient is the mean of its 2 samples, its norm the mean of
# their norms, both scaled by 1/R and by the loss scale 2**15.
with strategy.scope():
    variables = [keras.Variable(np.array(w, "float32"), name=n)
                 for n, w in zip(names, weights)]
    inner = CLARS(**hyper)
    optimizer = keras.optimizers.LossScaleOptimizer(inner)
    optimizer.build(variables)


@tf.function
def given_step(grads, norms):
    strategy.run(lambda g, n: apply_with_sample_norms(optimizer, g, variables, n),
                 args=(grads, norms))


def per_replica(values):
    return strategy.experimental_distribute_values_from_function(
        lambda context: [tf.constant(np.array(v, "float32") * 2.0 ** 15 / 2)
                         for v in values[context.replica_id_in_sync_group]])


for step in given_steps:
    halves = [step[:2], step[2:]]
    grads = [[np.mean(layer, axis=0) for layer in zip(*h)] for h in halves]
    norms = [[np.mean([np.linalg.norm(s[l]) for s in h])
              for l in range(len(names))] for h in halves]
    given_step(per_replica(grads), per_replica(norms))
out["given"] = {"updates": int(inner.iterations.numpy()),
                "statistics": inner.layer_statistics()}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_two_replicas_with_accumulation_under_mirrored_strategy():
    weights, steps = problem(4, samples=2, seed=4)
    _, given_steps = problem(2, samples=4, seed=6)

    def listed(steps):
        return [[[g.tolist() for g in sample] for sample in step]
                for step in steps]

    payload = json.dumps([list(SHAPES), [w.tolist() for w in weights],
                          listed(steps), listed(given_steps), HYPER])
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(
        [sys.executable, "-c", MIRRORED], input=payload, capture_output=True,
        text=True, timeout=240, env=env,
    )
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    result = json.loads(lines[0][len("RESULT "):])
    for name, complete in (("CLARS", True), ("LARS", False)):
        assert result[name]["replicas"] == 2 and result[name]["updates"] == 2
        expected = reference_run(weights, steps, steps=2, complete=complete, **HYPER)
        assert_statistics(result[name]["statistics"], expected["statistics"])
        # The callback's single read of the mirrored variables agrees.
        stats = result[name]["statistics"]
        assert result[name]["read"] == [[stats[p][s] for s in STATISTICS] for p in SHAPES]
    # S = 4 samples: CLARS's N_l exceeds LARS's ||g_l||.
    assert all(s["coherence"] < 0.99 for s in result["CLARS"]["statistics"].values())
    # Given norms, through the LossScaleOptimizer: S = 2 replicas x 2 samples.
    assert result["given"]["updates"] == 2
    expected = reference_run(weights, given_steps, complete=True, **HYPER)
    assert_statistics(result["given"]["statistics"], expected["statistics"])
