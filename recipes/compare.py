"""The main job: CLARS without warmup against LARS and SGD with warmup.

    .venv/bin/python recipes/compare.py          # what `make demo` runs

Trains the same small ResNet-20 on Fashion-MNIST at one large batch (4096)
with each optimizer, as the named configs recipes/configs/fashion_mnist_b4096_
{clars,lars,sgd}.cfg say: the same epochs, poly decay and micro-batch; CLARS
without warmup, LARS and SGD with one epoch of warmup. Prints a results
table and writes compare.png (training loss and test accuracy per epoch)
and results.json into --output_dir. About 10 minutes on 2 CPU cores.

`--override=epochs=1` (repeatable) changes a training flag of every method.
"""

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402

from recipes import train  # noqa: E402

METHODS = ("clars", "lars", "sgd")
flags.DEFINE_string("output_dir", "runs/compare", "Where the plot and JSON go.")
flags.DEFINE_list("methods", list(METHODS), "Optimizers to compare.")
flags.DEFINE_string("config_prefix", os.path.join(ROOT, "recipes", "configs", "fashion_mnist_b4096"),
                    "Configs <prefix>_<method>.cfg to run.")
flags.DEFINE_multi_string("override", [], "A train.py flag for every method, "
                          "as name=value (e.g. epochs=1).")
FLAGS = flags.FLAGS

NOTES = """\
Notes:
- b is the slice size (examples per gradient sample) and S = B / b the
  gradient samples per update; CLARS's complete norm averages S sample norms
  (with S = 1 it would be LARS). LARS and SGD use the same micro-batches, so
  BatchNorm sees the same batches in every run.
- At B = 4096 an epoch of Fashion-MNIST is only 14 updates (224 micro-steps):
  BatchNorm's momentum is 0.9 (Keras default 0.99) so that its moving
  statistics, used for the test accuracy, keep up with the weights.
- Warmup is the usual remedy for SGD and LARS at large batch (Goyal et al.);
  CLARS runs without it, as the paper claims it needs none. This job does
  not run SGD or LARS without warmup.
- Train loss is Keras's mean over each epoch (augmented data, BatchNorm in
  training mode); test accuracy is on the 10,000 test images.
"""


def compare(methods, config_prefix, overrides=(), output_dir=None):
    """Runs each method's config; returns a list of per-method results."""
    results = []
    for method in methods:
        path = f"{config_prefix}_{method}.cfg"
        if not os.path.exists(path):
            raise FileNotFoundError(f"No config {path} for method {method!r}.")
        config = train.config_from_args(
            [f"--flagfile={path}"] + [f"--{o}" for o in overrides]
        )
        print(f"\n=== {method}: {path}", flush=True)
        began = time.time()
        result = train.run(config)
        summary = result["summary"]
        results.append({
            "method": method,
            "config": vars(config),
            "summary": {**summary, "wall_seconds": time.time() - began},
            "epochs": result["epochs"],
        })
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        plot(results, os.path.join(output_dir, "compare.png"))
    return results


def table(results):
    """The results as a text table."""
    header = (f"{'method':<7}{'warmup':>8}{'peak lr':>9}{'B':>6}{'b':>5}{'S':>4}"
              f"{'train loss':>12}{'test acc':>10}{'best acc':>10}{'wall s':>8}")
    lines = [header, "-" * len(header)]
    for r in results:
        s, c, last = r["summary"], r["config"], r["epochs"][-1]
        best = max(e.get("val_accuracy", float("nan")) for e in r["epochs"])
        lines.append(
            f"{r['method']:<7}{c['warmup_epochs']:>7g}e{s['peak_lr']:>9g}"
            f"{s['global_batch_B']:>6}{s['slice_size_b']:>5}{s['samples_S']:>4}"
            f"{last['loss']:>12.4f}{last.get('val_accuracy', float('nan')):>10.4f}"
            f"{best:>10.4f}{s['wall_seconds']:>8.0f}"
        )
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results:
        epochs = [e["epoch"] + 1 for e in r["epochs"]]
        s, c = r["summary"], r["config"]
        label = (f"{r['method'].upper()} (warmup {c['warmup_epochs']:g} ep, "
                 f"peak lr {s['peak_lr']:g})")
        loss_axes.plot(epochs, [e["loss"] for e in r["epochs"]], "o-", label=label)
        accuracy_axes.plot(epochs, [e["val_accuracy"] for e in r["epochs"]], "o-",
                           label=label)
    s = results[0]["summary"]
    loss_axes.set(xlabel="epoch", ylabel="training loss", yscale="log",
                  title="Training loss")
    accuracy_axes.set(xlabel="epoch", ylabel="test accuracy", title="Test accuracy")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(
        f"Fashion-MNIST, ResNet-20 (width {results[0]['config']['width']}), "
        f"B={s['global_batch_B']}, b={s['slice_size_b']}, S={s['samples_S']}, "
        f"{s['updates_per_epoch']} updates/epoch"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    unknown = set(FLAGS.methods) - set(METHODS)
    if unknown:
        sys.exit(f"compare.py: error: unknown methods {sorted(unknown)}; "
                 f"expected some of {', '.join(METHODS)}.")
    began = time.time()
    try:
        results = compare(FLAGS.methods, FLAGS.config_prefix, FLAGS.override,
                          FLAGS.output_dir)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"compare.py: error: {error}")
    print("\n" + table(results))
    print(NOTES)
    print(f"Wrote {os.path.join(FLAGS.output_dir, 'compare.png')} and "
          f"results.json; total {time.time() - began:.0f} s.")


if __name__ == "__main__":
    app.run(main)
