"""The main job: CLARS without warmup against LARS with and without warmup,
at the evidence study's setting and learning rates.

    .venv/bin/python -m recipes.compare          # what `make demo` runs

Each method is one `recipes.train.run` of the study's protocol
(`recipes.study`: Fashion-MNIST pooled to 14x14, ResNet-8, B = 4096 in
micro-batches of b = 256, 12 epochs, eta 0.01, warmup 2 epochs where a
method has it), at the peak learning rate the study chose on its validation
split, read from docs/results/chosen.json; a method the study has not
tuned is an error, unless `--override=base_lr=...` sets the rate (and
"lr from" then says so). Seed 1 (a seed of the study's finals, never used
for tuning), so each row can be checked against the study's finals, whose
mean ± std over seeds 1-3 it prints beside it. SGD with warmup (`--methods=...,sgd`) and
CLARS with per-example norms (`clars_per_example`) are opt-in: each run
takes about 2.5 minutes on a 2-core machine, and the default three fit in
10 minutes of training.

Prints a table (best validation accuracy over the epochs, final validation
accuracy, and the test accuracy, evaluated once at the end) and writes
compare.png and results.json into --output_dir. `--full_size` trains on the
28x28 images instead (about 4x the compute). `--override=epochs=1`
(repeatable) changes a training flag of every method (tests).
"""

import dataclasses
import json
import os
import sys
import time

from absl import app, flags

from recipes import plots, report, study, train

PLAN = study.Plan()
_B, _b = PLAN.ablation_batch, PLAN.micro_batch
# Method -> the study's curve.
METHODS = {
    "clars": f"B{_B}_clars_nowarmup_b{_b}",
    "lars": f"B{_B}_lars_warmup_b{_b}",
    "lars_nowarmup": f"B{_B}_lars_nowarmup_b{_b}",
    "sgd": f"B{_B}_sgd_warmup_b{_b}",
    "clars_per_example": f"B{_B}_clars_nowarmup_b1",
}
DEFAULT_METHODS = ("clars", "lars_nowarmup", "lars")
CHOSEN = os.path.join("docs", "results", "chosen.json")
SEED = 1

flags.DEFINE_string("output_dir", "runs/compare", "Where the plot and JSON go.")
flags.DEFINE_list("methods", list(DEFAULT_METHODS),
                  f"Methods to compare, some of {', '.join(METHODS)}.")
flags.DEFINE_string("chosen", CHOSEN, "The study's chosen rates (recipes.study report).")
flags.DEFINE_bool("full_size", False, "Train on 28x28 images, not the study's 14x14.")
flags.DEFINE_integer("seed", SEED, "Seed of every run.")
flags.DEFINE_multi_string("override", [], "A recipes.train flag for every method, "
                          "as name=value (e.g. epochs=1).")
FLAGS = flags.FLAGS

NOTES = """\
Notes:
- The setting is the evidence study's (docs/results.md): b is the slice size
  (examples per gradient sample), S = B / b samples per update; every method
  uses the same micro-batches, so BatchNorm sees the same batches.
- Learning rates: each method's peak lr is the one the study chose on its
  validation split ("lr from" says where each value came from). LARS and
  CLARS use trust coefficient 0.01; biases and BatchNorm take the plain lr.
- Best val. acc. is the best validation accuracy over the epochs; the test
  accuracy is evaluated once, at the end, and chooses nothing.
- One seed (1, one of the study's final seeds): "study best val" is the
  study's mean ± std of the best validation accuracy over seeds 1-3 at the
  same lr (docs/results/finals.md); a row outside it by much is worth a look.
- The claim tested: CLARS without warmup against LARS with warmup; LARS
  without warmup shows what warmup buys here. SGD with warmup is opt-in
  (--methods=clars,lars_nowarmup,lars,sgd); the study has it.
"""


def learning_rate(curve, chosen_path):
    """(peak lr, where it came from, the study's finals or None) for a curve.

    Raises ValueError if `chosen_path` has no tuned rate for the curve.
    """
    chosen = {}
    if chosen_path and os.path.exists(chosen_path):
        with open(chosen_path) as f:
            chosen = json.load(f)
    entry = chosen.get(curve) or {}
    if entry.get("state") != "tuned":
        raise ValueError(
            f"the study has not tuned {curve} (state in {chosen_path}: "
            f"{entry.get('state', 'absent')}); run `python -m recipes.study tune "
            f"--curves {curve}`, or set a rate with --override=base_lr=VALUE.")
    return (entry["peak_lr"], f"study, chosen on validation ({chosen_path})",
            entry.get("finals"))


def _changes(overrides):
    """{name: value} from `name=value` texts, typed as the `Config` field."""
    types = {f.name: f.type for f in dataclasses.fields(train.Config)}
    changes = {}
    for text in overrides:
        name, _, value = text.partition("=")
        if name not in types:
            raise ValueError(f"--override: no training flag {name!r} in {text!r}.")
        kind = types[name]
        changes[name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return changes


def compare(methods, chosen_path=CHOSEN, overrides=(), output_dir=None, full_size=False,
            seed=SEED):
    """Runs each method at the study's setting; returns per-method results."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"Unknown methods {unknown}; expected some of {', '.join(METHODS)}.")
    if full_size:
        overrides = ["image_size=28", *overrides]
    changes = _changes(["verbose=2", *overrides])  # one line per epoch
    results = []
    for method in methods:
        curve = PLAN.curve(METHODS[method])
        if "base_lr" in changes:
            lr, source, study_finals = changes["base_lr"], "--override, not the study's", None
        else:
            lr, source, study_finals = learning_rate(curve.name, chosen_path)
        config = dataclasses.replace(PLAN.config(curve, lr, seed), **changes)
        print(f"\n=== {method}: peak lr {lr:g} ({source})", flush=True)
        result = train.run(config)
        results.append({"method": method, "curve": curve.name, "lr_source": source,
                        "study_finals": study_finals, "record": result["record"]})
    if output_dir:
        from recipes.records import write_json

        os.makedirs(output_dir, exist_ok=True)
        write_json(os.path.join(output_dir, "results.json"), results)
        r = results[0]["record"]
        c = r["config"]
        plots.plot_epochs(
            [(f"{x['method']} (lr {x['record']['config']['base_lr']:g})",
              x["record"]["epochs"]) for x in results],
            os.path.join(output_dir, "compare.png"),
            title=(f"Fashion-MNIST {r['summary']['image_size']}px, ResNet-{c['depth']} "
                   f"width {c['width']}, B={c['batch_size']}, b={c['micro_batch_size']}, "
                   f"seed {c['seed']}"),
        )
    return results


def table(results):
    """The results as a text table."""
    header = (f"{'method':<15}{'warmup':>7}{'peak lr':>9}{'B':>6}{'b':>5}{'S':>6}"
              f"{'best val acc':>14}{'final val':>10}{'test acc':>10}{'wall s':>8}"
              f"{'study best val':>17}  lr from")
    lines = [header, "-" * (len(header) + 20)]
    for x in results:
        r = x["record"]
        s, c = r["summary"], r["config"]
        values = [e.get("val_accuracy") or 0.0 for e in r["epochs"]]
        best = max(range(len(values)), key=values.__getitem__) if values else 0
        test = r.get("test_accuracy")
        final = r.get("final_validation_accuracy")
        spread = (x.get("study_finals") or {}).get("best_val")
        study = report.plus_minus(spread) if spread else "no finals yet"
        lines.append(
            f"{x['method']:<15}{c['warmup_epochs']:>6g}e{c['base_lr']:>9g}"
            f"{s['global_batch_B']:>6}{s['slice_size_b']:>5}{s['samples_S']:>6}"
            f"{100 * values[best]:>8.2f} (e{best + 1:>2})"
            f"{'' if final is None else f'{100 * final:.2f}':>10}"
            f"{'' if test is None else f'{100 * test:.2f}':>10}"
            f"{r['wall_seconds']:>8.0f}{study:>17}  {x['lr_source']}"
        )
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    began = time.time()
    try:
        results = compare(FLAGS.methods, FLAGS.chosen, FLAGS.override, FLAGS.output_dir,
                          FLAGS.full_size, FLAGS.seed)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"recipes.compare: error: {error}")
    print("\n" + table(results))
    print(NOTES)
    print(f"Wrote {os.path.join(FLAGS.output_dir, 'compare.png')} and "
          f"results.json; total {time.time() - began:.0f} s.")


if __name__ == "__main__":
    app.run(main)
