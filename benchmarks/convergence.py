"""The evidence study: SGD, LARS and CLARS at a large batch on Fashion-MNIST.

Tests the paper's three claims at small scale (docs/results.md): CLARS needs
no warmup, beats gradual warmup (SGD + linear scaling + warmup) by a large
margin, and converges faster than LARS with warmup.

    .venv/bin/python benchmarks/convergence.py --out docs/results

Phases, in order (each run writes `<out>/runs/<key>.json`; a rerun skips the
runs already written, so the study can be stopped and resumed in parts):

1. `tune`: one seed, `--tune_epochs`; each method's peak learning rate over
   the same multiplicative grid (and the trust coefficient for LARS/CLARS),
   chosen on the validation split's accuracy at the last epoch.
2. `final`: the chosen configurations, `--seeds`, `--epochs`; test accuracy
   recorded per epoch (never used to choose). LARS/CLARS seed 0 also log
   per-layer statistics every update (keras_clars.callbacks).
3. `ablation`: CLARS with warmup, LARS without, CLARS at other slice sizes b.

Gradient samples come from accumulation micro-steps (one device): every
method trains with `batch_size=b` (the micro-batch) and
`gradient_accumulation_steps=B/b`, so one update sees B examples, CLARS has
S = B/b samples, and BatchNorm normalizes over each micro-batch of b for all
methods alike. All schedules are counted in updates.

Runs on any Keras backend from in-memory NumPy arrays (`--backend jax`).
"""

import argparse
import csv
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("sgd", "lars", "clars")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs/results", help="results folder")
    p.add_argument("--img", default=None, help="PNG folder (default: <out>/img)")
    p.add_argument("--backend", default=None, help="Keras backend (tensorflow, jax)")
    p.add_argument("--methods", default="sgd,lars,clars")
    p.add_argument("--batch_sizes", default="4096", help="large global batches B")
    p.add_argument("--micro_batch", type=int, default=256,
                   help="slice size b: micro-batch of every method")
    p.add_argument("--small_batch", type=int, default=256,
                   help="batch of the small-batch SGD reference; 0: none")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--tune_epochs", type=int, default=3)
    p.add_argument("--grid", default="0.1111,0.3333,1,3",
                   help="multipliers of each method's reference peak rate")
    p.add_argument("--sgd_base_lr", type=float, default=0.1,
                   help="SGD reference rate per 256 examples (linear scaling)")
    p.add_argument("--layerwise_step", type=float, default=0.01,
                   help="LARS/CLARS reference lr * trust_coefficient")
    p.add_argument("--trust_coefficients", default="0.001,0.01")
    p.add_argument("--warmup_fraction", type=float, default=5 / 90,
                   help="warmup updates / all updates (paper: 5 of 90 epochs)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--ablation_micro_batches", default="64,1024")
    p.add_argument("--ablation_seeds", default="0")
    p.add_argument("--no_ablations", action="store_true")
    p.add_argument("--train_size", type=int, default=49152)
    p.add_argument("--val_size", type=int, default=10848)
    p.add_argument("--test_size", type=int, default=10000)
    p.add_argument("--image_size", type=int, default=14, choices=(14, 28),
                   help="14: 2x2 average-pooled images (4x less compute)")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--loss_target", type=float, default=0.5,
                   help="training loss for the 'epochs to target' column")
    p.add_argument("--quick", action="store_true",
                   help="tiny end-to-end run (the test): sgd+clars, 1 epoch")
    args = p.parse_args(argv)
    if args.quick:
        args.methods, args.batch_sizes, args.micro_batch = "sgd,clars", "256", 64
        args.small_batch, args.seeds, args.epochs, args.tune_epochs = 0, "0", 1, 1
        args.grid, args.trust_coefficients, args.no_ablations = "1", "0.01", True
        args.train_size, args.val_size, args.test_size = 512, 256, 256
        args.width = 4
    return args


def _ints(text):
    return [int(v) for v in text.split(",") if v.strip()]


def _floats(text):
    return [float(v) for v in text.split(",") if v.strip()]


def check_args(args):
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"--methods: unknown method {m!r}; expected {METHODS}.")
    for B in _ints(args.batch_sizes) + ([args.small_batch] if args.small_batch else []):
        if B % args.micro_batch or args.train_size % B:
            raise ValueError(
                f"batch {B} must be a multiple of --micro_batch={args.micro_batch} "
                f"and divide --train_size={args.train_size}."
            )
    for b in [] if args.no_ablations else _ints(args.ablation_micro_batches):
        for B in _ints(args.batch_sizes)[:1]:
            if B % b:
                raise ValueError(f"--ablation_micro_batches: {b} does not divide B={B}.")
    if args.train_size + args.val_size > 60000:
        raise ValueError(
            f"--train_size + --val_size must be <= 60000; received "
            f"{args.train_size} + {args.val_size}."
        )
    if min(args.epochs, args.tune_epochs) < 1:
        raise ValueError(f"epochs must be >= 1; received {args.epochs}, {args.tune_epochs}.")
    return methods


# ------------------------------------------------------------------ data


def load_data(args):
    """Train/validation (held out of the 60k) and test arrays, standardized."""
    import numpy as np

    from recipes.fashion_mnist import load_fashion_mnist

    def prepare(images):
        x = images.astype("float32") / 255.0
        if args.image_size == 14:
            x = x.reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4))
        return ((x - 0.2860) / 0.3530)[..., None]

    images, labels = load_fashion_mnist("train")
    order = np.random.default_rng(1234).permutation(len(images))
    train = order[: args.train_size]
    val = order[args.train_size : args.train_size + args.val_size]
    test_x, test_y = load_fashion_mnist("test")
    return {
        "train": (prepare(images[train]), labels[train].astype("int32")),
        "val": (prepare(images[val]), labels[val].astype("int32")),
        "test": (prepare(test_x[: args.test_size]), test_y[: args.test_size].astype("int32")),
    }


# ------------------------------------------------------------------ runs


def run_key(spec):
    eta = f"_eta{spec['trust_coefficient']:g}" if spec["method"] != "sgd" else ""
    warm = "warm" if spec["warmup"] else "nowarm"
    return (
        f"{spec['phase']}_{spec['method']}_B{spec['batch']}_b{spec['micro_batch']}"
        f"_lr{spec['peak_lr']:.4g}{eta}_{warm}_e{spec['epochs']}_s{spec['seed']}"
    )


def make_optimizer(spec, total_updates):
    import keras

    import keras_clars
    from keras_clars.schedules import WarmupDecay
    from keras_clars.schedules import PerUpdate

    k = spec["batch"] // spec["micro_batch"]
    warmup = spec["warmup_updates"] if spec["warmup"] else 0
    schedule = WarmupDecay(spec["peak_lr"], total_updates, warmup, "poly", power=2.0)
    accumulation = k if k > 1 else None
    if spec["method"] == "sgd":
        # Keras core evaluates schedules at the micro-step count when it
        # accumulates; PerUpdate divides by k, so all methods count updates.
        return keras.optimizers.SGD(
            PerUpdate(schedule, k) if accumulation else schedule,
            momentum=spec["momentum"], gradient_accumulation_steps=accumulation,
        )
    cls = keras_clars.CLARS if spec["method"] == "clars" else keras_clars.LARS
    return cls(
        schedule, momentum=spec["momentum"],
        trust_coefficient=spec["trust_coefficient"],
        gradient_accumulation_steps=accumulation,
    )


def _update_loss_callback(k, losses):
    """Records each update's mean training loss (over its k micro-batches)."""
    import keras

    class UpdateLoss(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self._seen, self._mean = 0, 0.0

        def on_train_batch_end(self, batch, logs=None):
            seen = batch + 1
            if seen % k:
                return
            # logs["loss"] is the running mean since the epoch began.
            mean = float(logs["loss"])
            losses.append((mean * seen - self._mean * self._seen) / (seen - self._seen))
            self._seen, self._mean = seen, mean

    return UpdateLoss()


def train_one(spec, data, args, out):
    """Trains one configuration; returns its result dict (also written)."""
    import keras
    import numpy as np

    from keras_clars.callbacks import LayerStatisticsLogger
    from recipes.models import resnet20

    keras.utils.set_random_seed(spec["seed"])
    x, y = data["train"]
    k = spec["batch"] // spec["micro_batch"]
    updates_per_epoch = len(x) // spec["batch"]
    total_updates = updates_per_epoch * spec["epochs"]
    model = resnet20(x.shape[1:], 10, width=args.width, depth=args.depth, bn_momentum=0.9)
    optimizer = make_optimizer(spec, total_updates)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    update_losses = []
    callbacks = [_update_loss_callback(k, update_losses)]
    stats_path = None
    if spec["layer_statistics"]:
        stats_path = os.path.join(out, "layer_statistics", run_key(spec) + ".json")
        callbacks.append(LayerStatisticsLogger(interval=1, json_path=stats_path))

    history = {m: [] for m in ("train_loss", "train_acc", "val_acc", "val_loss",
                               "test_acc", "epoch_time")}
    for epoch in range(spec["epochs"]):
        start = time.perf_counter()
        logs = model.fit(
            x, y, batch_size=spec["micro_batch"], epochs=epoch + 1,
            initial_epoch=epoch, shuffle=True, verbose=0, callbacks=callbacks,
        ).history
        history["epoch_time"].append(time.perf_counter() - start)
        history["train_loss"].append(float(logs["loss"][-1]))
        history["train_acc"].append(float(logs["accuracy"][-1]))
        val = model.evaluate(*data["val"], batch_size=1024, verbose=0, return_dict=True)
        history["val_loss"].append(float(val["loss"]))
        history["val_acc"].append(float(val["accuracy"]))
        if spec["evaluate_test"]:
            test = model.evaluate(*data["test"], batch_size=1024, verbose=0, return_dict=True)
            history["test_acc"].append(float(test["accuracy"]))
    skipped = getattr(optimizer, "non_finite_updates", None)
    result = dict(
        spec,
        key=run_key(spec),
        backend=keras.backend.backend(),
        accumulation_steps=k,
        gradient_samples=k,
        updates_per_epoch=updates_per_epoch,
        total_updates=total_updates,
        warmup_updates_used=spec["warmup_updates"] if spec["warmup"] else 0,
        update_loss=update_losses,
        non_finite_updates=None if skipped is None else int(np.asarray(skipped)),
        layer_statistics_file=stats_path and os.path.relpath(stats_path, out),
        **history,
    )
    return result


def execute(spec, data, args, out):
    from keras_clars.callbacks import _write_json_atomically as write_json_atomically

    path = os.path.join(out, "runs", run_key(spec) + ".json")
    if os.path.exists(path):
        with open(path) as f:
            done = json.load(f)
        # Resume only a run of exactly this configuration.
        if all(done.get(k) == v for k, v in spec.items()):
            return done
    start = time.time()
    result = train_one(spec, data, args, out)
    result["run_seconds"] = time.time() - start
    write_json_atomically(path, result)
    last = result["val_acc"][-1]
    test = f" test {result['test_acc'][-1]:.4f}" if result["test_acc"] else ""
    print(f"[{time.strftime('%H:%M:%S')}] {result['key']}: val {last:.4f}{test} "
          f"loss {result['train_loss'][-1]:.4f} ({result['run_seconds']:.0f} s)",
          flush=True)
    return result


# ------------------------------------------------------------- the study


def base_spec(args, method, batch, peak_lr, eta, phase, epochs, seed, warmup=True,
              micro_batch=None):
    micro = micro_batch or args.micro_batch
    total = args.train_size // batch * epochs
    return {
        "phase": phase, "method": method, "batch": batch, "micro_batch": micro,
        "peak_lr": float(peak_lr),
        "trust_coefficient": float(eta) if method != "sgd" else None,
        "warmup": warmup,
        "warmup_updates": max(1, round(args.warmup_fraction * total)),
        "epochs": epochs, "seed": seed, "momentum": args.momentum,
        "image_size": args.image_size, "width": args.width, "depth": args.depth,
        "train_size": args.train_size, "evaluate_test": phase != "tune",
        "layer_statistics": False,
    }


def grid_points(args, method, batch):
    """(peak_lr, trust_coefficient) pairs: the same multipliers for all."""
    points = []
    for m in _floats(args.grid):
        if method == "sgd":
            base = args.sgd_base_lr * batch / 256.0  # linear scaling rule
            points.append((base * m, None))
        else:
            for eta in _floats(args.trust_coefficients):
                points.append((args.layerwise_step / eta * m, eta))
    return points


def groups(args, methods):
    """(label, method, batch, warmup) of each compared configuration."""
    out = []
    for batch in _ints(args.batch_sizes):
        for method in methods:
            out.append((f"{method}_B{batch}", method, batch, method != "clars"))
    if args.small_batch:
        out.append((f"sgd_B{args.small_batch}", "sgd", args.small_batch, True))
    return out


def select(results):
    """The best result by last-epoch validation accuracy (NaN loses)."""
    def score(r):
        v = r["val_acc"][-1]
        return v if math.isfinite(v) else -1.0
    return max(results, key=score)


def run_study(args):
    methods = check_args(args)
    out = args.out
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    data = load_data(args)
    print(f"backend {os.environ.get('KERAS_BACKEND')}: train {len(data['train'][0])}, "
          f"val {len(data['val'][0])}, test {len(data['test'][0])}", flush=True)

    chosen, tuning = {}, {}
    for label, method, batch, warmup in groups(args, methods):
        points = grid_points(args, method, batch)
        if len(points) == 1:
            lr, eta = points[0]
            chosen[label] = (lr, eta)
            continue
        results = [
            execute(base_spec(args, method, batch, lr, eta, "tune", args.tune_epochs,
                              _ints(args.seeds)[0], warmup), data, args, out)
            for lr, eta in points
        ]
        tuning[label] = [
            {"peak_lr": r["peak_lr"], "trust_coefficient": r["trust_coefficient"],
             "val_acc": r["val_acc"][-1], "train_loss": r["train_loss"][-1]}
            for r in results
        ]
        best = select(results)
        chosen[label] = (best["peak_lr"], best["trust_coefficient"])

    finals = {}
    for seed in _ints(args.seeds):
        for label, method, batch, warmup in groups(args, methods):
            spec = base_spec(args, method, batch, *chosen[label], "final", args.epochs,
                             seed, warmup)
            spec["layer_statistics"] = method != "sgd" and seed == _ints(args.seeds)[0]
            finals.setdefault(label, []).append(execute(spec, data, args, out))

    ablations = {}
    if not args.no_ablations:
        batch = _ints(args.batch_sizes)[0]
        variants = []
        if "clars" in methods:
            variants.append((f"clars_B{batch}_warmup", "clars", True, None))
            variants += [(f"clars_B{batch}_b{b}", "clars", False, b)
                         for b in _ints(args.ablation_micro_batches)]
        if "lars" in methods:
            variants.append((f"lars_B{batch}_nowarmup", "lars", False, None))
        for seed in _ints(args.ablation_seeds):
            for label, method, warmup, micro in variants:
                spec = base_spec(args, method, batch, *chosen[f"{method}_B{batch}"],
                                 "ablation", args.epochs, seed, warmup, micro)
                ablations.setdefault(label, []).append(execute(spec, data, args, out))

    summary = summarize(args, chosen, tuning, finals, ablations)
    write_outputs(args, summary, finals, ablations)
    return summary


# ------------------------------------------------------------ reporting


def _mean_std(values):
    import numpy as np

    values = np.asarray(values, dtype="float64")
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def epochs_to_target(result, target):
    for epoch, loss in enumerate(result["train_loss"], start=1):
        if loss <= target:
            return epoch
    return None


def describe(label, results, target):
    import numpy as np

    first = results[0]
    to_target = [epochs_to_target(r, target) for r in results]
    reached = [e for e in to_target if e is not None]
    # Epoch 1 includes tracing and compiling: leave it out of the cost.
    times = [t for r in results for t in r["epoch_time"][1:]] or [
        t for r in results for t in r["epoch_time"]]
    return {
        "label": label, "method": first["method"], "batch": first["batch"],
        "micro_batch": first["micro_batch"], "gradient_samples": first["gradient_samples"],
        "peak_lr": first["peak_lr"], "trust_coefficient": first["trust_coefficient"],
        "warmup_updates": first["warmup_updates_used"],
        "total_updates": first["total_updates"], "seeds": [r["seed"] for r in results],
        "test_acc": _mean_std([r["test_acc"][-1] for r in results]),
        "best_val_acc": _mean_std([max(r["val_acc"]) for r in results]),
        "final_train_loss": _mean_std([r["train_loss"][-1] for r in results]),
        "epochs_to_target": to_target,
        "epochs_to_target_mean": float(np.mean(reached)) if reached else None,
        "epoch_seconds_median": float(np.median(times)),
        "non_finite_updates": [r["non_finite_updates"] for r in results],
    }


def summarize(args, chosen, tuning, finals, ablations):
    rows = {label: describe(label, rs, args.loss_target) for label, rs in finals.items()}
    for batch in _ints(args.batch_sizes):
        reference = rows.get(f"sgd_B{batch}")
        for r in rows.values():
            if r["batch"] == batch and reference:
                r["cost_vs_sgd"] = r["epoch_seconds_median"] / reference["epoch_seconds_median"]
    return {
        "settings": {k: v for k, v in vars(args).items()},
        "chosen": {k: {"peak_lr": v[0], "trust_coefficient": v[1]} for k, v in chosen.items()},
        "tuning": tuning,
        "final": rows,
        "ablations": {label: describe(label, rs, args.loss_target)
                      for label, rs in ablations.items()},
    }


def write_outputs(args, summary, finals, ablations):
    from keras_clars.callbacks import _write_json_atomically as write_json_atomically

    out = args.out
    write_json_atomically(os.path.join(out, "summary.json"), summary)
    with open(os.path.join(out, "epochs.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["group", "key", "method", "batch", "micro_batch", "peak_lr",
                         "trust_coefficient", "warmup", "seed", "epoch", "train_loss",
                         "val_acc", "test_acc", "epoch_seconds"])
        for group in (finals, ablations):
            for label, results in group.items():
                for r in results:
                    for e in range(r["epochs"]):
                        writer.writerow([
                            label, r["key"], r["method"], r["batch"], r["micro_batch"],
                            r["peak_lr"], r["trust_coefficient"], r["warmup"], r["seed"],
                            e + 1, r["train_loss"][e], r["val_acc"][e],
                            r["test_acc"][e] if r["test_acc"] else "",
                            round(r["epoch_time"][e], 3)])
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(markdown_table(summary, args.loss_target))
    plot(args, summary, finals, ablations)


def markdown_table(summary, target):
    def pm(v):
        return f"{100 * v[0]:.2f} ± {100 * v[1]:.2f}"

    lines = [
        "| configuration | B | b (S) | peak lr | eta | warmup upd. | test acc. % | "
        f"best val acc. % | epochs to loss ≤ {target:g} | s/epoch | cost vs SGD |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for section in ("final", "ablations"):
        for r in summary[section].values():
            reach = ", ".join("–" if e is None else str(e) for e in r["epochs_to_target"])
            cost = f"{r['cost_vs_sgd']:.2f}" if "cost_vs_sgd" in r else ""
            eta = "" if r["trust_coefficient"] is None else f"{r['trust_coefficient']:g}"
            lines.append(
                f"| {r['label']} | {r['batch']} | {r['micro_batch']} ({r['gradient_samples']}) "
                f"| {r['peak_lr']:.4g} | {eta} | {r['warmup_updates']}/{r['total_updates']} "
                f"| {pm(r['test_acc'])} | {pm(r['best_val_acc'])} | {reach} "
                f"| {r['epoch_seconds_median']:.1f} | {cost} |")
    return "\n".join(lines) + "\n"


def plot(args, summary, finals, ablations):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    img = args.img or os.path.join(args.out, "img")
    os.makedirs(img, exist_ok=True)

    def band(ax, results, key, label, x=None):
        values = np.array([r[key] for r in results], dtype="float64")
        steps = np.arange(1, values.shape[1] + 1) if x is None else x[: values.shape[1]]
        mean = values.mean(axis=0)
        line, = ax.plot(steps, mean, label=label, marker="o" if x is None else None,
                        markersize=3)
        if len(values) > 1:
            ax.fill_between(steps, values.min(axis=0), values.max(axis=0),
                            color=line.get_color(), alpha=0.2)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, results in finals.items():
        band(axes[0], results, "train_loss", label)
        band(axes[1], results, "test_acc", label)
    axes[0].set(xlabel="epoch", ylabel="training loss", yscale="log",
                title="training loss (mean, min-max over seeds)")
    axes[1].set(xlabel="epoch", ylabel="test accuracy", title="test accuracy")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(img, "convergence.png"), dpi=110)
    plt.close(fig)

    # The first epochs, per update: where the warmup claim lives.
    fig, ax = plt.subplots(figsize=(7, 4.2))
    first = 2
    for group in (finals, ablations):
        for label, results in group.items():
            if results[0]["batch"] == args.small_batch and args.small_batch not in \
                    _ints(args.batch_sizes):
                continue
            if "_b" in label.split("_B")[-1]:
                continue
            upd = results[0]["updates_per_epoch"]
            fraction = np.arange(1, first * upd + 1) / upd
            runs = [dict(r, update_loss=r["update_loss"][: first * upd]) for r in results]
            band(ax, runs, "update_loss", label, x=fraction)
    ax.set(xlabel="epoch (one point per update)", ylabel="training loss of the update",
           title=f"first {first} epochs, per update")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(img, "first_epochs.png"), dpi=110)
    plt.close(fig)

    if ablations:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for label, results in list(finals.items()) + list(ablations.items()):
            if results[0]["method"] == "sgd":
                continue
            band(axes[0], results, "train_loss", label)
            band(axes[1], results, "test_acc", label)
        axes[0].set(xlabel="epoch", ylabel="training loss", yscale="log",
                    title="ablations: warmup and slice size b")
        axes[1].set(xlabel="epoch", ylabel="test accuracy")
        axes[1].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(img, "ablations.png"), dpi=110)
        plt.close(fig)

    files = [os.path.join(args.out, r["layer_statistics_file"])
             for results in finals.values() for r in results
             if r.get("layer_statistics_file")]
    if files:
        heatmaps(files, img)

    if summary["tuning"]:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for label, points in summary["tuning"].items():
            for eta in sorted({p["trust_coefficient"] for p in points}, key=str):
                sel = [p for p in points if p["trust_coefficient"] == eta]
                name = label if eta is None else f"{label}, eta={eta:g}"
                ax.plot([p["peak_lr"] for p in sel],
                        [p["val_acc"] if math.isfinite(p["val_acc"]) else 0 for p in sel],
                        marker="o", label=name)
        ax.set(xscale="log", xlabel="peak learning rate", ylabel="validation accuracy",
               title=f"tuning grid ({args.tune_epochs} epochs, 1 seed)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(img, "tuning.png"), dpi=110)
        plt.close(fig)


def heatmaps(files, img):
    """`layers_<method>.png`: benchmarks/plot_layer_statistics.py's heatmaps."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from plot_layer_statistics import plot_layer_statistics

    for path in files:
        method = os.path.basename(path).split("_")[1]
        plot_layer_statistics(path, os.path.join(img, f"layers_{method}.png"))


def main(argv=None):
    args = parse_args(argv)
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend  # before Keras is imported
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    start = time.time()
    summary = run_study(args)
    print(f"done in {time.time() - start:.0f} s; table:\n" +
          markdown_table(summary, args.loss_target), flush=True)


if __name__ == "__main__":
    main()
