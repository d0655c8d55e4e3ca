"""The recipes' one plotting and table module.

- The warmup-necessity study's report (`recipes.study report` calls
  `write_report`): markdown tables under docs/results/, the blocks of
  docs/results.md between `<!-- report:NAME -->` markers, `chosen.json` (the
  learning rates the main job uses) and the figures under docs/img/, all
  from the per-run JSON records, with no training.
- Epoch plots of a few runs (`plot_epochs`, used by `recipes.compare`).
- Per-layer statistics heatmaps (`plot_layer_statistics`), from the JSON of
  `keras_clars.callbacks.LayerStatisticsLogger`:

      .venv/bin/python -m recipes.report layers runs/clars/layer_statistics.json \\
          -o docs/img/layers_clars.png

Reading records needs no TensorFlow; matplotlib is imported only to draw.
"""

import argparse
import glob
import json
import math
import os
import re

import numpy as np

DEFAULT_STATISTICS = ("coherence", "trust_ratio")
# Most labels that fit; beyond this every n-th layer is labelled.
MAX_LABELS = 60
NOT_RUN = "not run yet"
# A method "loses" to warmup at this many points of validation accuracy.
LOSS_POINTS = 2.0
# Below this validation accuracy a run counts as diverged (10 classes: 0.1
# is chance; a NaN loss gives chance or worse).
DIVERGED_BELOW = 0.2


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------ the records


def load_records(runs_dir):
    """The study's run records in `runs_dir`, sorted by key."""
    records = []
    for path in sorted(glob.glob(os.path.join(runs_dir, "*.json"))):
        with open(path) as f:
            record = json.load(f)
        if "study" in record:
            records.append(record)
    return records


def final_accuracy(record):
    """Last-epoch validation accuracy; NaN counts as 0 (diverged)."""
    value = record.get("final_validation_accuracy")
    return 0.0 if value is None or not math.isfinite(value) else float(value)


def diverged(record):
    loss = record["epochs"][-1].get("loss") if record.get("epochs") else None
    return final_accuracy(record) < DIVERGED_BELOW or loss is None or not math.isfinite(loss)


def _mean_std(values):
    """(mean, sample std), std None for one value; None for none."""
    values = np.asarray([v for v in values if v is not None], dtype="float64")
    if not len(values):
        return None
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else None


def _pm(value, scale=100.0, digits=2, single="one seed"):
    """'mean ± std'; a value without spread says where it came from."""
    if value is None:
        return NOT_RUN
    mean, std = value
    if std is None:
        return f"{scale * mean:.{digits}f} ({single})"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def _lr(value):
    return f"{value:g}"


def summarize(plan, records):
    """Collects the records per curve of a study plan.

    Args:
        plan: `recipes.study.Plan` (its curves, grid rule and seeds).
        records: run records (`load_records`).

    Returns:
        A dict: curve name -> dict with `curve`, `tuning` (lr -> record of
        the tuning seed), `window` (the lrs the choice is made among),
        `state` (`tuned`, `incomplete`, `not run yet`), `chosen` (lr or None)
        and `finals` (records of the final seeds at the chosen lr).
    """
    by_curve = {}
    for record in records:
        by_curve.setdefault(record["study"]["curve"], []).append(record)
    out = {}
    for curve in plan.curves:
        runs = by_curve.get(curve.name, [])
        tuning = {r["study"]["lr"]: r for r in runs if r["study"]["seed"] == plan.tune_seed}
        window, state, chosen = plan.tuning_state(curve, {
            lr: final_accuracy(r) for lr, r in tuning.items()})
        finals = [r for r in runs if r["study"]["seed"] in plan.final_seeds
                  and chosen is not None and r["study"]["lr"] == chosen]
        finals.sort(key=lambda r: r["study"]["seed"])
        out[curve.name] = {"curve": curve, "tuning": tuning, "window": window,
                           "state": state, "chosen": chosen, "finals": finals}
    return out


def _final_stats(entry):
    finals = entry["finals"]
    if not finals:
        return {}
    return {
        "seeds": [r["study"]["seed"] for r in finals],
        "final_val": _mean_std([final_accuracy(r) for r in finals]),
        "best_val": _mean_std([r.get("best_validation_accuracy") for r in finals]),
        "test": _mean_std([r.get("test_accuracy") for r in finals]),
        "coherence": _mean_std([r.get("first_update_coherence") for r in finals]),
        "run_seconds": _mean_std([r.get("wall_seconds") for r in finals]),
        "diverged": sum(diverged(r) for r in finals),
    }


# ------------------------------------------------------------- the tables


def tuning_table(plan, summary):
    lines = [
        f"Tuning: final (epoch {plan.epochs}) validation accuracy, % (seed "
        f"{plan.tune_seed}), for each peak learning rate. **Bold**: chosen "
        f"(the best of the {plan.grid_points} points in the window); "
        "(parenthesized): run, outside the window after it slid; "
        "†: diverged (validation accuracy below "
        f"{100 * DIVERGED_BELOW:.0f}% or a non-finite loss).",
        "",
        "| curve | B | b | warmup | state | peak lr → validation accuracy % |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in summary.items():
        curve = entry["curve"]
        cells = []
        for lr in sorted(entry["tuning"]):
            record = entry["tuning"][lr]
            text = f"{_lr(lr)}: {100 * final_accuracy(record):.1f}"
            if diverged(record):
                text += "†"
            if lr == entry["chosen"]:
                text = f"**{text}**"
                if lr in (entry["window"][0], entry["window"][-1]):
                    text += " (at the edge after the last slide)"
            elif lr not in entry["window"]:
                text = f"({text})"
            cells.append(text)
        missing = [lr for lr in entry["window"] if lr not in entry["tuning"]]
        if missing:
            cells.append(f"to run: {', '.join(_lr(v) for v in missing)}")
        lines.append(
            f"| {name} | {curve.batch_size} | {curve.slice_label} | "
            f"{'yes' if curve.warmup else 'no'} | {entry['state']} | "
            f"{' · '.join(cells) or NOT_RUN} |"
        )
    return "\n".join(lines) + "\n"


def finals_table(plan, summary):
    lines = [
        f"Finals: the chosen peak learning rate, seeds "
        f"{', '.join(map(str, plan.final_seeds))} (none used for tuning), "
        f"{plan.epochs} epochs; mean ± sample std over the seeds, %. Validation: "
        "the held-out part of the training split (what the choice was made on); "
        "test: the 10k test split, evaluated once at the end of each run. "
        "Coherence: mean over the kernels of ||g_l|| / N_l at the first update "
        "(1 for LARS; the factor by which the complete norm shrinks CLARS's "
        "first step).",
        "",
        "| curve | B | b, S | warmup | peak lr | seeds | final val. acc. | "
        "best val. acc. | test acc. | diverged | coherence, update 1 | s/run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in summary.items():
        curve, stats = entry["curve"], _final_stats(entry)
        chosen = _lr(entry["chosen"]) if entry["chosen"] is not None else NOT_RUN
        if not stats:
            lines.append(
                f"| {name} | {curve.batch_size} | {curve.layout} | "
                f"{'yes' if curve.warmup else 'no'} | {chosen} | "
                f"{NOT_RUN} | | | | | | |")
            continue
        coherence = stats["coherence"]
        lines.append(
            f"| {name} | {curve.batch_size} | {curve.layout} | "
            f"{'yes' if curve.warmup else 'no'} | {chosen} | "
            f"{', '.join(map(str, stats['seeds']))} | {_pm(stats['final_val'])} | "
            f"{_pm(stats['best_val'])} | {_pm(stats['test'])} | {stats['diverged']} | "
            f"{'' if coherence is None else f'{coherence[0]:.3f}'} | "
            f"{stats['run_seconds'][0]:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _pairs(summary):
    """(label, curve with warmup, curve without) for each method and B."""
    pairs = []
    for name, entry in summary.items():
        curve = entry["curve"]
        if curve.warmup:
            for other, other_entry in summary.items():
                o = other_entry["curve"]
                if (not o.warmup and o.method == curve.method
                        and o.batch_size == curve.batch_size
                        and o.slice_size == curve.slice_size):
                    pairs.append((f"{curve.method.upper()}, B={curve.batch_size}",
                                  entry, other_entry))
    return pairs


def warmup_table(plan, summary):
    """Where does dropping warmup cost >= LOSS_POINTS, or diverge?"""
    lines = [
        f"Warmup necessity: without warmup against with it, same method and B. "
        f"Tuned: each curve at its own chosen rate (finals: mean over seeds; "
        f"tuning seed {plan.tune_seed} if the finals have not run). Same rate: "
        f"the rates of the grid where the run without warmup is at least "
        f"{LOSS_POINTS:g} points below the run with it, or diverged where that "
        "did not.",
        "",
        "| method, B | tuned: with warmup | tuned: without | difference (points) | "
        f"loses ≥ {LOSS_POINTS:g} points tuned? | same rate: loses ≥ "
        f"{LOSS_POINTS:g} points or diverges at |",
        "|---|---|---|---|---|---|",
    ]
    for label, warm, cold in _pairs(summary):
        values = []
        for entry in (warm, cold):
            stats = _final_stats(entry)
            if stats:
                values.append((stats["final_val"], "finals"))
            elif entry["chosen"] is not None:  # one run: no spread to show
                values.append(((final_accuracy(entry["tuning"][entry["chosen"]]), None),
                               "tuning"))
            else:
                values.append((None, ""))
        (w, wsrc), (c, csrc) = values
        if w is None or c is None:
            difference, loses = NOT_RUN, NOT_RUN
        else:
            d = 100 * (c[0] - w[0])
            difference = f"{d:+.2f}" + ("" if wsrc == csrc == "finals" else " (tuning seed)")
            loses = "yes" if d <= -LOSS_POINTS else "no"
        where = []
        shared = set(warm["tuning"]) & set(cold["tuning"])
        for lr in sorted(shared):
            a, b = warm["tuning"][lr], cold["tuning"][lr]
            if diverged(b) and not diverged(a):
                where.append(f"{_lr(lr)} (diverged)")
            elif 100 * (final_accuracy(a) - final_accuracy(b)) >= LOSS_POINTS:
                where.append(f"{_lr(lr)} ({100 * (final_accuracy(b) - final_accuracy(a)):+.1f})")
        single = {"tuning": "tuning seed only"}
        lines.append(
            f"| {label} | {_pm(w, single=single.get(wsrc, 'one seed'))} | "
            f"{_pm(c, single=single.get(csrc, 'one seed'))} | "
            f"{difference} | {loses} | "
            f"{', '.join(where) or ('none' if shared else NOT_RUN)} |"
        )
    return "\n".join(lines) + "\n"


def ablation_table(plan, summary):
    rows = [e for e in summary.values()
            if e["curve"].method == "clars" and not e["curve"].warmup
            and e["curve"].batch_size == plan.ablation_batch]
    rows.sort(key=lambda e: e["curve"].slice_size)
    lines = [
        f"Slice-size ablation: CLARS without warmup at B={plan.ablation_batch}, "
        "each slice size b with its own rate tuned on validation (same grid "
        "size). b = 1: exact per-example norms (micro-batches of "
        f"{plan.micro_batch}); otherwise b is the micro-batch, so BatchNorm's "
        "batch changes with b too.",
        "",
        "| b | S | peak lr | tuned val. acc. (seed 0) | final val. acc. | test acc. | "
        "coherence, update 1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in rows:
        curve, stats = e["curve"], _final_stats(e)
        tuned = (f"{100 * final_accuracy(e['tuning'][e['chosen']]):.2f}"
                 if e["chosen"] is not None else NOT_RUN)
        coherence = stats.get("coherence") if stats else None
        lines.append(
            f"| {curve.slice_label} | {curve.samples} | "
            f"{_lr(e['chosen']) if e['chosen'] is not None else NOT_RUN} | {tuned} | "
            f"{_pm(stats['final_val']) if stats else NOT_RUN} | "
            f"{_pm(stats['test']) if stats else NOT_RUN} | "
            f"{'' if coherence is None else f'{coherence[0]:.3f}'} |"
        )
    return "\n".join(lines) + "\n"


def _compare(a, b, na, nb):
    """Mean difference of two final stats (over na and nb seeds), in points,
    its standard error and a verdict word."""
    (ma, sa), (mb, sb) = a, b
    d = 100 * (ma - mb)
    if sa is None or sb is None:
        return d, None, "not decided (one seed: no spread)"
    se = 100 * math.sqrt(sa**2 / na + sb**2 / nb)
    if d > 2 * se:
        word = "ahead"
    elif d < -2 * se:
        word = "behind"
    else:
        word = "level (within twice the standard error of the difference)"
    return d, se, word


def _good_range(entry, points=1.0):
    """The rates within `points` of the curve's best, as max/min factor."""
    tuning = {lr: final_accuracy(r) for lr, r in entry["tuning"].items()
              if lr in entry["window"]}
    if len(tuning) < len(entry["window"]) or not tuning:
        return None
    best = max(tuning.values())
    good = [lr for lr, v in tuning.items() if v >= best - points / 100]
    return min(good), max(good), len(good)


def verdicts_table(plan, summary):
    def stats(name):
        return _final_stats(summary[name]) if name in summary else {}

    names = plan.claim_curves
    lines = [
        f"Each claim, decided mechanically from the finals ({len(plan.final_seeds)} "
        "seeds each) by "
        "`recipes/report.py`: a difference counts when it exceeds twice its "
        "standard error. Stable range: the rates of the tuning window within 1 "
        "point of the curve's best.",
        "",
        "| claim | comparison | difference (points) | verdict |",
        "|---|---|---|---|",
    ]

    def row(claim, a, b, large=None):
        sa, sb = stats(a), stats(b)
        if not sa or not sb:
            lines.append(f"| {claim} | {a} vs {b} | {NOT_RUN} | {NOT_RUN} |")
            return
        d, se, word = _compare(sa["final_val"], sb["final_val"], len(sa["seeds"]),
                               len(sb["seeds"]))
        if large is not None and word == "ahead":
            word += f"; {'a large margin' if d >= large else 'not a large margin'} " \
                    f"(large: ≥ {large:g} points)"
        spread = "" if se is None else f" ± {se:.2f}"
        lines.append(f"| {claim} | {a} vs {b} | {d:+.2f}{spread} | {word} |")

    row("1. CLARS needs no warmup", names["clars"], names["lars_warmup"])
    if names.get("clars_per_example"):
        row("1. CLARS needs no warmup (per-example norms)", names["clars_per_example"],
            names["lars_warmup"])
    if names.get("clars_bigger"):
        row("1. CLARS needs no warmup (larger B)", names["clars_bigger"],
            names["lars_warmup_bigger"])
    row("2. CLARS beats gradual warmup by a large margin", names["clars"],
        names["sgd_warmup"], large=LOSS_POINTS)
    for name in (names["clars"], names["lars_warmup"], names.get("clars_per_example"),
                 names.get("clars_bigger"), names.get("lars_warmup_bigger")):
        if not name or name not in summary:
            continue
        good = _good_range(summary[name])
        text = NOT_RUN if good is None else (
            f"{_lr(good[0])} to {_lr(good[1])} ({good[2]} of "
            f"{len(summary[name]['window'])} points)")
        lines.append(f"| 1. stable range | {name} | | {text} |")
    # Claim 3: epochs until the validation accuracy (mean over the finals)
    # is within 1 point of LARS-with-warmup's final.
    reference = stats(names["lars_warmup"])
    for name in (names["clars"], names["lars_warmup"]):
        entry = summary.get(name)
        if not entry or not entry["finals"] or not reference:
            lines.append(f"| 3. converges faster than LARS with warmup | {name}: epochs "
                         f"to within 1 point of LARS+warmup's final | | {NOT_RUN} |")
            continue
        curves = np.array([[e.get("val_accuracy") or 0.0 for e in r["epochs"]]
                           for r in entry["finals"]], dtype="float64").mean(axis=0)
        target = reference["final_val"][0] - 0.01
        reached = [i + 1 for i, v in enumerate(curves) if v >= target]
        lines.append(
            f"| 3. converges faster than LARS with warmup | {name}: epochs to "
            f"within 1 point of LARS+warmup's final | | "
            f"{reached[0] if reached else 'never'} of {len(curves)} "
            f"(validation by epoch: {', '.join(f'{100 * v:.1f}' for v in curves)}) |")
    return "\n".join(lines) + "\n"


def chosen_rates(plan, summary):
    """`chosen.json`: each curve's chosen rate, for the main job."""
    out = {}
    for name, entry in summary.items():
        if entry["chosen"] is None:
            continue
        out[name] = {
            "peak_lr": entry["chosen"],
            "state": entry["state"],
            "validation_accuracy": final_accuracy(entry["tuning"][entry["chosen"]]),
            "source": (f"recipes.study tuning on validation (seed {plan.tune_seed}, "
                       f"{plan.epochs} epochs), docs/results/runs/"),
        }
        stats = _final_stats(entry)
        if stats:  # the finals' spread, for the main job to compare against
            out[name]["finals"] = {
                "seeds": stats["seeds"],
                **{k: list(stats[k]) for k in ("best_val", "final_val", "test")
                   if stats[k] is not None},
            }
    return out


TABLES = {
    "tuning": tuning_table,
    "finals": finals_table,
    "warmup": warmup_table,
    "ablation": ablation_table,
    "verdicts": verdicts_table,
}


def tables(plan, records):
    """Every table, as {name: markdown}, plus `chosen.json`'s text."""
    summary = summarize(plan, records)
    out = {name: make(plan, summary) for name, make in TABLES.items()}
    out["chosen.json"] = json.dumps(chosen_rates(plan, summary), indent=1,
                                    sort_keys=True) + "\n"
    return out


def figures_block(records, img="img"):
    """results.md's `figures` block: the figures the records allow."""
    if not records:
        return f"No figures yet: no run is on record ({NOT_RUN}).\n"
    lines = [
        f"![final validation accuracy against peak learning rate]({img}/warmup_necessity.png)",
        "",
        f"![validation accuracy per epoch of the finals]({img}/final_epochs.png)",
    ]
    for record in records:
        path = record["config"].get("layer_stats_path")
        if record["config"].get("layer_stats_interval") and path:
            name = os.path.basename(path)[:-len(".json")]
            lines += ["", f"![per-layer coherence and trust ratio, {name}]"
                      f"({img}/layers_{name}.png)"]
    return "\n".join(lines) + "\n"


def blocks(plan, records):
    """The blocks of docs/results.md: every table and the figures."""
    out = tables(plan, records)
    out.pop("chosen.json")
    out["figures"] = figures_block(records)
    return out


def replace_blocks(text, blocks):
    """Replaces each `<!-- report:NAME -->...<!-- /report -->` block's body."""
    def body(match):
        name = match.group(1)
        if name not in blocks:
            return match.group(0)
        return f"<!-- report:{name} -->\n{blocks[name]}<!-- /report -->"

    return re.sub(r"<!-- report:(\w+) -->\n.*?<!-- /report -->", body, text, flags=re.S)


def write_report(plan, out_dir, img_dir, results_md=None, figures=True):
    """Writes the tables, `chosen.json`, results.md's blocks and the figures.

    Returns:
        The list of files written.
    """
    records = load_records(os.path.join(out_dir, "runs"))
    written = []
    for name, text in tables(plan, records).items():
        path = os.path.join(out_dir, name if name.endswith(".json") else f"{name}.md")
        os.makedirs(out_dir, exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        written.append(path)
    if results_md and os.path.exists(results_md):
        with open(results_md) as f:
            text = f.read()
        new = replace_blocks(text, blocks(plan, records))
        if new != text:
            with open(results_md, "w") as f:
                f.write(new)
        written.append(results_md)
    if figures and records:
        summary = summarize(plan, records)
        os.makedirs(img_dir, exist_ok=True)
        written.append(plot_warmup_necessity(plan, summary,
                                             os.path.join(img_dir, "warmup_necessity.png")))
        written.append(plot_finals(plan, summary, os.path.join(img_dir, "final_epochs.png")))
        for path in sorted(glob.glob(os.path.join(out_dir, "layer_statistics", "*.json"))):
            # (the records name these files; see figures_block)
            png = os.path.join(img_dir, "layers_" + os.path.basename(path)[:-5] + ".png")
            written.append(plot_layer_statistics(path, png))
    return written


# ------------------------------------------------------------- the figures


def plot_warmup_necessity(plan, summary, path):
    """Final validation accuracy against peak learning rate, one panel per
    (B, family): where the warmup claim lives."""
    plt = _pyplot()
    from matplotlib import ticker

    panels = plan.figure_panels  # [(title, [curve names])]
    columns = min(2, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6.2 * columns, 4.4 * rows),
                                squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    # A 2-point difference must be visible: points below `floor` (diverged or
    # far off) are drawn on it as crosses.
    floor = 60.0
    for ax, (title, names) in zip(axes.flat, panels):
        top = 95.0
        ladder = set()
        for name in names:
            entry = summary.get(name)
            if not entry or not entry["tuning"]:
                continue
            lrs = sorted(entry["tuning"])
            ladder.update(lrs)
            values = [100 * final_accuracy(entry["tuning"][lr]) for lr in lrs]
            top = max(top, max(values) + 1)
            style = "-" if entry["curve"].warmup else "--"
            line, = ax.plot(lrs, [max(v, floor) for v in values], style, marker="o",
                            label=entry["curve"].legend)
            low = [lr for lr, v in zip(lrs, values) if v < floor]
            ax.plot(low, [floor] * len(low), "x", markersize=11, markeredgewidth=2.5,
                    color=line.get_color())
            if entry["chosen"] is not None:
                ax.plot([entry["chosen"]],
                        [100 * final_accuracy(entry["tuning"][entry["chosen"]])],
                        "*", markersize=14, color=line.get_color())
        ax.set(xscale="log", xlabel="peak learning rate", title=title,
               ylabel="final validation accuracy, %", ylim=(floor - 1, top))
        if ladder:  # ticks at the rates run, as plain numbers
            ax.xaxis.set_major_locator(ticker.FixedLocator(sorted(ladder)))
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.suptitle(plan.description + f" — star: chosen rate; x: below {floor:g}% "
                    "(diverged or far off), drawn at the floor", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_finals(plan, summary, path):
    """Validation accuracy per epoch of the finals (mean, min-max band)."""
    plt = _pyplot()
    batches = sorted({e["curve"].batch_size for e in summary.values() if e["finals"]})
    figure, axes = plt.subplots(1, max(1, len(batches)),
                                figsize=(5.5 * max(1, len(batches)), 4.2), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for entry in summary.values():
            if entry["curve"].batch_size != batch or not entry["finals"]:
                continue
            values = np.array([[e.get("val_accuracy") or 0.0 for e in r["epochs"]]
                               for r in entry["finals"]], dtype="float64") * 100
            epochs = np.arange(1, values.shape[1] + 1)
            style = "-" if entry["curve"].warmup else "--"
            line, = ax.plot(epochs, values.mean(axis=0), style, marker="o", markersize=3,
                            label=f"{entry['curve'].legend}, lr {_lr(entry['chosen'])}")
            ax.fill_between(epochs, values.min(axis=0), values.max(axis=0),
                            color=line.get_color(), alpha=0.15)
        ax.set(xlabel="epoch", ylabel="validation accuracy, %", title=f"finals, B={batch}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_epochs(runs, path, title=""):
    """Training loss and validation accuracy per epoch of a few runs.

    Args:
        runs: a list of (label, epochs), `epochs` as `recipes.train.run`
            returns them (dicts with `loss` and `val_accuracy`).
    """
    plt = _pyplot()
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, epochs in runs:
        x = [e["epoch"] + 1 for e in epochs]
        loss_axes.plot(x, [e["loss"] for e in epochs], "o-", label=label)
        accuracy_axes.plot(x, [100 * (e.get("val_accuracy") or 0.0) for e in epochs],
                           "o-", label=label)
    loss_axes.set(xlabel="epoch", ylabel="training loss", yscale="log", title="Training loss")
    accuracy_axes.set(xlabel="epoch", ylabel="validation accuracy, %",
                      title="Validation accuracy")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# ------------------------------------------------ per-layer statistics


def _edges(centers):
    """Cell edges halfway between the updates (the records may be uneven)."""
    centers = np.asarray(centers, dtype=float)
    if len(centers) == 1:
        return np.array([centers[0] - 0.5, centers[0] + 0.5])
    middle = (centers[1:] + centers[:-1]) / 2
    return np.concatenate(
        [[2 * centers[0] - middle[0]], middle, [2 * centers[-1] - middle[-1]]]
    )


def plot_layer_statistics(json_path, png_path, statistics=DEFAULT_STATISTICS,
                          all_variables=False, title=None):
    """Heatmaps (layer against update) of a run's per-layer statistics.

    One panel per statistic: layers in model order from top to bottom,
    updates from left to right. Coherence ||g_l|| / N_l is on a linear 0..1
    scale (dark: the gradient samples disagree, CLARS shrinks the step);
    the trust ratio is on a log scale.

    Args:
        json_path: the `LayerStatisticsLogger` JSON file.
        png_path: the PNG to write (its directory is created).
        statistics: the statistics to draw, one panel each.
        all_variables: also draw the variables that are not layer-adapted
            (biases, BatchNorm: trust ratio 1); by default only the adapted
            ones (kernels) are shown.
        title: the figure's title; default: the optimizer and the file name.

    Returns:
        `png_path`.
    """
    from matplotlib.colors import LogNorm, Normalize

    from keras_clars.callbacks import load_layer_statistics

    plt = _pyplot()
    data = load_layer_statistics(json_path)
    unknown = [s for s in statistics if s not in data["statistics"]]
    if unknown:
        raise ValueError(
            f"Unknown statistics {unknown}; expected some of {data['statistics']}."
        )
    if not len(data["updates"]):
        raise ValueError(f"{json_path} holds no records to plot.")
    adapted = data.get("adapted") or [True] * len(data["layers"])
    keep = [i for i, a in enumerate(adapted) if a or all_variables]
    if not keep:
        raise ValueError(
            f"{json_path} has no layer-adapted variables; pass all_variables=True."
        )
    labels = [data["layers"][i] for i in keep]
    if not all_variables:
        labels = [p[: -len("/kernel")] if p.endswith("/kernel") else p for p in labels]

    rows = len(keep)
    x_edges = _edges(data["updates"])
    y_edges = np.arange(rows + 1) - 0.5
    font = 8 if rows <= 30 else 6
    height = min(2.0 + 0.16 * rows, 30)
    fig, axes = plt.subplots(
        1, len(statistics), figsize=(6.5 * len(statistics), height), squeeze=False,
        sharey=True,
    )
    for ax, stat in zip(axes[0], statistics):
        values = np.ma.masked_invalid(data["values"][stat][:, keep].T)
        if stat == "coherence":
            norm, cmap = Normalize(0, 1), "viridis"
        else:
            positive = values[values > 0]
            norm = (
                LogNorm(positive.min(), positive.max())
                if positive.count() and positive.min() < positive.max()
                else Normalize()
            )
            cmap = "magma"
        mesh = ax.pcolormesh(x_edges, y_edges, values, norm=norm, cmap=cmap)
        ax.set_title(stat.replace("_", " "))
        ax.set_xlabel("update")
        fig.colorbar(mesh, ax=ax, fraction=0.04, pad=0.02)
    step = max(1, -(-rows // MAX_LABELS))
    ticks = np.arange(0, rows, step)
    axes[0][0].set_yticks(ticks, [labels[i] for i in ticks], fontsize=font)
    axes[0][0].invert_yaxis()  # model order, input at the top
    axes[0][0].set_ylabel("layer (model order)")
    name = os.path.basename(json_path)
    k = data.get("gradient_accumulation_steps", 1)
    fig.suptitle(title or f"{data['optimizer']} (k={k}): {name}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m recipes.report",
        description="Per-layer statistics heatmaps (the study's report: "
        "python -m recipes.study report).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    layers = commands.add_parser("layers", help="heatmaps of a LayerStatisticsLogger JSON")
    layers.add_argument("json_path", help="the LayerStatisticsLogger JSON file")
    layers.add_argument("-o", "--output",
                        help="the PNG to write (default: the JSON's name, .png)")
    layers.add_argument("--statistics", nargs="+", default=list(DEFAULT_STATISTICS),
                        help="statistics to draw, one panel each (default: %(default)s)")
    layers.add_argument("--all_variables", action="store_true",
                        help="also draw variables that are not layer-adapted")
    layers.add_argument("--title", help="the figure's title")
    args = parser.parse_args(argv)
    output = args.output or os.path.splitext(args.json_path)[0] + ".png"
    try:
        path = plot_layer_statistics(args.json_path, output, args.statistics,
                                     args.all_variables, args.title)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    print(path)
    return path


if __name__ == "__main__":
    # Reading JSON needs no TensorFlow: Keras's numpy backend imports faster.
    os.environ.setdefault("KERAS_BACKEND", "numpy")
    main()
