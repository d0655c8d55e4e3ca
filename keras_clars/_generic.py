"""The generic path of the layer-wise update: `keras.ops` (private).

`keras_clars.layerwise` picks this module on JAX and PyTorch, and
`keras_clars._tensorflow` on TensorFlow, once, when it is imported. Both
hold the same functions and compute the same rule; this one is written
with `keras.ops` and `keras_clars.transforms`:

- one replica: `num_replicas` is 1, `replica_id` is 0, `all_reduce_sum`
  and `on_each_device` are plain calls;
- `when`: an assignment that may not happen selects with a boolean `mask`
  instead of branching (JAX cannot assign inside `lax.cond` in Keras's
  stateless scope; XLA fuses the select);
- `apply_momentum`: `transforms.heavy_ball`, then two assignments.
"""

from keras import ops

from keras_clars import transforms


def num_replicas():
    return 1


def replica_id():
    return 0


def all_reduce_sum(tensors):
    return list(tensors)


def on_each_device(fn, anchor, *args):
    return fn(*args)


def squared_norms(tensors, dtype):
    """[sum(x**2) for x in tensors] as one vector of `dtype`."""
    return ops.stack(
        [transforms.squared_norm(ops.cast(x, dtype)) for x in tensors]
    )


def when(condition, fn):
    """Runs `fn(condition)`: `fn` selects with the mask `condition`."""
    fn(condition)


def scale_tensor(x, factor):
    return ops.cast(factor, x.dtype) * x


def apply_momentum(optimizer, variables, velocities, updates, mask):
    """Heavy-ball momentum on each layer, where `mask` holds (None: all)."""
    for variable, velocity, update in zip(variables, velocities, updates):
        new_velocity, step = transforms.heavy_ball(
            ops.convert_to_tensor(velocity), update,
            ops.convert_to_tensor(optimizer.momentum, variable.dtype),
            optimizer.nesterov,
        )
        optimizer._assign(velocity, new_velocity, mask)
        optimizer._assign(variable,
                          ops.convert_to_tensor(variable) - step, mask)
