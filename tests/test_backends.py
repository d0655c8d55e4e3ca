"""The float64 reference tests on every Keras backend: JAX and PyTorch.

tests/test_reference.py, tests/test_transforms.py and
tests/test_per_example_backends.py are backend-agnostic;
the backend is fixed when Keras is imported, so each runs in a subprocess
with KERAS_BACKEND set (TensorFlow runs them in this process). Each run must
take under 150 s of CPU (about that in wall time on an idle 2-core machine;
the wall-clock limit is only a guard against a hang, since a shared machine
can be several times slower). JAX runs with float64 enabled
(`JAX_ENABLE_X64=1`), as a float64 model needs there, and with two CPU
devices, for the per-example DataParallel test.
"""

import os
import resource
import subprocess
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
FILES = ("test_transforms.py", "test_reference.py",
         "test_per_example_backends.py")
CPU_LIMIT_S = 150
WALL_LIMIT_S = 600


def _children_cpu_s():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime

BACKENDS = {
    # Each JAX test compiles its own update under jax.jit (~1 s of CPU
    # each), so JAX runs the option matrices for CLARS (LARS differs by one
    # flag, and runs the plain matrix) with weight decay on only (off
    # differs by a mask), and nesterov for CLARS only.
    "jax": dict(
        env={"JAX_PLATFORMS": "cpu", "JAX_ENABLE_X64": "1",
             "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
        subset=" and ".join(f"not {name}" for name in (
            "(test_matches_reference and None])",
            "test_nesterov[LARS",
            "test_exclusions_by_name_survive_get_config[LARS",
            "test_clipping_matches_reference[LARS",
            "test_inf_gradient_is_skipped_under_clipvalue[LARS",
            "test_float64_and_float32_variables_match_reference[LARS",
            "(test_clars_equals_lars_with_one_sample_under_clipping and "
            "clipnorm])",
        )),
    ),
    # PyTorch runs op by op: the whole files.
    "torch": dict(env={}, subset=None),
}


@pytest.mark.slow
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_reference_tests_pass_on_backend(backend):
    pytest.importorskip(backend)
    options = BACKENDS[backend]
    env = dict(os.environ, KERAS_BACKEND=backend, **options["env"])
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               *(os.path.join(TESTS, f) for f in FILES)]
    if options["subset"]:
        command += ["-k", options["subset"]]
    cpu = _children_cpu_s()
    try:
        result = subprocess.run(command, env=env, capture_output=True,
                                text=True, timeout=WALL_LIMIT_S, cwd=TESTS)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the {backend} run took over {WALL_LIMIT_S} s:\n"
                    f"{e.stdout}")
    cpu = _children_cpu_s() - cpu
    summary = result.stdout.strip().splitlines()[-1] if result.stdout else ""
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    assert " passed" in summary and "failed" not in summary, summary
    # The backend really was not TensorFlow: the TF-only tests skipped.
    assert " skipped" in summary, summary
    assert cpu < CPU_LIMIT_S, f"the {backend} run took {cpu:.0f} s of CPU"
