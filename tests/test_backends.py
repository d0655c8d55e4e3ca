"""The float64 reference tests on every Keras backend: JAX and PyTorch.

tests/test_reference.py and tests/test_transforms.py are backend-agnostic;
the backend is fixed when Keras is imported, so each runs in a subprocess
with KERAS_BACKEND set (TensorFlow runs them in this process). Each run must
stay under 90 s. JAX runs with float64 enabled (`JAX_ENABLE_X64=1`), as a
float64 model needs there.
"""

import os
import subprocess
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
FILES = ("test_transforms.py", "test_reference.py")
LIMIT_S = 90

BACKENDS = {
    # Each JAX test compiles its own update under jax.jit (~1 s of CPU
    # each), so JAX runs the option matrix with weight decay on only (off
    # differs by a mask), nesterov for CLARS only, and the clipping options
    # once each for CLARS and LARS.
    "jax": dict(
        env={"JAX_PLATFORMS": "cpu", "JAX_ENABLE_X64": "1"},
        subset=("not (test_matches_reference and None]) "
                "and not test_nesterov[LARS "
                "and not test_inf_gradient_is_skipped_under_clipvalue[LARS"),
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
    try:
        result = subprocess.run(command, env=env, capture_output=True,
                                text=True, timeout=LIMIT_S, cwd=TESTS)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the {backend} run took over {LIMIT_S} s:\n{e.stdout}")
    summary = result.stdout.strip().splitlines()[-1] if result.stdout else ""
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    assert " passed" in summary and "failed" not in summary, summary
    # The backend really was not TensorFlow: the TF-only tests skipped.
    assert " skipped" in summary, summary
