"""Time to trace one CLARS / LARS update, and its step time, next to Keras SGD.

    .venv/bin/python -m benchmarks.trace_update --model resnet50
    .venv/bin/python -m benchmarks.trace_update --model densenet121 --steps 4

Big models have hundreds of variables; whatever the update builds per
variable lands on the first step of every `model.fit`. Each optimizer is
traced `--traces` times (a new `tf.function` each time), interleaved with
the others (`benchmarks.timing`), after one untimed warm-up round, and the
medians of wall and CPU time are reported, with the ratio to SGD's: on a
shared machine the CPU time is the steadier of the two. The update time is
the median of `--repeats` interleaved calls of the last traced update.
`--steps k` traces the update with gradient accumulation (for SGD too).
`--out PATH` writes the medians and ratios as a JSON record.
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks import records, timing  # noqa: E402
from keras_clars import CLARS, LARS  # noqa: E402

MODELS = {"densenet121": keras.applications.DenseNet121,
          "resnet50": keras.applications.ResNet50}


def tracer(optimizers, name, grads, variables, traced):
    """A call that traces `optimizers[name].apply` anew (a new `tf.function`);
    the traced function is kept in `traced[name]`, for the step time."""
    def trace():
        update = tf.function(lambda o=optimizers[name]: o.apply(grads, variables))
        update.get_concrete_function()
        traced[name] = update
    return trace


def arguments():
    """The command line (the suite's test parses its plan with it)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=sorted(MODELS), default="densenet121")
    parser.add_argument("--traces", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None,
                        help="gradient accumulation steps k (default: none)")
    parser.add_argument("--out", default=None,
                        help="a JSON record of the results (default: none)")
    return parser


def main(argv=None):
    args = arguments().parse_args(argv)
    record = records.start("benchmarks.trace_update", argv)
    model = MODELS[args.model](weights=None, input_shape=(32, 32, 3), classes=10)
    variables = model.trainable_variables
    rng = np.random.default_rng(0)
    grads = [tf.constant(rng.random(v.shape, "float32")) for v in variables]
    print(f"{args.model}: {len(variables)} trainable variables, "
          f"k={args.steps or 1}, median of {args.traces} traces")
    optimizers = {
        "SGD": keras.optimizers.SGD(
            0.1, momentum=0.9, gradient_accumulation_steps=args.steps),
        "CLARS": CLARS(gradient_accumulation_steps=args.steps),
        "LARS": LARS(gradient_accumulation_steps=args.steps),
    }
    for optimizer in optimizers.values():
        optimizer.build(variables)
    # One untimed round first: the first trace in a process also pays
    # TensorFlow's one-time costs, which would otherwise land on one number.
    traced = {}
    traces = timing.interleaved(
        {name: tracer(optimizers, name, grads, variables, traced) for name in optimizers},
        args.traces)
    updates = timing.interleaved(traced, args.repeats)
    wall0, cpu0 = timing.median(traces["SGD"]), timing.median(traces.cpu["SGD"])
    update0 = timing.median(updates["SGD"])
    results = {}
    for name in optimizers:
        wall, cpu = timing.median(traces[name]), timing.median(traces.cpu[name])
        update = timing.median(updates[name])
        print(f"{name:>6}: trace {wall:5.2f} s wall ({wall / wall0:.2f}x"
              f" SGD), {cpu:5.2f} s CPU ({cpu / cpu0:.2f}x SGD); "
              f"update median {1000 * update:6.1f} ms")
        results[name] = {
            "trace_wall_s": wall, "trace_cpu_s": cpu, "update_ms": 1e3 * update,
            "trace_wall/SGD": wall / wall0, "trace_cpu/SGD": cpu / cpu0,
            "update/SGD": update / update0}
    if args.out:
        record.update(model=args.model, variables=len(variables),
                      k=args.steps or 1, traces=args.traces,
                      repeats=args.repeats, optimizers=results)
        records.write(args.out, record)


if __name__ == "__main__":
    main()
