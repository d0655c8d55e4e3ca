"""CLARS and LARS under MirroredStrategy equal the float64 spec.

Each device count runs in its own process (`distributed_worker.py mirrored`):
the number of logical CPU devices is fixed when TensorFlow starts. The
processes of the device counts selected run at the same time: each is mostly
one thread's start-up and tracing, so two keep a 2-core machine busy.
"""

import numpy as np
import pytest

import distributed_worker as worker
from numpy_reference import noise_reference

KEYS = [f"{name}_k{steps or 1}" for name, steps in worker.CONFIGS]
TOLERANCE = dict(rtol=1e-5, atol=2e-6)  # float32 arithmetic vs float64


@pytest.fixture(scope="module")
def workers(request, tmp_path_factory):
    """{device count: the worker's arrays}, for the counts the session runs."""
    wanted = sorted({item.callspec.params["mirrored"] for item in request.session.items
                     if "mirrored" in getattr(getattr(item, "callspec", None), "params", {})})
    runs = [("mirrored", tmp_path_factory.mktemp("mirrored") / "out.npz", "--devices", str(n))
            for n in wanted]
    return dict(zip(wanted, worker.run_modes(runs)))


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}cpus")
def mirrored(request, workers):
    return request.param, workers[request.param]


def layers(result, prefix):
    names = sorted(k for k in result if k.startswith(prefix + "/"))
    return [result[name] for name in names]


@pytest.mark.slow
@pytest.mark.parametrize("key", KEYS)
def test_fit_under_mirrored_strategy_matches_reference(mirrored, key):
    devices, result = mirrored
    fit, ref = layers(result, key + "/fit"), layers(result, key + "/ref")
    assert len(fit) == len(ref) == 6
    steps = 2 if key.endswith("k2") else 1
    # 2 epochs of 4 global micro-batches of 8: replica slices of 8 / devices.
    assert int(result[key + "/micro_steps"]) == 8
    assert int(result[key + "/updates"]) == 8 // steps
    for i, (a, b) in enumerate(zip(fit, ref)):
        np.testing.assert_allclose(a, b, **TOLERANCE, err_msg=f"{key} layer {i}")
    # The other optimizer's norm gives other weights: the check can fail.
    alt = layers(result, key + "/alt")
    assert max(np.max(np.abs(a - b)) for a, b in zip(fit, alt)) > 1e-3


@pytest.mark.slow
def test_noise_scale_under_mirrored_strategy_matches_reference(mirrored):
    """S = 2R samples of BATCH / R (R replicas, k = 2): m2, S, b and the
    estimates, summed over replicas in the update's one all-reduce."""
    devices, result = mirrored
    samples = [layers(result, f"noise/sample{i:02d}") for i in range(2 * devices)]
    expected = noise_reference(samples, worker.BATCH // devices)
    got = result["noise/fit"]
    np.testing.assert_allclose(got[:, 0], expected[:, 0], rtol=2e-4)  # m2
    np.testing.assert_allclose(result["noise/gradient_norms"] ** 2, expected[:, 1],
                               rtol=2e-4)
    np.testing.assert_array_equal(got[:, 1:3], expected[:, 2:4])  # S, b
    np.testing.assert_allclose(got[:, 3:5], expected[:, 4:6], rtol=2e-3, atol=1e-6)


def test_xla_fit_on_one_device_matches_reference():
    """The update compiles under XLA (static shapes) and stays exact."""
    x, y = worker.data(4 * worker.BATCH)
    model = worker.compile_model(worker.build_model(), "CLARS", 2, jit_compile=True)
    model.fit(x, y, batch_size=worker.BATCH, epochs=1, shuffle=False, verbose=0)
    assert model.jit_compile
    assert int(model.optimizer.iterations.numpy()) == 2
    # One device, k=2: each micro-batch is one gradient sample (S = 2).
    reference = worker.Reference(True, 2, worker.build_model().get_weights())
    reference.fit(x, y, replicas=1)
    for i, (a, b) in enumerate(zip(model.get_weights(), reference.weights)):
        np.testing.assert_allclose(a, b, **TOLERANCE, err_msg=f"layer {i}")
