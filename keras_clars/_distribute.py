"""The tf.distribute plumbing of the optimizers' update (private).

TensorFlow only: `keras_clars._tensorflow` re-exports these four functions,
and elsewhere (`keras_clars._generic`) there is one replica and a plain
call. Each is a plain call too when there is one replica or no strategy.
"""

import tensorflow as tf


def num_replicas():
    """Replicas that share one update (1 outside tf.distribute)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def replica_id():
    """This replica's index in its sync group (0 outside tf.distribute, or
    where it is not known while tracing, as on a TPU, which traces once for
    all replicas)."""
    context = tf.distribute.get_replica_context()
    if context is None:
        return 0
    value = tf.get_static_value(context.replica_id_in_sync_group)
    return 0 if value is None else int(value)


def all_reduce_sum(tensors):
    """Sums a list of tensors over replicas in one batched all-reduce.

    Called in replica context. With one replica it returns `tensors` as is.
    """
    if num_replicas() == 1:
        return list(tensors)
    context = tf.distribute.get_replica_context()
    return list(context.all_reduce(tf.distribute.ReduceOp.SUM, list(tensors)))


def on_each_device(fn, anchor, *args):
    """Calls `fn(*args)` once on each device that holds `anchor`.

    Under tf.distribute this is one merge_call and one `extended.update` of
    the optimizer variable `anchor`: `args` arrive as this device's values,
    and inside `fn` every mirrored variable reads and writes its copy on this
    device. Without a strategy `fn` runs directly.
    """
    if not tf.distribute.has_strategy():
        return fn(*args)

    def merged(strategy, *args):
        variable = getattr(anchor, "value", anchor)
        return strategy.extended.update(
            variable, lambda _, *local: fn(*local), args=args, group=False
        )

    return tf.__internal__.distribute.interim.maybe_merge_call(
        merged, tf.distribute.get_strategy(), *args
    )
