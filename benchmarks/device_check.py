"""One prepared run on an accelerator (issue 20): the update, the training
step and the per-example cost, on KERAS_BACKEND=jax, written as one JSON.

    KERAS_BACKEND=jax python -m benchmarks.device_check [--out PATH] [--cpu]

Measures, all under jit (XLA):

1. **The update.** One `stateless_apply` of Keras SGD(momentum=0.9), LARS
   and CLARS over the variables of keras.applications.ResNet50 (214
   variables, 25.6 M parameters) with fixed random gradients, compiled
   with `jax.jit`; median of interleaved rounds. Ratios CLARS/SGD and
   CLARS/LARS.
2. **The training step.** ResNet-50 at 224x224, `train_on_batch` with
   `jit_compile=True`, in images/s, for SGD, LARS, CLARS (S = 1) and CLARS
   with `gradient_accumulation_steps=4`, interleaved.
3. **The per-example cost.** The same CLARS step with
   `keras_clars.per_example_norms`, against CLARS: the step-time ratio.

`--parts update` runs the first part alone: at full size on a CPU, it is
the JAX row of the XLA update's cost (docs/performance.md).

`--cpu` runs the same code at CI size (a small convolutional model, batch
8, 32x32, two rounds), so that the script cannot rot; tests/
test_device_check.py runs it. Budget on one H200: under 8 minutes
(each model compiles once; the rounds are few).
"""

import argparse
import os
import statistics
import time

from benchmarks import records
from benchmarks.timing import interleaved


def _model(cpu):
    import keras

    if cpu:
        inputs = keras.Input((32, 32, 3))
        x = keras.layers.Conv2D(8, 3, strides=2, use_bias=False)(inputs)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.Activation("relu")(x)
        x = keras.layers.Conv2D(16, 3, strides=2)(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        outputs = keras.layers.Dense(10)(x)
        return keras.Model(inputs, outputs), (32, 32, 3), 10
    model = keras.applications.ResNet50(weights=None, classes=1000,
                                        input_shape=(224, 224, 3),
                                        classifier_activation=None)
    return model, (224, 224, 3), 1000


def _optimizers():
    import keras

    import keras_clars

    hyper = dict(learning_rate=0.1, weight_decay=5e-5)
    return {
        "SGD": lambda **k: keras.optimizers.SGD(0.1, momentum=0.9, **k),
        "LARS": lambda **k: keras_clars.LARS(**hyper, **k),
        "CLARS": lambda **k: keras_clars.CLARS(**hyper, **k),
    }


def update(cpu, rounds):
    import jax
    import numpy as np

    model, _, _ = _model(cpu)
    variables = model.trainable_variables
    rng = np.random.default_rng(0)
    grads = [jax.numpy.asarray(rng.normal(0, 1e-3, v.shape).astype("float32"))
             for v in variables]
    functions = {}
    for name, make in _optimizers().items():
        optimizer = make()
        optimizer.build(variables)
        step = jax.jit(optimizer.stateless_apply)
        state = {"opt": [v.value for v in optimizer.variables],
                 "w": [v.value for v in variables]}

        def call(step=step, state=state):
            w, o = step(state["opt"], grads, state["w"])
            jax.block_until_ready(w)
            state["w"], state["opt"] = w, o

        functions[name] = call
    times = interleaved(functions, rounds)
    medians = {n: statistics.median(t) for n, t in times.items()}
    return {"seconds": medians, "all_s": times,
            "variables": len(variables),
            "parameters": int(sum(np.prod(v.shape) for v in variables)),
            "CLARS/SGD": medians["CLARS"] / medians["SGD"],
            "CLARS/LARS": medians["CLARS"] / medians["LARS"]}


def training(cpu, batch, rounds):
    import keras
    import numpy as np

    import keras_clars

    variants = {name: (make, {}, False) for name, make in _optimizers().items()}
    make_clars = _optimizers()["CLARS"]
    variants["CLARS k=4"] = (make_clars, {"gradient_accumulation_steps": 4}, False)
    variants["CLARS per-example"] = (make_clars, {}, True)
    functions, first = {}, {}
    for name, (make, options, per_example) in variants.items():
        keras.utils.set_random_seed(0)
        model, shape, classes = _model(cpu)
        if per_example:
            model = keras_clars.per_example_norms(model)
        model.compile(optimizer=make(**options), jit_compile=True,
                      loss=keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True))
        rng = np.random.default_rng(0)
        x = rng.normal(size=(batch,) + shape).astype("float32")
        y = rng.integers(0, classes, size=batch).astype("int32")
        start = time.perf_counter()
        model.train_on_batch(x, y)
        first[name] = time.perf_counter() - start
        functions[name] = (lambda m=model, x=x, y=y: m.train_on_batch(x, y))
    times = interleaved(functions, rounds)
    medians = {n: statistics.median(t) for n, t in times.items()}
    return {"batch": batch, "first_step_s": first, "step_s": medians,
            "all_s": times,
            "images_per_s": {n: batch / s for n, s in medians.items()},
            "per_example/CLARS": (medians["CLARS per-example"]
                                  / medians["CLARS"]),
            "per_example_first_step/CLARS": (first["CLARS per-example"]
                                             / first["CLARS"])}


def arguments():
    """The command line (the suite's test parses its plan with it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/device_check.json")
    parser.add_argument("--cpu", action="store_true",
                        help="CI size, on whatever device JAX has")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--parts", default="update,training",
                        help="comma-separated: update, training")
    return parser


def main(argv=None):
    args = arguments().parse_args(argv)
    parts = args.parts.split(",")
    # JAX unless told otherwise, before Keras is imported (here, not at
    # import: a test that imports this module must not change the backend
    # of the processes it starts later).
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import jax
    import keras

    if keras.backend.backend() != "jax":
        raise SystemExit("device_check must run with KERAS_BACKEND=jax; "
                         f"received KERAS_BACKEND={keras.backend.backend()}.")
    batch = args.batch or (8 if args.cpu else 64)
    rounds = args.rounds or (2 if args.cpu else 10)
    started = time.perf_counter()
    record = records.start("benchmarks.device_check", argv)
    record["environment"].update(jax=jax.__version__,
                                 devices=[str(d) for d in jax.devices()])
    record["cpu_size"] = args.cpu
    if "update" in parts:
        record["update"] = update(args.cpu, rounds)
        print(f"update: CLARS/SGD {record['update']['CLARS/SGD']:.2f}, "
              f"CLARS/LARS {record['update']['CLARS/LARS']:.2f}", flush=True)
    if "training" in parts:
        record["training"] = training(args.cpu, batch, rounds)
        for name, rate in record["training"]["images_per_s"].items():
            print(f"training step, {name}: {rate:.1f} images/s", flush=True)
        print(f"per-example/CLARS step: "
              f"{record['training']['per_example/CLARS']:.2f}", flush=True)
    record["seconds_in_all"] = time.perf_counter() - started
    records.write(args.out, record)


if __name__ == "__main__":
    main()
