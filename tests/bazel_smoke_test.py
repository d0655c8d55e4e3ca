"""Smoke test of the Bazel build (docs/bazel.md); also runs under pytest.

Checks that a test runs under the project's venv, imports keras_clars from
the Bazel target when run by Bazel, and that one CLARS update gives the
value computed by hand.
"""

import os
import sys

import numpy as np
import pytest

import keras
import keras_clars

UNDER_BAZEL = "TEST_SRCDIR" in os.environ


def test_runs_under_the_project_venv():
    # Bazel's default would be the first python3 on PATH, outside the venv.
    assert sys.prefix != sys.base_prefix, sys.executable
    assert keras.__file__.startswith(sys.prefix), (keras.__file__, sys.prefix)


@pytest.mark.skipif(not UNDER_BAZEL, reason="only meaningful under bazel test")
def test_imports_keras_clars_from_the_bazel_target():
    # The //:keras_clars py_library's runfiles, not the editable install.
    assert keras_clars.__file__.startswith(os.environ["TEST_SRCDIR"]), (
        keras_clars.__file__
    )


def test_two_clars_updates_match_hand_computed_values():
    w = keras.Variable(np.array([[3.0, 4.0], [0.0, 0.0]], "float32"))
    g = np.array([[0.6, 0.8], [0.0, 0.0]], "float32")  # ||g|| = 1
    opt = keras_clars.CLARS(
        learning_rate=1.0, momentum=0.9, trust_coefficient=0.1
    )
    # Step 1, sample norm 2 (CLARS's complete norm, > ||g||):
    #   lambda = 0.1 * ||w|| / 2 = 0.1 * 5 / 2 = 0.25
    #   v = 0.25 * g = [0.15, 0.2];  w = [3, 4] - v = [2.85, 3.8]
    opt.apply([g], [w], sample_norms=[2.0])
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(w), [[2.85, 3.8], [0, 0]], rtol=1e-6
    )
    # Step 2, no sample norms given: S = 1, N = ||g|| = 1 (as LARS):
    #   lambda = 0.1 * ||[2.85, 3.8]|| / 1 = 0.1 * 4.75 = 0.475
    #   v = 0.9 * [0.15, 0.2] + 0.475 * g = [0.42, 0.56]
    #   w = [2.85, 3.8] - v = [2.43, 3.24]
    opt.apply([g], [w])
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(w), [[2.43, 3.24], [0, 0]], rtol=1e-6
    )
