"""Time to trace one CLARS / LARS update, and its step time, next to Keras SGD.

    .venv/bin/python -m benchmarks.trace_update --model resnet50
    .venv/bin/python -m benchmarks.trace_update --model densenet121 --steps 4

Big models have hundreds of variables; whatever the update builds per
variable lands on the first step of every `model.fit`. Each optimizer is
traced `--traces` times (a new `tf.function` each time), after one untimed
warm-up trace, and the medians of wall and CPU time are reported, with the
ratio to SGD's: on a shared machine the CPU time is the steadier of the two. `--steps k` traces the update with
gradient accumulation (for SGD too).
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_clars import CLARS, LARS  # noqa: E402

MODELS = {"densenet121": keras.applications.DenseNet121,
          "resnet50": keras.applications.ResNet50}


def trace_times(optimizer, grads, variables, traces):
    """Median wall and CPU seconds to trace `optimizer.apply`, and the fn."""
    walls, cpus = [], []
    for _ in range(traces):
        update = tf.function(lambda o=optimizer: o.apply(grads, variables))
        wall, cpu = time.perf_counter(), time.process_time()
        update.get_concrete_function()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), update


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=sorted(MODELS), default="densenet121")
    parser.add_argument("--traces", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None,
                        help="gradient accumulation steps k (default: none)")
    args = parser.parse_args(argv)
    model = MODELS[args.model](weights=None, input_shape=(32, 32, 3), classes=10)
    variables = model.trainable_variables
    rng = np.random.default_rng(0)
    grads = [tf.constant(rng.random(v.shape, "float32")) for v in variables]
    print(f"{args.model}: {len(variables)} trainable variables, "
          f"k={args.steps or 1}, median of {args.traces} traces")
    optimizers = [
        ("SGD", keras.optimizers.SGD(
            0.1, momentum=0.9, gradient_accumulation_steps=args.steps)),
        ("CLARS", CLARS(gradient_accumulation_steps=args.steps)),
        ("LARS", LARS(gradient_accumulation_steps=args.steps)),
    ]
    # Warm-up, untimed: the first trace in a process also pays TensorFlow's
    # one-time costs, which would otherwise land on SGD's number.
    warm_up = keras.optimizers.SGD(0.1, momentum=0.9)
    warm_up.build(variables)
    trace_times(warm_up, grads, variables, 1)
    baseline = None
    for name, optimizer in optimizers:
        optimizer.build(variables)
        wall, cpu, update = trace_times(optimizer, grads, variables,
                                        args.traces)
        baseline = baseline or (wall, cpu)
        update()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            update()
            times.append(time.perf_counter() - start)
        print(f"{name:>6}: trace {wall:5.2f} s wall ({wall / baseline[0]:.2f}x"
              f" SGD), {cpu:5.2f} s CPU ({cpu / baseline[1]:.2f}x SGD); "
              f"update median {1000 * statistics.median(times):6.1f} ms")


if __name__ == "__main__":
    main()
