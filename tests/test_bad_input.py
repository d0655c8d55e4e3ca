"""Bad hyperparameters raise ValueError; non-finite gradients skip updates."""

import numpy as np
import pytest

from keras import ops

from keras_clars import CLARS, LARS
from numpy_reference import reference_run
from test_reference import (HYPER, assert_matches, make_problem,
                            run_optimizer)

# (argument values, text the message must hold: the argument and the value)
BAD = [
    (dict(learning_rate=-0.1), "learning_rate=-0.1"),
    (dict(momentum=-0.1), "momentum=-0.1"),
    (dict(momentum=1.0), "momentum=1.0"),
    (dict(momentum=1.5), "momentum=1.5"),
    (dict(momentum="fast"), "momentum='fast'"),
    (dict(trust_coefficient=0.0), "trust_coefficient=0.0"),
    (dict(trust_coefficient=-0.001), "trust_coefficient=-0.001"),
    (dict(weight_decay=-1e-4), "weight_decay=-0.0001"),
    (dict(epsilon=-1e-8), "epsilon=-1e-08"),
    (dict(nesterov=True, momentum=0.0), "momentum=0.0"),
    (dict(gradient_accumulation_steps=1), "gradient_accumulation_steps=1"),
    (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps=0"),
    (dict(gradient_accumulation_steps=-2), "gradient_accumulation_steps=-2"),
    (dict(gradient_accumulation_steps=2.0), "gradient_accumulation_steps=2.0"),
    (dict(gradient_accumulation_steps="2"), "gradient_accumulation_steps='2'"),
    (dict(use_ema=True), "use_ema=True"),
    (dict(excluded_learning_rate=-1.0), "excluded_learning_rate=-1.0"),
    (dict(excluded_learning_rate="fast"), "excluded_learning_rate='fast'"),
    (dict(excluded_learning_rate=True), "excluded_learning_rate=True"),
]


@pytest.mark.parametrize("kwargs, text", BAD, ids=[t for _, t in BAD])
@pytest.mark.parametrize("cls", [CLARS, LARS])
def test_bad_hyperparameters_raise(cls, kwargs, text):
    with pytest.raises(ValueError) as error:
        cls(**kwargs)
    assert text in str(error.value)
    if "nesterov" in kwargs:
        assert "nesterov" in str(error.value)


@pytest.mark.parametrize("kwargs", [
    dict(), dict(learning_rate=0.0), dict(momentum=0.0),
    dict(weight_decay=0.0), dict(gradient_accumulation_steps=2),
    dict(excluded_learning_rate=0.0),
])
def test_edge_values_are_accepted(kwargs):
    config = CLARS(**kwargs).get_config()
    for name, value in kwargs.items():
        assert config[name] == value, name
    assert CLARS.from_config(config).get_config() == config


def _poison(grads, step, layer, value):
    grads[step][layer] = grads[step][layer].copy()
    grads[step][layer].flat[3] = value


@pytest.mark.parametrize("cls", [CLARS, LARS])
def test_non_finite_gradient_skips_the_update(cls):
    weights, grads = make_problem(5, seed=20)
    _poison(grads, 1, 0, np.nan)
    _poison(grads, 2, 3, np.inf)
    optimizer = cls(weight_decay=0.05, **HYPER)
    history = run_optimizer(optimizer, weights, grads)
    for step in (1, 2):
        for key in ("weights", "velocities"):
            for a, b in zip(history[key][step], history[key][0]):
                np.testing.assert_array_equal(a, b)
    assert int(ops.convert_to_numpy(optimizer.non_finite_updates)) == 2
    assert int(optimizer.iterations) == 5
    expected = reference_run(weights, grads, complete=cls is CLARS,
                             weight_decay=0.05, **HYPER)
    assert expected["non_finite_updates"] == 2
    assert_matches(history, expected)
    for values in optimizer.layer_statistics().values():
        assert np.all(np.isfinite(list(values.values())))


@pytest.mark.parametrize("cls", [CLARS, LARS])
def test_non_finite_micro_step_skips_its_whole_window(cls):
    """k = 2: NaN in an update micro-step, then in a non-update one."""
    weights, grads = make_problem(6, seed=21)
    _poison(grads, 1, 0, np.nan)   # window 0: the update's own micro-step
    _poison(grads, 2, 1, -np.inf)  # window 1: the pending micro-step
    optimizer = cls(gradient_accumulation_steps=2, weight_decay=0.05, **HYPER)
    history = run_optimizer(optimizer, weights, grads)
    for step in range(4):
        for a, b in zip(history["weights"][step], weights):
            np.testing.assert_array_equal(a, b)
    assert int(ops.convert_to_numpy(optimizer.non_finite_updates)) == 2
    # Window 2 is clean: it updates from the start, as if 0 and 1 never were.
    expected = reference_run(weights, grads, steps=2, complete=cls is CLARS,
                             weight_decay=0.05, **HYPER)
    assert_matches(history, expected)
    assert not np.array_equal(history["weights"][-1][0], weights[0])
    for accumulator in optimizer._accumulated_gradients:
        assert not np.any(ops.convert_to_numpy(accumulator))
    if cls is CLARS:
        assert not np.any(ops.convert_to_numpy(optimizer._complete_norm_sums))
    else:  # LARS keeps no sample-norm state
        assert not hasattr(optimizer, "_complete_norm_sums")
