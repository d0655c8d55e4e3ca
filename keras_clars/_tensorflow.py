"""TensorFlow's fast paths of the layer-wise update (private).

`keras_clars.layerwise` picks this module, or its own `keras.ops` version of
the same five functions, with its single backend check (`backend_paths()`).
Both compute the same rule; here it costs fewer kernels and fewer traced ops:

- `squared_norms`: one `tf.nn.l2_loss` kernel per tensor (sum(x**2) / 2),
  where square-then-sum makes two passes;
- `when`: one `tf.cond` around the whole update, so a skipped update costs
  nothing (JAX cannot assign inside `lax.cond` in Keras's stateless scope,
  so the generic path selects with a mask instead);
- `apply_momentum`: the fused ResourceApplyMomentum kernel, one pass
  instead of four;
- `num_replicas`, `all_reduce_sum`, `on_each_device`: the tf.distribute
  plumbing, in `keras_clars._distribute`.
"""

import keras
import tensorflow as tf

from keras_clars._distribute import (  # noqa: F401  (re-exported)
    all_reduce_sum,
    num_replicas,
    on_each_device,
)


def squared_norms(tensors, dtype):
    """[sum(x**2) for x in tensors] as one vector of `dtype`."""
    return 2.0 * tf.stack([tf.nn.l2_loss(tf.cast(x, dtype)) for x in tensors])


def when(condition, fn):
    """Runs `fn(None)` only where `condition` holds (None: no mask needed)."""
    tf.cond(condition, lambda: fn(None), lambda: None)


def _handle(variable):
    """The resource handle of a variable (on this device)."""
    if isinstance(variable, keras.Variable):
        variable = variable.value
    return variable.handle


def apply_momentum(optimizer, variable, velocity, update, momentum, mask):
    """v <- m * v + u; w <- w - v (nesterov: w - (m * v + u)), fused.

    The same rule as `transforms.heavy_ball`; `mask` is always None here.
    """
    del mask
    tf.raw_ops.ResourceApplyMomentum(
        var=_handle(variable),
        accum=_handle(velocity),
        lr=tf.ones((), variable.dtype),
        grad=update,
        momentum=tf.constant(momentum, variable.dtype),
        use_nesterov=optimizer.nesterov,
    )
