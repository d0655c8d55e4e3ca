"""tf.distribute plumbing shared by the optimizers and the recipes.

Everything here degrades to a plain call when there is one replica or when
the backend is not TensorFlow, so the optimizers keep one code path.
"""

import keras

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")


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


def make_strategy(name="default", tpu_address=None):
    """The strategy factory shared by tests, benchmarks and recipes.

    Args:
        name: one of `default`, `mirrored`, `multi_worker`, `tpu`.
        tpu_address: the TPU name or grpc address, for `tpu` only.
    """
    if name not in STRATEGIES:
        raise ValueError(
            f"Unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)}."
        )
    tf = _tf()
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_address)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def use_logical_cpus(count):
    """Splits the CPU into `count` logical devices (before TF initializes)."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}.")
    tf = _tf()
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * count
    )


def is_multi_worker(strategy):
    tf = _tf()
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def prepare_multi_worker_fit(model, x, y):
    """Makes `model.fit` and `evaluate` work under MultiWorkerMirroredStrategy.

    Keras 3.15.1 fails there for any optimizer (keras-team/keras#20585):
    `fit` first reduces a distributed data batch with `strategy.reduce` to
    build the model, which raises; and each step reduces its scalar logs with
    `strategy.reduce("MEAN", v, axis=0)`, which raises for rank 0. So this
    builds the model from a host batch `(x, y)` and skips that step, and gives
    the steps logs of shape (1,). It touches private Keras attributes: call it
    after `compile`, under the strategy's scope, and only for multi-worker.
    """
    from keras import ops

    model._symbolic_build(data_batch=(x, y))
    model._maybe_symbolic_build = lambda *args, **kwargs: None

    def with_vector_logs(step):
        def wrapped(data):
            return {
                key: ops.reshape(value, (1,)) if len(ops.shape(value)) == 0 else value
                for key, value in step(data).items()
            }

        return wrapped

    model.train_step = with_vector_logs(model.train_step)
    model.test_step = with_vector_logs(model.test_step)
