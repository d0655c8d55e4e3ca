"""tf.distribute strategies for the recipes, tests and benchmarks.

The optimizers need none of this: they work under whatever strategy is in
scope. Creating one (TPU start-up included), splitting the CPU into logical
devices for tests, and the multi-worker `fit` workaround are recipe concerns.
"""

import tensorflow as tf
from keras import ops

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")


def make_strategy(name="default", tpu_address=None):
    """The strategy factory shared by tests, benchmarks and recipes.

    Args:
        name: one of `default`, `mirrored`, `multi_worker`, `tpu`.
        tpu_address: the TPU name or grpc address, for `tpu` only.
    """
    if name not in STRATEGIES:
        raise ValueError(
            f"strategy must be one of {', '.join(STRATEGIES)}; received "
            f"strategy={name!r}."
        )
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
        raise ValueError(f"count must be >= 1; received count={count}.")
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * count
    )


def is_multi_worker(strategy):
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def build_before_fit(model, x, y):
    """Builds `model` from a host batch `(x, y)`: `fit` then reads no batch first.

    Under a tf.distribute strategy, Keras 3.15.1's `fit` and `evaluate`
    first draw one batch from a throw-away iterator of the data to build the
    model (`_maybe_symbolic_build`). On a training stream shuffled with a
    seed, that iteration advances the shuffle's seed generator (each
    iteration reshuffles), by as many epochs as it reads: the training
    iterator made next is shuffled with later seeds, and a resumed run that
    `skip`s into the stream draws other seeds than the uninterrupted run.
    This builds the model here and turns that step off, so the training
    stream is read once, from its start. It touches private Keras
    attributes: call it after `compile`, under the strategy's scope.
    """
    model._symbolic_build(data_batch=(x, y))
    model._maybe_symbolic_build = lambda *args, **kwargs: None


def prepare_multi_worker_fit(model, x, y):
    """Makes `model.fit` and `evaluate` work under MultiWorkerMirroredStrategy.

    Keras 3.15.1 fails there for any optimizer (keras-team/keras#20585):
    `fit` first reduces a distributed data batch with `strategy.reduce` to
    build the model, which raises; and each step reduces its scalar logs with
    `strategy.reduce("MEAN", v, axis=0)`, which raises for rank 0. So this
    builds the model from a host batch `(x, y)` and skips that step
    (`build_before_fit`), and gives the steps logs of shape (1,). It touches
    private Keras attributes: call it after `compile`, under the strategy's
    scope, and only for multi-worker.
    """
    build_before_fit(model, x, y)

    def with_vector_logs(step):
        def wrapped(data):
            return {
                key: ops.reshape(value, (1,)) if len(ops.shape(value)) == 0 else value
                for key, value in step(data).items()
            }

        return wrapped

    model.train_step = with_vector_logs(model.train_step)
    model.test_step = with_vector_logs(model.test_step)
