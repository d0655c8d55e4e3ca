"""The small pieces of a layer-wise adaptive update, written with `keras.ops`.

Each function is pure (tensors in, tensors out) and works elementwise on
vectors of per-layer scalars, so it can be tested on its own against NumPy
(tests/test_transforms.py) on every backend, in the spirit of optax's chains
of small transforms.
"""

import keras
from keras import ops


def norm_dtype(dtype):
    """Norms and ratios are float32, or float64 for float64 variables."""
    float64 = keras.backend.standardize_dtype(dtype) == "float64"
    return "float64" if float64 else "float32"


def squared_norm(x):
    """sum(x**2) over a whole tensor, accumulated in `norm_dtype(x.dtype)`."""
    # Flat first: XLA on CPU reduces a 1-D tensor about twice as fast.
    x = ops.reshape(ops.cast(x, norm_dtype(x.dtype)), (-1,))
    return ops.sum(ops.square(x))


def l2_norm(x):
    """||x||_2 over a whole tensor, in `norm_dtype(x.dtype)`."""
    return ops.sqrt(squared_norm(x))


def trust_ratio(weight_norm, gradient_norm, trust_coefficient, weight_decay,
                epsilon):
    """lambda = eta * ||w|| / (N + beta * ||w|| + eps), or 1 if a norm is 0.

    `gradient_norm` is N: the norm of the mean gradient for LARS, the mean of
    the gradient samples' norms for CLARS.
    """
    both_positive = ops.logical_and(
        ops.greater(weight_norm, 0), ops.greater(gradient_norm, 0)
    )
    denominator = gradient_norm + weight_decay * weight_norm + epsilon
    # Guard the division so the branch not taken cannot produce inf or NaN.
    safe_denominator = ops.where(both_positive, denominator, 1.0)
    ratio = trust_coefficient * weight_norm / safe_denominator
    return ops.where(both_positive, ratio, ops.ones_like(ratio))


def coherence(gradient_norm, complete_norm):
    """||g|| / N: 1 for LARS, <= 1 for CLARS; 1 where N = 0."""
    positive = ops.greater(complete_norm, 0)
    return ops.where(
        positive, gradient_norm / ops.where(positive, complete_norm, 1.0), 1.0
    )


def clip_factor(raw_norm, clipped_norm):
    """||clip(g)|| / ||g||, what clipping did to a layer; 1 where ||g|| = 0."""
    positive = ops.greater(raw_norm, 0)
    return ops.where(
        positive, clipped_norm / ops.where(positive, raw_norm, 1.0), 1.0
    )


def heavy_ball(velocity, update, momentum, nesterov):
    """Classic momentum: v <- m * v + u; the step is v, or m * v + u (nesterov).

    Returns `(new_velocity, step)`; the caller applies `w <- w - step`.
    """
    new_velocity = momentum * velocity + update
    if nesterov:
        return new_velocity, momentum * new_velocity + update
    return new_velocity, new_velocity


def noise_estimates(squared_gradient_norm, mean_squared_sample_norm, samples,
                    sample_size):
    """Unbiased |G|^2 and tr(Sigma) from one update's S samples of size b.

    With G2 = ||g||^2 of the mean of the S samples, m2 = their mean squared
    norm, and B = S * b (McCandlish et al. 2018, appendix A.1):

        |G|^2  ~ (B * G2 - b * m2) / (B - b) = (S * G2 - m2) / (S - 1)
        tr(Sigma) ~ (m2 - G2) / (1/b - 1/B)  = S * b * (m2 - G2) / (S - 1)

    Returns `(squared_gradient, trace_covariance)`, NaN where S <= 1 (no
    estimate).
    """
    several = ops.greater(samples, 1)
    spare = ops.where(several, samples - 1, 1.0)
    squared_gradient = (samples * squared_gradient_norm
                        - mean_squared_sample_norm) / spare
    trace = (samples * sample_size
             * (mean_squared_sample_norm - squared_gradient_norm) / spare)
    nan = ops.full_like(squared_gradient, float("nan"))
    return (ops.where(several, squared_gradient, nan),
            ops.where(several, trace, nan))
