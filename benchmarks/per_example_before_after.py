"""The TensorFlow per-example maths before and after it was written once in
keras.ops (issue 18), side by side in one process.

    git show 70bcb8e:keras_clars/_per_example_tf.py > /tmp/old_pe.py
    .venv/bin/python -m benchmarks.per_example_before_after /tmp/old_pe.py

Times `squared_norms` (kernel norms only, compiled with tf.function, dynamic
batch as in `fit`) for ResNet-20's three 3x3 convolution shapes at batch
128, the two versions' rounds interleaved; prints medians and minima.
"""

import importlib.util
import os
import statistics
import sys

from benchmarks.timing import interleaved


def main(before_path, rounds=15):
    import numpy as np
    import keras
    import tensorflow as tf

    from keras_clars import _per_example_norms as after

    spec = importlib.util.spec_from_file_location("before", before_path)
    before = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(before)
    rng = np.random.default_rng(0)
    versions = {"before": [], "after": []}
    for width, size in ((16, 32), (32, 16), (64, 8)):
        layer = keras.layers.Conv2D(width, 3, padding="same")
        shape = (128, size, size, width)
        layer.build(shape)
        a, d = (tf.constant(rng.normal(size=shape).astype("float32"))
                for _ in range(2))
        spec = [tf.TensorSpec((None,) + shape[1:])] * 2
        for name, module in (("before", before), ("after", after)):
            fn = tf.function(
                lambda a, d, layer=layer, module=module:
                module.squared_norms(layer, a, d, True, False)[0],
                input_signature=spec)
            fn(a, d)  # trace
            versions[name].append((fn, a, d))
    times = interleaved(
        {name: (lambda calls=calls: [fn(a, d).numpy() for fn, a, d in calls])
         for name, calls in versions.items()}, rounds, warmup=0)
    print(f"load average {os.getloadavg()}")
    for name, t in times.items():
        print(f"{name}: median {statistics.median(t):.3f} s, "
              f"min {min(t):.3f} s")
    print(f"after/before: median "
          f"{statistics.median(times['after']) / statistics.median(times['before']):.2f}, "
          f"minima {min(times['after']) / min(times['before']):.2f}")


if __name__ == "__main__":
    main(sys.argv[1])
