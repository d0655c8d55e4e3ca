"""The cost of exact per-example norms, against a plain CLARS step.

    .venv/bin/python -m benchmarks.per_example_cost [--out PATH] [--quick] [--parts P]
        [--backend tensorflow|jax|torch]

Three parts, one run:

1. ResNet-20 (recipes.models.resnet20) on 32x32, batch 128: the compiled
   training step (`train_on_batch`) with plain CLARS (micro-batch samples,
   S = 1) and with `keras_clars.per_example_norms` (S = B). Median step time
   over several steps after warm-up, and peak memory.
2. The same for keras.applications.ResNet50(weights=None) on 224x224, batch
   32, a few steps.
3. The cost of accumulation: CLARS, LARS and Keras SGD, each with
   gradient_accumulation_steps=16, on ResNet-20 (micro-batch 128),
   interleaved in one process; time per micro-step.

Step time: the two variants run side by side in one process, their steps
interleaved. Peak memory: the peak resident set size
(`resource.getrusage(...).ru_maxrss`) of a process over each variant's
first `--warmup` steps while it is the only model in that process, with the
increase over the resident size just before the first step (the step's own
working memory): plain CLARS is built first in the timing process and
measured before the per-example model exists; the per-example model runs
alone in a second process. The first step (trace, compile, step) of each is
timed in the same place, each the first model of a fresh process.
`tf.config.experimental.get_memory_info` does not report CPU devices.

Where a target (1.5x time, 1.5x memory) is missed, the per-layer plan is
printed: each layer's form (outer, explicit, ghost, depthwise), its sizes and
the estimated multiply-adds and memory the norms add. A JSON record goes to
--out (default benchmarks/results/per_example_cost.json).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from benchmarks import records
from benchmarks.timing import interleaved

TARGET = 1.5  # time and peak memory, per-example / CLARS (issue 20)
AIM = 1.2  # what issue 20 aims for (Opacus's ghost clipping: about 1.19x)
FIRST_STEP_TARGET = 2.0  # trace, compile and first step
ACCUMULATION_TARGET = 1.05


def _rss_mb():
    """Current resident set size in MB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(name):
    import keras

    if name == "resnet20":
        from recipes.models import resnet20

        return resnet20((32, 32, 3), 10), (32, 32, 3), 10
    model = keras.applications.ResNet50(weights=None, classes=1000,
                                        input_shape=(224, 224, 3))
    return model, (224, 224, 3), 1000


def _interleaved(models, rounds, calls, x, y):
    """Seconds per `train_on_batch`, each round running `calls` steps of
    every model (`benchmarks.timing.interleaved`, no warm-up)."""
    times = interleaved(
        {name: (lambda m=model: [m.train_on_batch(x, y) for _ in range(calls)])
         for name, model in models.items()}, rounds, warmup=0)
    return {name: [t / calls for t in seconds] for name, seconds in times.items()}


def _data(shape, classes, batch, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch,) + shape).astype("float32")
    y = rng.integers(0, classes, size=batch).astype("int32")
    return x, y


def _compiled(name, variant):
    import keras

    import keras_clars

    keras.utils.set_random_seed(0)
    model, shape, classes = build(name)
    if variant == "per_example":
        model = keras_clars.per_example_norms(model)
    model.compile(
        optimizer=keras_clars.CLARS(learning_rate=0.1, weight_decay=5e-5),
        # ResNet-20 ends in logits, keras.applications in a softmax.
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=name == "resnet20"),
    )
    return model, shape, classes


def child(args):
    """Prints one JSON line.

    --variant clars|per_example: that variant alone in this process (its
    first step and peak memory; `--steps 0` times no further steps).
    --variant both: the two side by side, steps interleaved (their step
    times under the same load); plain CLARS is built first, and its first
    step and peak memory are taken before the per-example model is built.
    """
    variants = (["clars", "per_example"] if args.variant == "both"
                else [args.variant])
    models, first, alone = {}, {}, {}
    for variant in variants:
        model, shape, classes = _compiled(args.model, variant)
        x, y = _data(shape, classes, args.batch)
        before = _rss_mb()
        start = time.perf_counter()
        model.train_on_batch(x, y)  # trace, compile, first step
        first[variant] = time.perf_counter() - start
        for _ in range(args.warmup - 1):
            model.train_on_batch(x, y)
        models[variant] = model
        if not alone:  # the first model of this process: its memory
            alone = {"variant": variant, "rss_before_first_step_mb": before,
                     "peak_rss_mb": _peak_mb(),
                     "step_memory_mb": _peak_mb() - before}
    times = (_interleaved(models, args.steps, 1, x, y) if args.steps
             else {v: [] for v in variants})
    print(json.dumps({
        "model": args.model, "variant": args.variant, "batch": args.batch,
        "first_step_s": first, "alone": alone,
        "step_s": {v: statistics.median(t) for v, t in times.items() if t},
        "step_min_s": {v: min(t) for v, t in times.items() if t},
        "steps": times,
    }))


def run_child(model, variant, batch, steps, warmup):
    command = [sys.executable, "-m", "benchmarks.per_example_cost", "--child",
               "--model", model, "--variant", variant, "--batch", str(batch),
               "--steps", str(steps), "--warmup", str(warmup)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(command, env=env, capture_output=True, text=True,
                            timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"{model}/{variant} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def layer_forms(name, batch):
    """Per supported layer: form, sizes, estimated extra work and memory."""
    import keras

    from keras_clars.per_example import norm_forms

    model, _, _ = build(name)
    layers = {layer.name: layer for layer in
              model._flatten_layers(include_self=False, recursive=True)}
    rows = []
    for layer_name, (form, tokens, k, c) in norm_forms(model, batch).items():
        layer = layers[layer_name]
        t = tokens or 1
        groups = getattr(layer, "groups", 1)
        if form == "outer":
            extra, memory = batch * (k + c), 0
        elif form == "gram":
            extra, memory = batch * t * t * (k + c) * groups, batch * t * t * groups
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            extra, memory = batch * t * k * c, batch * t * k * (c // max(
                layer.depth_multiplier, 1))
        else:
            # The per-example gradient, plus one shifted view of the input.
            kk = layer.kernel_size[0] * layer.kernel_size[1] if hasattr(
                layer, "kernel_size") else 1
            extra = batch * t * k * c * groups
            memory = batch * (k * c * groups + t * k * groups // kk)
        # The kernel gradient of the layer itself, for scale.
        kernel_grad = batch * t * k * c * groups if form != "outer" else batch * k * c
        rows.append({
            "layer": layer_name, "type": type(layer).__name__, "form": form,
            "T": tokens, "K": k, "C": c, "groups": groups,
            "extra_madds": extra, "kernel_grad_madds": kernel_grad,
            "extra_memory_mb": 4 * memory / 2**20,
        })
    return rows


def accumulation(args):
    """CLARS vs LARS vs SGD, k = 16, interleaved; seconds per micro-step."""
    import keras

    import keras_clars
    from recipes.models import resnet20

    k = 16
    makers = {
        "SGD": lambda: keras.optimizers.SGD(0.1, momentum=0.9,
                                            gradient_accumulation_steps=k),
        "LARS": lambda: keras_clars.LARS(learning_rate=0.1, weight_decay=5e-5,
                                         gradient_accumulation_steps=k),
        "CLARS": lambda: keras_clars.CLARS(learning_rate=0.1, weight_decay=5e-5,
                                           gradient_accumulation_steps=k),
    }
    x, y = _data((32, 32, 3), 10, args.accumulation_batch)
    models = {}
    for name, make in makers.items():
        keras.utils.set_random_seed(0)
        model = resnet20((32, 32, 3), 10)
        model.compile(optimizer=make(),
                      loss=keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True))
        for _ in range(k):  # warm-up window: trace, compile, one update
            model.train_on_batch(x, y)
        models[name] = model
    times = _interleaved(models, args.accumulation_rounds, k, x, y)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {
        "k": k, "micro_batch": args.accumulation_batch,
        "rounds": args.accumulation_rounds,
        "micro_step_s": medians, "all_s": times,
        "CLARS/LARS": medians["CLARS"] / medians["LARS"],
        "CLARS/SGD": medians["CLARS"] / medians["SGD"],
        "LARS/SGD": medians["LARS"] / medians["SGD"],
    }


def arguments():
    """The command line (the suite's test parses its plan with it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/per_example_cost.json")
    parser.add_argument("--quick", action="store_true",
                        help="ResNet-20 only, fewer steps (a smoke run)")
    parser.add_argument("--parts", default="resnet20,resnet50,accumulation",
                        help="comma-separated subset of the three parts")
    parser.add_argument("--backend", default=None,
                        help="KERAS_BACKEND for the runs (default: as set)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved timed steps of each variant "
                        "(default: 7 for ResNet-20, 3 for ResNet-50)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--variant", default="clars")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--accumulation_batch", type=int, default=32)
    parser.add_argument("--accumulation_rounds", type=int, default=3)
    return parser


def main(argv=None):
    args = arguments().parse_args(argv)
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    if args.child:
        return child(args)

    import keras

    parts = set(args.parts.split(","))
    cases = []
    if "resnet20" in parts:
        cases.append(("resnet20", 128, args.rounds or (3 if args.quick else 7), 2))
    if "resnet50" in parts and not args.quick:
        cases.append(("resnet50", 32, args.rounds or 3, 1))
    record = records.start("benchmarks.per_example_cost", argv)
    record["models"] = {}
    print(f"per-example norms vs plain CLARS on {keras.backend.backend()}; "
          f"load average {os.getloadavg()}")
    header = (f"{'model':<9} {'batch':>5} {'CLARS s':>9} {'per-ex s':>9} "
              f"{'time x':>7} {'CLARS MB':>9} {'per-ex MB':>9} {'peak x':>7} "
              f"{'step-mem x':>10} {'first x':>8}")
    lines = []
    for model, batch, steps, warmup in cases:
        # Time: both variants in one process, steps interleaved; plain
        # CLARS's memory and first step there, before the per-example
        # model is built. The per-example model's: alone in a process.
        try:
            both = run_child(model, "both", batch, steps, warmup)
            alone = run_child(model, "per_example", batch, 0, warmup)
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            # Keep the other models' rows; say what failed.
            record.setdefault("failed", {})[model] = str(error)[-3000:]
            print(f"{model} failed:\n{str(error)[-3000:]}", flush=True)
            continue
        plain, wrapped = dict(both["alone"]), dict(alone["alone"])
        plain["first_step_s"] = both["first_step_s"]["clars"]
        wrapped["first_step_s"] = alone["first_step_s"]["per_example"]
        plain["batch"] = wrapped["batch"] = batch
        for variant, entry in (("clars", plain), ("per_example", wrapped)):
            entry["step_s"] = both["step_s"][variant]
            entry["step_min_s"] = both["step_min_s"][variant]
        ratios = {
            "time": wrapped["step_s"] / plain["step_s"],
            "time_of_minima": wrapped["step_min_s"] / plain["step_min_s"],
            "peak_memory": wrapped["peak_rss_mb"] / plain["peak_rss_mb"],
            "step_memory": wrapped["step_memory_mb"] / max(plain["step_memory_mb"], 1),
            # Trace, compile and first step, each the first model of its process.
            "first_step": wrapped["first_step_s"] / plain["first_step_s"],
        }
        entry = {"clars": plain, "per_example": wrapped, "ratios": ratios,
                 "timing_run": both}
        missed = (ratios["time"] > TARGET or ratios["peak_memory"] > TARGET
                  or ratios["first_step"] > FIRST_STEP_TARGET)
        plan = layer_forms(model, batch)
        entry["layers"] = plan
        entry["targets_met"] = not missed
        record["models"][model] = entry
        records.write(args.out, record)  # kept if a later model is cut short
        lines.append(
            f"{model:<9} {batch:>5} {plain['step_s']:>9.3f} {wrapped['step_s']:>9.3f} "
            f"{ratios['time']:>7.2f} {plain['peak_rss_mb']:>9.0f} "
            f"{wrapped['peak_rss_mb']:>9.0f} {ratios['peak_memory']:>7.2f} "
            f"{ratios['step_memory']:>10.2f} {ratios['first_step']:>8.2f}")
        print(header + "\n" + lines[-1], flush=True)
        forms = {}
        for row in plan:
            forms[row["form"]] = forms.get(row["form"], 0) + 1
        extra = sum(r["extra_madds"] for r in plan)
        grads = sum(r["kernel_grad_madds"] for r in plan)
        print(f"  forms: {forms}; estimated extra multiply-adds "
              f"{extra / 1e9:.2f} G vs {grads / 1e9:.2f} G for the kernel "
              f"gradients ({extra / grads:.2f}x)")
        if missed:
            print("  target missed; the costliest layers (estimated):")
            for row in sorted(plan, key=lambda r: -r["extra_madds"])[:12]:
                print(f"    {row['layer']:<28} {row['form']:<9} T={row['T']} "
                      f"K={row['K']} C={row['C']} extra "
                      f"{row['extra_madds'] / 1e6:8.1f} M madds "
                      f"({row['extra_madds'] / row['kernel_grad_madds']:.2f}x "
                      f"its kernel gradient), "
                      f"{row['extra_memory_mb']:.1f} MB")

    if "accumulation" in parts:
        print("accumulation, k = 16 (ResNet-20, micro-batch "
              f"{args.accumulation_batch}), seconds per micro-step:", flush=True)
        if args.quick:
            args.accumulation_rounds = 1
        acc = accumulation(args)
        record["accumulation"] = acc
        acc_line = " ".join(f"{n} {s:.4f}" for n, s in acc["micro_step_s"].items())
        print(f"  {acc_line}; CLARS/LARS {acc['CLARS/LARS']:.3f} "
              f"(target <= {ACCUMULATION_TARGET}), CLARS/SGD {acc['CLARS/SGD']:.3f}")
    records.write(args.out, record)
    if record.get("failed"):
        raise SystemExit(f"failed: {sorted(record['failed'])}")
    print("markdown tables: python -m benchmarks.tables " + args.out)

if __name__ == "__main__":
    main()
