"""Time to trace one CLARS update, and its step time, next to Keras SGD.

    .venv/bin/python benchmarks/trace_update.py --model densenet121

Big models have hundreds of variables; whatever the update builds per
variable lands on the first step of every `model.fit`.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_clars import CLARS  # noqa: E402

MODELS = {"densenet121": keras.applications.DenseNet121,
          "resnet50": keras.applications.ResNet50}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=sorted(MODELS), default="densenet121")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model = MODELS[args.model](weights=None, input_shape=(32, 32, 3), classes=10)
    variables = model.trainable_variables
    rng = np.random.default_rng(0)
    grads = [tf.constant(rng.random(v.shape, "float32")) for v in variables]
    print(f"{args.model}: {len(variables)} trainable variables")
    for name, optimizer in [("SGD", keras.optimizers.SGD(0.1, momentum=0.9)),
                            ("CLARS", CLARS())]:
        optimizer.build(variables)
        update = tf.function(lambda o=optimizer: o.apply(grads, variables))
        start = time.perf_counter()
        update.get_concrete_function()
        traced = time.perf_counter() - start
        update()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            update()
            times.append(time.perf_counter() - start)
        print(f"{name:>6}: trace {traced:5.1f} s, update median "
              f"{1000 * statistics.median(times):6.1f} ms")


if __name__ == "__main__":
    main()
