"""The tf.distribute plumbing of the optimizers' update (private).

Everything here degrades to a plain call when there is one replica or when
the backend is not TensorFlow, so the optimizers keep one code path.
"""

import keras


def _tf():
    import tensorflow as tf

    return tf


def is_tensorflow():
    return keras.backend.backend() == "tensorflow"


def num_replicas():
    """Replicas that share one update (1 outside tf.distribute)."""
    if not is_tensorflow():
        return 1
    return _tf().distribute.get_strategy().num_replicas_in_sync


def all_reduce_sum(tensors):
    """Sums a list of tensors over replicas in one batched all-reduce.

    Called in replica context. With one replica it returns `tensors` as is.
    """
    if num_replicas() == 1:
        return list(tensors)
    tf = _tf()
    context = tf.distribute.get_replica_context()
    return list(context.all_reduce(tf.distribute.ReduceOp.SUM, list(tensors)))


def cross_replica_call(fn, *args):
    """Calls `fn(distribution, *args)` once, in cross-replica context.

    Under tf.distribute this is a merge_call: `args` arrive as per-replica
    values and `fn` must touch variables only through `update_variable`.
    Elsewhere `distribution` is None and `fn` runs directly.
    """
    if not is_tensorflow():
        return fn(None, *args)
    tf = _tf()
    return tf.__internal__.distribute.interim.maybe_merge_call(
        fn, tf.distribute.get_strategy(), *args
    )


def update_variable(distribution, variable, fn, args):
    """Runs `fn(variable, *args)` on every device that holds `variable`."""
    if distribution is None:
        return fn(variable, *args)
    if isinstance(variable, keras.Variable):
        variable = variable.value
    return distribution.extended.update(variable, fn, args=args, group=False)
