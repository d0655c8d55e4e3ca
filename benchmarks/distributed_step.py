"""CLARS vs LARS under MirroredStrategy: step time and collectives per update.

    .venv/bin/python -m benchmarks.distributed_step [--devices 4] [--width 8]

1. Step time. A small ResNet-20 (`recipes.models.resnet20`) trains under
   MirroredStrategy on `--devices` logical CPU devices, with CLARS and with
   LARS (no accumulation). The two alternate step by step
   (`benchmarks.timing.interleaved`, `--rounds` x `--steps` steps each, after
   two untimed ones), so both see the same machine load; each step, one call
   of the model's train function as `fit` makes it, is timed in wall time
   and in the process's CPU time over all its threads (less sensitive to
   other processes on a shared machine). Prints the medians, their ratios
   CLARS / LARS, and the number of ops in each traced train step.
2. Collectives. With k = `--accumulation` (default 4), each optimizer's
   train step (`model.train_step` under `strategy.run`, as `fit` runs it) is
   traced once and its graph searched, nested functions included, for
   collective ops. A train step is one micro-step, so an update runs
   k times that many. Prints where they sit and how many elements each
   all-reduce carries: CLARS's packed norm vector adds one per variable.
"""

import argparse
import collections

import numpy as np

from benchmarks import timing

COLLECTIVES = ("Collective", "Nccl", "AllReduce")


def parse():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128, help="global batch")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--accumulation", type=int, default=4)
    return parser.parse_args()


def make_model(strategy, name, width, steps=None):
    import keras

    import keras_clars
    from recipes.models import resnet20

    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = resnet20((32, 32, 3), 10, width=width)
        optimizer = getattr(keras_clars, name)(
            learning_rate=0.1, weight_decay=5e-4, gradient_accumulation_steps=steps
        )
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    return model


def train_step(strategy, model, x, y, batch):
    """One training step as `fit` runs it (the model's train function on a
    distributed iterator), less the callbacks: a zero-argument callable.
    A short `fit` first builds the model, its optimizer and the function."""
    import tensorflow as tf

    model.fit(x[:2 * batch], y[:2 * batch], batch_size=batch, epochs=1, shuffle=False,
              verbose=0)
    # Batches of unknown size, as fit's: the function is not traced again.
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(batch)
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    return lambda: model.train_function(iterator)


def trace_step(strategy, model, x, y, batch):
    """The graph of one train step, as `fit` runs it."""
    import tensorflow as tf

    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)
    )

    @tf.function
    def train_step(data):
        return strategy.run(model.train_step, args=(data,))

    return train_step.get_concrete_function(next(iter(dataset))).graph


def count_ops(graph):
    definition = graph.as_graph_def()
    return len(definition.node) + sum(
        len(f.node_def) for f in definition.library.function
    )


def count_collectives(graph):
    """Collective ops of a step: ({type: count} in the graph, in nested
    functions), and the element counts of what they reduce."""
    definition = graph.as_graph_def()
    top = collections.Counter(
        n.op for n in definition.node if n.op.startswith(COLLECTIVES)
    )
    nested = collections.Counter(
        n.op
        for f in definition.library.function
        for n in f.node_def
        if n.op.startswith(COLLECTIVES)
    )
    elements = sorted(
        {
            int(np.prod(op.inputs[0].shape))
            for op in graph.get_operations()
            if op.type.startswith(COLLECTIVES)
        }
    )
    return top, nested, elements


def main():
    args = parse()
    from recipes import strategies

    strategies.use_logical_cpus(args.devices)
    import tensorflow as tf

    strategy = strategies.make_strategy("mirrored")
    replicas = strategy.num_replicas_in_sync
    rng = np.random.default_rng(0)
    n = args.batch * args.steps
    x = rng.normal(size=(n, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=n).astype("int32")
    print(f"TensorFlow {tf.__version__}, {replicas} replicas on logical CPUs, "
          f"cross-device ops: {type(strategy.extended._cross_device_ops).__name__}")

    # 1. Step time, interleaved.
    models = {name: make_model(strategy, name, args.width) for name in ("LARS", "CLARS")}
    print(f"resnet20 width {args.width}: "
          f"{models['LARS'].count_params()} parameters, "
          f"{len(models['LARS'].trainable_variables)} trainable variables, "
          f"global batch {args.batch} ({args.batch // replicas} per replica)")
    # Two untimed steps each (a new iterator may retrace the function).
    times = timing.interleaved(
        {name: train_step(strategy, m, x, y, args.batch) for name, m in models.items()},
        args.rounds * args.steps, warmup=2)
    for clock, seconds in (("wall", times), ("CPU", times.cpu)):
        medians = {}
        for name, t in seconds.items():
            t = np.array(t) * 1e3
            medians[name] = timing.median(t)
            print(f"{name:5s} {clock} time per step: median {medians[name]:8.2f} ms "
                  f"over {len(t)} steps (quartiles {np.percentile(t, 25):.2f}-"
                  f"{np.percentile(t, 75):.2f} ms)")
        print(f"{clock}-time ratio CLARS / LARS (medians): "
              f"{medians['CLARS'] / medians['LARS']:.3f}")
    for name, model in models.items():
        print(f"{name}: {count_ops(trace_step(strategy, model, x, y, args.batch))} "
              "ops in the traced train step (nested functions included)")

    # 2. Collectives per update with accumulation.
    k = args.accumulation
    for name in ("LARS", "CLARS"):
        model = make_model(strategy, name, args.width, steps=k)
        train_step(strategy, model, x, y, args.batch)  # its fit builds the optimizer
        top, nested, elements = count_collectives(
            trace_step(strategy, model, x, y, args.batch)
        )
        per_step = sum(top.values()) + sum(nested.values())
        print(f"{name} k={k}: per micro-step {dict(top)} in the step's graph, "
              f"{dict(nested) or 'none'} inside nested functions (conditional "
              f"branches); = {per_step // replicas} all-reduce per micro-step "
              f"({per_step} ops, one per replica), {k * per_step // replicas} per "
              f"update; elements per all-reduce: {elements} "
              f"(trainable parameters: {model.count_params() - sum(int(np.prod(v.shape)) for v in model.non_trainable_variables)}, "
              f"variables: {len(model.trainable_variables)})")


if __name__ == "__main__":
    main()
