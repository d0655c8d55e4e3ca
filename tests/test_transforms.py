"""Each piece of keras_clars.transforms against NumPy, on its own.

Backend-agnostic: tests/test_backends.py runs this file again on JAX and
PyTorch. The TensorFlow fast paths (keras_clars._tensorflow) are checked
against the same NumPy at the end, on TensorFlow only.
"""

import numpy as np
import pytest

import keras
from keras import ops

from keras_clars import transforms

IS_TF = keras.backend.backend() == "tensorflow"
RNG = np.random.default_rng(0)


def float64_available():
    """JAX holds float64 only with JAX_ENABLE_X64 (tests/test_backends.py)."""
    if keras.backend.backend() != "jax":
        return True
    import jax

    return bool(jax.config.jax_enable_x64)


needs_float64 = pytest.mark.skipif(not float64_available(),
                                   reason="float64 on JAX needs JAX_ENABLE_X64=1")


def tensor(x, dtype=None):
    x = np.asarray(x)
    return ops.convert_to_tensor(x, dtype or x.dtype.name)


def numpy(x):
    return ops.convert_to_numpy(x)


@pytest.mark.parametrize("dtype, expected", [
    ("float16", "float32"), ("bfloat16", "float32"), ("float32", "float32"),
    pytest.param("float64", "float64", marks=needs_float64),
])
def test_norm_dtype(dtype, expected):
    assert transforms.norm_dtype(dtype) == expected
    # A backend tensor's own dtype object, not only the string.
    assert transforms.norm_dtype(ops.zeros((1,), dtype).dtype) == expected


@pytest.mark.parametrize("dtype", ["float32", pytest.param(
    "float64", marks=needs_float64)])
def test_squared_norm_and_l2_norm(dtype):
    x = RNG.normal(size=(3, 4, 5)).astype(dtype)
    expected = np.sum(np.square(x.astype(np.float64)))
    squared = transforms.squared_norm(tensor(x))
    assert str(numpy(squared).dtype) == dtype
    rtol = 1e-6 if dtype == "float32" else 1e-14
    np.testing.assert_allclose(numpy(squared), expected, rtol=rtol)
    np.testing.assert_allclose(numpy(transforms.l2_norm(tensor(x))),
                               np.sqrt(expected), rtol=rtol)


def test_norms_of_half_precision_are_float32():
    """||g||^2 = 4e6 overflows float16 (max 65504); float32 holds it."""
    x = np.full((10, 10), 200.0, np.float16)
    norm = transforms.l2_norm(tensor(x))
    assert str(numpy(norm).dtype) == "float32"
    np.testing.assert_allclose(numpy(norm), 2000.0, rtol=1e-6)


def _numpy_trust_ratio(w, n, eta, beta, eps):
    ratio = np.ones_like(w)
    positive = (w > 0) & (n > 0)
    ratio[positive] = eta * w[positive] / (
        n[positive] + beta[positive] * w[positive] + eps)
    return ratio


@pytest.mark.parametrize("dtype", ["float32", pytest.param(
    "float64", marks=needs_float64)])
def test_trust_ratio_on_a_vector_of_layers(dtype):
    # Zero weight norm, zero N, both zero, and ordinary layers.
    w = np.array([0.0, 2.0, 0.0, 1.5, 3.0, 0.7], dtype)
    n = np.array([1.0, 0.0, 0.0, 0.2, 4.0, 0.01], dtype)
    beta = np.array([0.0, 0.1, 0.1, 0.0, 0.05, 0.05], dtype)
    ratio = transforms.trust_ratio(tensor(w), tensor(n), 0.02, tensor(beta),
                                   1e-6)
    expected = _numpy_trust_ratio(w.astype(np.float64), n.astype(np.float64),
                                  0.02, beta.astype(np.float64), 1e-6)
    assert str(numpy(ratio).dtype) == dtype
    np.testing.assert_allclose(numpy(ratio), expected,
                               rtol=1e-6 if dtype == "float32" else 1e-14)
    assert np.all(numpy(ratio)[:3] == 1.0)


def test_coherence():
    g = np.array([1.0, 0.0, 0.5, 2.0], np.float32)
    n = np.array([2.0, 0.0, 0.0, 2.0], np.float32)
    expected = np.array([0.5, 1.0, 1.0, 1.0], np.float32)
    np.testing.assert_array_equal(
        numpy(transforms.coherence(tensor(g), tensor(n))), expected)


def test_clip_factor():
    raw = np.array([4.0, 0.0, 1.0, 3.0], np.float32)
    clipped = np.array([1.0, 0.0, 1.0, 0.3], np.float32)
    np.testing.assert_allclose(
        numpy(transforms.clip_factor(tensor(raw), tensor(clipped))),
        [0.25, 1.0, 1.0, 0.1], rtol=1e-6)


@needs_float64
@pytest.mark.parametrize("nesterov", [False, True])
def test_heavy_ball(nesterov):
    v = RNG.normal(size=(4, 3))
    u = RNG.normal(size=(4, 3))
    new_v, step = transforms.heavy_ball(tensor(v), tensor(u), 0.9, nesterov)
    expected_v = 0.9 * v + u
    expected_step = 0.9 * expected_v + u if nesterov else expected_v
    np.testing.assert_allclose(numpy(new_v), expected_v, rtol=1e-14)
    np.testing.assert_allclose(numpy(step), expected_step, rtol=1e-14)


# ------------------------------------------ TensorFlow's fast paths, same rule


@pytest.mark.skipif(not IS_TF, reason="keras_clars._tensorflow: TensorFlow")
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_tensorflow_squared_norms(dtype):
    from keras_clars import _tensorflow

    xs = [RNG.normal(size=s).astype(dtype) for s in [(3, 3, 2, 4), (5,), (7, 2)]]
    norm_dtype = transforms.norm_dtype(dtype)
    squared = _tensorflow.squared_norms([tensor(x) for x in xs], norm_dtype)
    expected = [np.sum(np.square(x.astype(np.float64))) for x in xs]
    assert str(numpy(squared).dtype) == norm_dtype
    np.testing.assert_allclose(numpy(squared), expected,
                               rtol=1e-14 if dtype == "float64" else 1e-6)


@pytest.mark.skipif(not IS_TF, reason="keras_clars._tensorflow: TensorFlow")
@pytest.mark.parametrize("apply", [True, False])
@pytest.mark.parametrize("nesterov", [False, True])
def test_tensorflow_fused_momentum_is_heavy_ball(nesterov, apply):
    """Where the mask is off, weights and velocity keep their exact bits,
    even for a non-finite update."""
    from keras_clars import CLARS, _tensorflow

    w = RNG.normal(size=(4, 3))
    v = RNG.normal(size=(4, 3))
    u = RNG.normal(size=(4, 3))
    if not apply:
        # The caller's update where the mask is off: a zero scale times a
        # gradient that may hold NaN.
        g = u.copy()
        g[0, 0] = np.nan
        u = numpy(_tensorflow.scale_tensor(tensor(g), 0.0))
        np.testing.assert_array_equal(u, np.zeros_like(u))
    variable = keras.Variable(w, dtype="float64")
    velocity = keras.Variable(v, dtype="float64")
    optimizer = CLARS(momentum=0.9, nesterov=nesterov)
    _tensorflow.apply_momentum(optimizer, [variable], [velocity], [tensor(u)],
                               tensor(apply))
    if not apply:
        np.testing.assert_array_equal(numpy(velocity), v)
        np.testing.assert_array_equal(numpy(variable), w)
        return
    new_v, step = transforms.heavy_ball(tensor(v), tensor(u), 0.9, nesterov)
    expected_v = 0.9 * v + u
    expected_step = 0.9 * expected_v + u if nesterov else expected_v
    np.testing.assert_allclose(numpy(velocity), expected_v, rtol=1e-14)
    np.testing.assert_allclose(numpy(variable), w - expected_step, rtol=1e-14)
    np.testing.assert_allclose(numpy(variable), w - numpy(step), rtol=1e-14)
