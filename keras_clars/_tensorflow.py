"""TensorFlow's fast paths of the layer-wise update (private).

`keras_clars.layerwise` picks this module on TensorFlow, and
`keras_clars._generic` (the same functions, in `keras.ops`) elsewhere, once,
when it is imported. Both compute the same rule; here it costs fewer kernels
and fewer traced ops:

- `squared_norms`: one `tf.nn.l2_loss` kernel per tensor (sum(x**2) / 2),
  where square-then-sum makes two passes; under XLA on a machine with no
  GPU or TPU, dot products of rows of up to 1024, where XLA:CPU would
  write x * x to a temporary and reduce it in two or three more kernels;
- `scale_tensor`: `multiply_no_nan`, so a skipped update (scale 0) is 0
  even for a non-finite gradient, without a select per layer;
- `when`: with gradient accumulation, one `tf.cond` around the update, so
  the k - 1 micro-steps that only accumulate compute nothing more (JAX
  cannot assign inside `lax.cond` in Keras's stateless scope, so the
  generic path selects with a mask instead);
- `apply_momentum`: the fused ResourceApplyMomentum kernel, one pass
  instead of four, which skips a non-finite update by its arguments
  instead of a branch;
- `num_replicas`, `replica_id`, `all_reduce_sum`, `on_each_device`: the
  tf.distribute plumbing, in `keras_clars._distribute`.
"""

import keras
import tensorflow as tf

from keras_clars._distribute import (  # noqa: F401  (re-exported)
    all_reduce_sum,
    num_replicas,
    on_each_device,
    replica_id,
)


def squared_norms(tensors, dtype):
    """[sum(x**2) for x in tensors] as one vector of `dtype`."""
    # Flat first: XLA on CPU reduces a 1-D tensor about twice as fast.
    flat = [tf.reshape(tf.cast(x, dtype), [-1]) for x in tensors]
    if _xla_on_cpu():
        return tf.stack([_blocked_dot(x) for x in flat])
    return 2.0 * tf.stack([tf.nn.l2_loss(x) for x in flat])


def _blocked_dot(x):
    """x . x for a 1-D x, as rows of up to 1024 (the largest power of two
    dividing its size): one dot product per row, then their sum. Short
    float32 sums, as accurate as `l2_loss`; one long dot product is not."""
    size = int(x.shape[0])
    rows = tf.reshape(x, [-1, min(size & -size, 1024) or 1])
    return tf.reduce_sum(tf.einsum("ij,ij->i", rows, rows))


def _xla_on_cpu():
    """Whether this trace is compiled by XLA (`jit_compile=True`) for a CPU.

    Not on GPUs and TPUs: there a dot product runs on the matrix units,
    where float32 inputs may be rounded (TF32, bfloat16 passes).
    """
    from tensorflow.python.ops import control_flow_util

    return (control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())
            and not tf.config.list_logical_devices("GPU")
            and not tf.config.list_logical_devices("TPU"))


def scale_tensor(x, factor):
    """factor * x, and 0 where factor is 0 even if x holds inf or NaN."""
    return tf.math.multiply_no_nan(x, tf.cast(factor, x.dtype))


def when(condition, fn):
    """Runs `fn(None)` only if `condition` holds (None: no mask needed)."""
    tf.cond(condition, lambda: fn(None), lambda: None)


def _handle(variable):
    """The resource handle of a variable (on this device)."""
    if isinstance(variable, keras.Variable):
        variable = variable.value
    return variable.handle


def apply_momentum(optimizer, variables, velocities, updates, mask):
    """v <- m * v + u; w <- w - v (nesterov: w - (m * v + u)), fused.

    The rule of `transforms.heavy_ball`, one ResourceApplyMomentum kernel per
    layer. Where `mask` is false the caller's updates are 0 (`scale_tensor`
    by a zero scale) and the kernel runs with momentum 1 and learning rate
    0: v <- v + 0, w <- w - 0 * v, both exact. No branch: a `cond` around
    all layers cost as much tracing as the update itself.
    """
    constants = {}
    for variable, velocity, update in zip(variables, velocities, updates):
        dtype = variable.dtype
        if dtype not in constants:
            momentum = tf.constant(optimizer.momentum, dtype)
            if mask is None:
                constants[dtype] = (tf.ones((), dtype), momentum)
            else:
                constants[dtype] = (tf.cast(mask, dtype),
                                    tf.where(mask, momentum, tf.ones((), dtype)))
        rate, momentum = constants[dtype]
        tf.raw_ops.ResourceApplyMomentum(
            var=_handle(variable),
            accum=_handle(velocity),
            lr=rate,
            grad=update,
            momentum=momentum,
            use_nesterov=optimizer.nesterov,
        )
