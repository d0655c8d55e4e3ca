"""The small pieces of a layer-wise adaptive update, written with `keras.ops`.

Each function is pure (tensors in, tensors out), so it can be tested on its
own against NumPy and reused by every optimizer in this package, in the
spirit of optax's chains of small transforms.
"""

import keras
from keras import ops


def norm_dtype(dtype):
    """Norms and ratios are float32, or float64 for float64 variables."""
    return "float64" if str(dtype) == "float64" else "float32"


def l2_norm(x):
    """The L2 norm of a whole tensor, accumulated in float32 (or float64)."""
    # Flat first: XLA on CPU reduces a 1-D tensor about twice as fast.
    x = ops.reshape(ops.cast(x, norm_dtype(x.dtype)), (-1,))
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # One kernel (sum(x**2) / 2), where square-then-sum makes two passes.
        return ops.sqrt(2.0 * tf.nn.l2_loss(x))
    return ops.sqrt(ops.sum(ops.square(x)))


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


def heavy_ball(velocity, update, momentum, nesterov):
    """Classic momentum: v <- m * v + u; the step is v, or m * v + u (nesterov).

    Returns `(new_velocity, step)`; the caller applies `w <- w - step`.
    """
    new_velocity = momentum * velocity + update
    if nesterov:
        return new_velocity, momentum * new_velocity + update
    return new_velocity, new_velocity
