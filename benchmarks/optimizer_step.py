"""The cost of one CLARS / LARS update, next to Keras SGD with momentum.

Two parts, each timed side by side in one run, interleaved in a shuffled
order per round, reported as medians (other work on the machine slows all
contestants alike within a round):

- `update`: one `optimizer.apply` over the 214 trainable variables (25.6 M
  parameters) of `keras.applications.ResNet50(weights=None)` with fixed
  random gradients, inside `tf.function(jit_compile=...)`, jit off and on.
  Also the bytes an update must move at least (read w, g, v; write w, v).
- `train`: a full ResNet-50 training step (forward, backward, update) on a
  small batch of small images via `model.train_on_batch`, jit off (what
  Keras's `jit_compile="auto"` picks on CPU), CLARS vs SGD with momentum.

    python -m benchmarks.optimizer_step                 # both parts
    python -m benchmarks.optimizer_step --parts update --repeats 9
    python -m benchmarks.optimizer_step --out benchmarks/results/optimizer_step.json

With --out, the medians, minima and ratios go to a JSON record
(`benchmarks.records`; `python -m benchmarks.tables` prints its tables).
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import keras  # noqa: E402

from benchmarks import records, timing  # noqa: E402
from keras_clars import CLARS, LARS  # noqa: E402

TARGETS = {"CLARS/SGD": 1.5, "CLARS/LARS": 1.05, "train CLARS/SGD": 1.03}


def _optimizers(steps):
    """Same hyperparameters as a LARS ImageNet run; SGD is Keras's own."""
    return {
        "SGD": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
        "LARS": lambda: LARS(1.0, momentum=0.9, weight_decay=5e-5,
                             gradient_accumulation_steps=steps),
        "CLARS": lambda: CLARS(1.0, momentum=0.9, weight_decay=5e-5,
                               gradient_accumulation_steps=steps),
    }


def _time_interleaved(candidates, repeats, inner):
    """{name: [seconds per call]}: each sample is `inner` calls in a row
    (`benchmarks.timing.interleaved`; the first call was made, and timed,
    by the caller)."""
    def batch(function):
        def call():
            for _ in range(inner):
                function()
        return call

    times = timing.interleaved({name: batch(f) for name, f in candidates.items()},
                               repeats, warmup=0)
    return {name: [t / inner for t in seconds] for name, seconds in times.items()}


def _report(times, pairs, label):
    """Prints medians and ratios; under contention the ratio of the minima
    (the least disturbed sample of each) is printed too."""
    medians = {name: timing.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"  {label}{name:>18}: median {medians[name] * 1e3:8.1f} ms "
              f"(min {min(t) * 1e3:.1f}, max {max(t) * 1e3:.1f}, n={len(t)})")
    ratios, minima = {}, {}
    for a, b in pairs:
        ratios[(a, b)] = medians[a] / medians[b]
        minima[f"{a}/{b}"] = min(times[a]) / min(times[b])
        print(f"  {label}{a + ' / ' + b:>18}: {ratios[(a, b)]:.3f} "
              f"(of minima: {minima[f'{a}/{b}']:.3f})")
    return medians, ratios, {
        "median_ms": {n: 1e3 * m for n, m in medians.items()},
        "min_ms": {n: 1e3 * min(t) for n, t in times.items()},
        "n": {n: len(t) for n, t in times.items()},
        "ratios": {f"{a}/{b}": r for (a, b), r in ratios.items()},
        "ratios_of_minima": minima}


def bytes_floor(num_params, itemsize=4, steps=None):
    """Bytes one update must move at least, per optimizer.

    Every optimizer reads w, g, v and writes w, v once (5 passes). The
    layer-wise ones also need ||w|| and ||g|| before they can scale the
    update, so unless a kernel keeps a layer in cache they read w and g
    twice (7 passes). With accumulation, a micro-step that does not update
    reads and writes the accumulator (2) and the update step reads it (1).
    """
    one = num_params * itemsize
    floors = {"SGD": 5 * one, "LARS": 5 * one, "CLARS": 5 * one}
    two_pass = {"SGD": 5 * one, "LARS": 7 * one, "CLARS": 7 * one}
    if steps:
        for d in (floors, two_pass):
            for name in ("LARS", "CLARS"):
                d[name] += one
    return floors, two_pass


def bench_update(args):
    import tensorflow as tf

    model = keras.applications.ResNet50(weights=None)
    variables = model.trainable_variables
    params = sum(int(np.prod(v.shape)) for v in variables)
    print(f"ResNet50(weights=None): {len(variables)} trainable variables, "
          f"{params / 1e6:.2f} M parameters")
    rng = np.random.default_rng(0)
    grads = [tf.constant(1e-3 * rng.standard_normal(v.shape, np.float32))
             for v in variables]

    floors, two_pass = bytes_floor(params, steps=args.steps)
    print("Bytes one update must move (MB), 1 pass over w,g,v,w',v' / with "
          "a separate norm pass:")
    for name in floors:
        print(f"  {name:>6}: {floors[name] / 1e6:7.1f} / "
              f"{two_pass[name] / 1e6:7.1f}")

    results, summary = {}, {"variables": len(variables), "parameters": params}
    for jit in args.jit:
        candidates, first = {}, {}
        for name, make in _optimizers(args.steps).items():
            optimizer = make()
            optimizer.build(variables)
            # Variables are captured, gradients too: one call = one apply.
            step = tf.function(lambda o=optimizer: o.apply(grads),
                               jit_compile=jit)
            start = time.perf_counter()
            step()
            first[name] = time.perf_counter() - start
            print(f"  jit={jit} {name}: trace+compile+first call "
                  f"{first[name]:.1f} s")
            candidates[name] = step
        times = _time_interleaved(candidates, args.repeats, args.inner)
        medians, ratios, summary[f"jit={jit}"] = _report(
            times, [("CLARS", "SGD"), ("LARS", "SGD"), ("CLARS", "LARS")],
            f"jit={str(jit):5} ")
        summary[f"jit={jit}"]["first_call_s"] = first
        for name, m in medians.items():
            print(f"  jit={str(jit):5} {name:>18}: {floors[name] / m / 1e9:.2f}"
                  " GB/s of the 1-pass floor")
        results[jit] = ratios
    return results, summary


def bench_norms(args):
    """The update's 214 weight norms alone, four ways, jit off and on.

    `l2_loss`: what the update computes without XLA (`keras_clars
    ._tensorflow.squared_norms`), and computed before under XLA too.
    `(-1,8) columns`: 8 interleaved partial sums first.
    `dot`: x . x, one dot-product kernel per tensor (a matrix-unit product
    on accelerators, where float32 may run at reduced precision: TF32).
    `blocked dot`: `keras_clars._tensorflow._blocked_dot`, what the update
    computes under XLA on a CPU: rows of up to 1024, a dot product per row,
    then their sum.
    The variables are read inside the function, as in the update (XLA
    gets them as parameters, not constants).
    """
    import tensorflow as tf

    from keras_clars import _tensorflow

    model = keras.applications.ResNet50(weights=None)
    variables = [v.value for v in model.trainable_variables]

    def flat():
        return [tf.reshape(tf.convert_to_tensor(v), [-1]) for v in variables]

    def l2_loss():  # squared_norms without XLA, under XLA too
        return 2.0 * tf.stack([tf.nn.l2_loss(x) for x in flat()])

    def columns():
        out = []
        for x in flat():
            x = tf.square(x)
            if x.shape[0] % 8 == 0 and x.shape[0] >= 64:
                x = tf.reduce_sum(tf.reshape(x, (-1, 8)), axis=0)
            out.append(tf.reduce_sum(x))
        return tf.stack(out)

    def dot():
        return tf.stack([tf.tensordot(x, x, 1) for x in flat()])

    def blocked_dot():  # what the update takes under XLA on a CPU
        return tf.stack([_tensorflow._blocked_dot(x) for x in flat()])

    candidates = {}
    for jit in args.jit:
        for name, fn in (("l2_loss", l2_loss), ("(-1,8) columns", columns),
                         ("dot", dot), ("blocked dot", blocked_dot)):
            candidates[f"{name} jit={jit}"] = tf.function(fn, jit_compile=jit)
    values = {k: f().numpy() for k, f in candidates.items()}
    first = next(iter(values.values()))
    differences = {}
    for k, v in values.items():
        differences[k] = float(np.max(np.abs(v - first) / np.maximum(first, 1e-30)))
        print(f"  norms {k}: max relative difference {differences[k]:.1e}")
    times = _time_interleaved(candidates, args.repeats, args.inner)
    pairs = [(f"{name} jit={jit}", f"l2_loss jit={jit}") for jit in args.jit
             for name in ("(-1,8) columns", "dot", "blocked dot")]
    if len(args.jit) == 2:
        pairs.append(("l2_loss jit=True", "l2_loss jit=False"))
    _, _, summary = _report(times, pairs, "norms ")
    summary["max_relative_difference"] = differences
    return summary


def bench_trace(args):
    """Python tracing time of one update (no compile, no run), jit off."""
    import tensorflow as tf

    model = keras.applications.ResNet50(weights=None)
    variables = model.trainable_variables
    grads = [tf.zeros(v.shape) for v in variables]
    for name, make in _optimizers(args.steps).items():
        optimizer = make()
        optimizer.build(variables)
        start = time.perf_counter()
        graph = tf.function(lambda o=optimizer: o.apply(grads)) \
            .get_concrete_function().graph
        print(f"  trace {name:>6}: {time.perf_counter() - start:6.1f} s, "
              f"{len(graph.get_operations())} top-level graph ops")


def bench_train(args):
    import tensorflow as tf

    size, batch = args.image_size, args.batch
    rng = np.random.default_rng(0)
    x = tf.constant(rng.random((batch, size, size, 3), np.float32))
    y = tf.constant(rng.integers(0, 10, batch))
    candidates, models = {}, {}
    for name in ("SGD", "CLARS"):
        keras.utils.set_random_seed(0)
        model = keras.applications.ResNet50(
            weights=None, input_shape=(size, size, 3), classes=10)
        model.compile(optimizer=_optimizers(None)[name](),
                      loss="sparse_categorical_crossentropy",
                      jit_compile=args.train_jit)
        start = time.perf_counter()
        model.train_on_batch(x, y)
        print(f"  train {name}: first step {time.perf_counter() - start:.1f} s")
        models[name] = model
        candidates[name] = lambda m=model: m.train_on_batch(x, y)
    print(f"Full training step: ResNet50 at {size}x{size}, batch {batch}, "
          f"jit_compile={args.train_jit}")
    times = _time_interleaved(candidates, args.repeats, args.train_inner)
    _, ratios, summary = _report(times, [("CLARS", "SGD")], "train ")
    summary.update(image_size=size, batch=batch, jit_compile=args.train_jit)
    return ratios, summary


def arguments():
    """The command line (the suite's test parses its plan with it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="update,train",
                        help="comma-separated: update, train, and the "
                        "diagnostics norms (XLA reductions), trace")
    parser.add_argument("--repeats", type=int, default=9,
                        help="interleaved rounds; the median is reported")
    parser.add_argument("--inner", type=int, default=3,
                        help="updates per timed sample")
    parser.add_argument("--jit", default="off,on",
                        help="comma-separated jit_compile settings: off, on")
    parser.add_argument("--steps", type=int, default=None,
                        help="gradient_accumulation_steps for LARS/CLARS "
                        "(each timed call is then one micro-step)")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--train_inner", type=int, default=2,
                        help="training steps per timed sample")
    parser.add_argument("--train_jit", action="store_true",
                        help="jit_compile=True for the training step")
    parser.add_argument("--out", default=None,
                        help="a JSON record of the results (default: none)")
    return parser


def main(argv=None):
    args = arguments().parse_args(argv)
    args.jit = [{"off": False, "on": True}[j] for j in args.jit.split(",")]
    parts = args.parts.split(",")

    import tensorflow as tf

    print(f"python {sys.version.split()[0]}, tensorflow {tf.__version__}, "
          f"keras {keras.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    record = records.start("benchmarks.optimizer_step", argv)
    ratios = {}
    if "update" in parts:
        by_jit, record["update"] = bench_update(args)
        for jit, r in by_jit.items():
            ratios[f"jit={jit} CLARS/SGD"] = (r[("CLARS", "SGD")], "CLARS/SGD")
            ratios[f"jit={jit} CLARS/LARS"] = (r[("CLARS", "LARS")],
                                               "CLARS/LARS")
    if "norms" in parts:
        record["norms"] = bench_norms(args)
    if "trace" in parts:
        bench_trace(args)
    if "train" in parts:
        r, record["train"] = bench_train(args)
        ratios["train CLARS/SGD"] = (r[("CLARS", "SGD")], "train CLARS/SGD")
    print(f"load average {os.getloadavg()[0]:.1f} at end")
    print("Against the targets:")
    for label, (value, target) in ratios.items():
        verdict = "met" if value <= TARGETS[target] else "MISSED"
        print(f"  {label:>22}: {value:.3f} (target <= {TARGETS[target]}) "
              f"{verdict}")
    if args.out:
        record["targets"] = TARGETS
        records.write(args.out, record)


if __name__ == "__main__":
    main()
