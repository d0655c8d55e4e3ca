"""The warmup-necessity study's report: its tables, verdicts and figures.

`python -m recipes.study report` calls `write_report`: the markdown tables
under docs/results/, the blocks of docs/results.md between
`<!-- report:NAME -->` markers, `chosen.json` (the learning rates the main
job uses) and the figures under docs/img/ (drawn by `recipes.plots`), all
from the per-run JSON records, with no training. The study's summary of
the records is built once (`summarize`) and every table reads it.

Verdicts are decided by a Welch t interval at 95% (`recipes.stats`): a
difference counts only when its interval excludes 0, otherwise it is "not
decided". A stable range is bounded only by a higher rate that broke (see
`recipes.study.Plan.broken`); otherwise it is a lower bound.

Reading records needs no TensorFlow; matplotlib is imported only to draw.
"""

import dataclasses
import glob
import json
import math
import os
import re

import numpy as np

from keras_clars.callbacks import load_layer_statistics
from recipes import plots, stats

NOT_RUN = "not run yet"
# A method "loses" to warmup at this many points of validation accuracy.
LOSS_POINTS = 2.0
# Below this validation accuracy a run counts as diverged (10 classes: 0.1
# is chance; a NaN loss gives chance or worse).
DIVERGED_BELOW = 0.2
# The stable range: the rates next to a curve's best within this many points.
STABLE_POINTS = 1.0
CONFIDENCE = f"{100 * stats.CONFIDENCE:g}%"


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


def plus_minus(value, scale=100.0, digits=2, single="one seed"):
    """'mean ± std' of `stats.mean_std`; a value without spread says where it
    came from."""
    if value is None:
        return NOT_RUN
    mean, std = value
    if std is None:
        return f"{scale * mean:.{digits}f} ({single})"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def _lr(value):
    return f"{value:g}"


@dataclasses.dataclass(frozen=True)
class StableRange:
    """The ladder rates next to a curve's best within STABLE_POINTS of it.

    `broke`: the first higher rate that broke (diverged, or fell far below
    the best; `Plan.broken`), or None: then nothing above `high` broke, and
    the range is only a lower bound.
    """

    low: float
    high: float
    points: int
    broke: float = None
    top: float = None  # the highest rate run

    @property
    def bounded(self):
        return self.broke is not None

    def __str__(self):
        points = f"{self.points} point{'s' * (self.points > 1)}"
        if self.bounded:
            return f"{_lr(self.low)} to {_lr(self.high)} ({points}; broke at {_lr(self.broke)})"
        return (f"{_lr(self.low)} to ≥ {_lr(self.high)} (≥ {points}; lower bound: "
                f"nothing broke up to {_lr(self.top)})")


def stable_range(plan, tuning):
    """The `StableRange` of a curve's tuning-seed runs {lr: record} (the
    window, the points it slid past and the break runs)."""
    accuracy = {lr: final_accuracy(r) for lr, r in tuning.items()}
    best_lr = max(accuracy, key=lambda lr: (accuracy[lr], -lr))
    best = accuracy[best_lr]
    low = high = best_lr
    while low / 2 in accuracy and accuracy[low / 2] >= best - STABLE_POINTS / 100:
        low /= 2
    while high * 2 in accuracy and accuracy[high * 2] >= best - STABLE_POINTS / 100:
        high *= 2
    broke = next((lr for lr in sorted(accuracy)
                  if lr > high and plan.broken(accuracy[lr], best)), None)
    return StableRange(low, high, round(math.log2(high / low)) + 1, broke, max(accuracy))


def summarize(plan, records):
    """Collects the records per curve of a study plan.

    Args:
        plan: `recipes.study.Plan` (its curves, grid rule and seeds).
        records: run records (`load_records`).

    Returns:
        A dict: curve name -> dict with `curve`, `tuning` (lr -> record of
        the tuning seed, every phase), `window` (the lrs the choice is made
        among), `state` (`tuned`, `incomplete`, `not run yet`), `chosen` (lr
        or None), `finals` (records of the final seeds at the chosen lr) and
        `range` (`StableRange` once tuned, else None), and for a decoupled
        curve `rates` (excluded rate -> record of the check at the chosen lr,
        `Plan.rate_variants`).
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
        finals = [r for r in runs if r["study"]["seed"] in plan.seeds(curve)
                  and chosen is not None and r["study"]["lr"] == chosen]
        finals.sort(key=lambda r: r["study"]["seed"])
        out[curve.name] = {
            "curve": curve, "tuning": tuning, "window": window, "state": state,
            "chosen": chosen, "finals": finals,
            "range": stable_range(plan, tuning) if chosen is not None else None,
            "rates": {} if chosen is None else {
                variant.excluded: r for variant in plan.rate_variants(curve)
                for r in by_curve.get(variant.name, [])
                if r["study"]["seed"] == plan.tune_seed and r["study"]["lr"] == chosen}}
    return out


def _final_stats(entry):
    finals = entry["finals"]
    if not finals:
        return {}
    return {
        "seeds": [r["study"]["seed"] for r in finals],
        "values": [final_accuracy(r) for r in finals],
        "final_val": stats.mean_std([final_accuracy(r) for r in finals]),
        "best_val": stats.mean_std([r.get("best_validation_accuracy") for r in finals]),
        "test": stats.mean_std([r.get("test_accuracy") for r in finals]),
        "coherence": stats.mean_std([r.get("first_update_coherence") for r in finals]),
        "run_seconds": stats.mean_std([r.get("wall_seconds") for r in finals]),
        "diverged": sum(diverged(r) for r in finals),
    }


def _tuned(entry):
    """(final accuracies, their source) at a curve's chosen rate: the finals,
    or the tuning seed's one run; ([], NOT_RUN) before it is tuned."""
    if entry["finals"]:
        return [final_accuracy(r) for r in entry["finals"]], "finals"
    if entry["chosen"] is not None:
        return [final_accuracy(entry["tuning"][entry["chosen"]])], "tuning seed only"
    return [], NOT_RUN


def _like(a, b):
    """(values of a, values of b, source): the finals of both if both have
    them, else the tuning seed's run at each chosen rate."""
    (va, sa), (vb, sb) = _tuned(a), _tuned(b)
    if sa == sb == "finals":
        return va, vb, "finals"
    if a["chosen"] is None or b["chosen"] is None:
        return [], [], NOT_RUN
    return ([final_accuracy(a["tuning"][a["chosen"]])],
            [final_accuracy(b["tuning"][b["chosen"]])], "tuning seed only")


def _compared(a, b):
    """Two curves at their chosen rates, compared alike (`_like`): the text
    of each, and the difference a - b as `difference` gives it."""
    va, vb, source = _like(a, b)
    cells = []
    for entry, values in ((a, va), (b, vb)):
        values, single = (values, source) if values else _tuned(entry)
        cells.append(plus_minus(stats.mean_std(values), single=single)
                     if values else entry["state"])
    text, interval = difference(va, vb)
    if source == "tuning seed only":
        text += " (tuning seed)"
    return cells, text, interval


def difference(a, b):
    """(text, interval or None) of mean(a) - mean(b), in points: the
    difference and its Welch 95% interval, or why there is none."""
    if not a or not b:
        return NOT_RUN, None
    d = 100 * (np.mean(a) - np.mean(b))
    interval = stats.welch(a, b)
    if interval is None:
        return f"{d:+.2f} (one seed: no interval)", None
    i = interval.scaled(100)
    return (f"{i.difference:+.2f} ({CONFIDENCE}: {i.low:+.2f} to {i.high:+.2f}, "
            f"df {i.df:.1f})"), i


def verdict(interval):
    """ahead / behind, or not decided: the interval contains 0."""
    if interval is None:
        return "not decided (one seed)"
    return {1: "ahead", -1: "behind"}.get(
        interval.sign, f"not decided (the {CONFIDENCE} interval contains 0)")


def _beyond(interval, threshold, yes, no):
    """Whether a difference is past `threshold` (negative: below it)."""
    if interval is None:
        return "not decided (one seed)"
    sign = 1 if threshold > 0 else -1
    low, high = sorted((sign * interval.low, sign * interval.high))
    if low >= abs(threshold):
        return yes
    if high < abs(threshold):
        return no
    return f"not decided (the {CONFIDENCE} interval spans {threshold:+g} points)"


def compare_ranges(a, b):
    """Is stable range `a` wider than `b`? Only bounded ranges count: a lower
    bound decides only when it already exceeds the other, bounded, range."""
    if a is None or b is None:
        return NOT_RUN
    if a.bounded and b.bounded:
        return ("as wide" if a.points == b.points
                else "wider" if a.points > b.points else "narrower")
    if a.bounded and a.points < b.points:
        return "narrower"
    if b.bounded and b.points < a.points:
        return "wider"
    return "not decided (a range that never broke is only a lower bound)"


def _warmup(curve):
    if not curve.warmup:
        return "no"
    return "yes" if curve.warmup_epochs is None else f"{curve.warmup_epochs:g} epochs"


def _protocol(curve):
    return "tied" if curve.excluded is None else f"decoupled (excluded {curve.excluded:g})"


def _high_end(entry):
    r = entry["range"]
    if r is None:
        return entry["state"]
    if r.bounded:
        return f"broke at {_lr(r.broke)}"
    return f"not broken up to {_lr(r.top)} (lower bound)"


# ------------------------------------------------------------- the tables


def tuning_table(plan, summary):
    lines = [
        f"Tuning: final (epoch {plan.epochs}) validation accuracy, % (seed "
        f"{plan.tune_seed}), for each peak learning rate (decoupled curves: the "
        "adapted layers' rate, the biases and BatchNorm staying at the excluded "
        f"rate). **Bold**: chosen (the best of the {plan.grid_points} points in the "
        "window); (parenthesized): run, outside the window after it slid; ‡: a "
        "break run (up the ladder past the window, until a point diverges or is "
        f"{100 * plan.break_drop:g} points below the curve's best); †: diverged "
        f"(validation accuracy below {100 * DIVERGED_BELOW:.0f}% or a non-finite "
        "loss). High end: the rate that broke, or the highest run if none did (then "
        "the stable range is only a lower bound).",
        "",
        "| curve | B | b | warmup | excluded rate | state | peak lr → validation "
        "accuracy % | high end |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in summary.items():
        curve = entry["curve"]
        cells = []
        for lr in sorted(entry["tuning"]):
            record = entry["tuning"][lr]
            text = f"{_lr(lr)}: {100 * final_accuracy(record):.1f}"
            if diverged(record):
                text += "†"
            if record["study"].get("phase") == "break":
                text += "‡"
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
        excluded = "= peak lr" if curve.excluded is None else f"{curve.excluded:g}"
        lines.append(
            f"| {name} | {curve.batch_size} | {curve.slice_label} | "
            f"{_warmup(curve)} | {excluded} | {entry['state']} | "
            f"{' · '.join(cells) or NOT_RUN} | {_high_end(entry)} |"
        )
    return "\n".join(lines) + "\n"


def finals_table(plan, summary):
    lines = [
        f"Finals: the chosen peak learning rate, seeds "
        f"{', '.join(map(str, plan.final_seeds))} (more where the seeds column "
        "lists them; none used for tuning), "
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
        curve, s = entry["curve"], _final_stats(entry)
        chosen = _lr(entry["chosen"]) if entry["chosen"] is not None else NOT_RUN
        if not s:
            lines.append(
                f"| {name} | {curve.batch_size} | {curve.layout} | "
                f"{_warmup(curve)} | {chosen} | "
                f"{NOT_RUN} | | | | | | |")
            continue
        coherence = s["coherence"]
        lines.append(
            f"| {name} | {curve.batch_size} | {curve.layout} | "
            f"{_warmup(curve)} | {chosen} | "
            f"{', '.join(map(str, s['seeds']))} | {plus_minus(s['final_val'])} | "
            f"{plus_minus(s['best_val'])} | {plus_minus(s['test'])} | {s['diverged']} | "
            f"{'' if coherence is None else f'{coherence[0]:.3f}'} | "
            f"{s['run_seconds'][0]:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _pairs(summary):
    """(label, curve with warmup, curve without) for each method, B and
    protocol."""
    pairs = []
    for entry in summary.values():
        c = entry["curve"]
        if not c.warmup:
            continue
        for other in summary.values():
            o = other["curve"]
            if not o.warmup and ((o.method, o.batch_size, o.slice_size, o.excluded,
                                  o.batch_norm)
                                 == (c.method, c.batch_size, c.slice_size, c.excluded,
                                     c.batch_norm)):
                label = f"{c.method.upper()}, B={c.batch_size}"
                if c.method != "sgd":
                    label += f", {_protocol(c)}"
                if c.variant:
                    label += f", {c.variant}"
                pairs.append((label, entry, other))
    return pairs


WARMUP_HEADER = [
    "| method, B, protocol | tuned: with warmup | tuned: without | difference "
    f"without − with (points, {CONFIDENCE} interval) | loses ≥ {LOSS_POINTS:g} "
    f"points tuned? | same rate: loses ≥ {LOSS_POINTS:g} points or diverges at | "
    "high end: with / without |",
    "|---|---|---|---|---|---|---|",
]


def _warmup_row(label, warm, cold):
    (without, with_), text, interval = _compared(cold, warm)
    loses = NOT_RUN if text == NOT_RUN else _beyond(interval, -LOSS_POINTS, "yes", "no")
    where = []
    shared = set(warm["tuning"]) & set(cold["tuning"])
    for lr in sorted(shared):
        a, b = warm["tuning"][lr], cold["tuning"][lr]
        if diverged(b) and not diverged(a):
            where.append(f"{_lr(lr)} (diverged)")
        elif 100 * (final_accuracy(a) - final_accuracy(b)) >= LOSS_POINTS:
            where.append(f"{_lr(lr)} ({100 * (final_accuracy(b) - final_accuracy(a)):+.1f})")
    return (f"| {label} | {with_} | {without} | {text} | {loses} | "
            f"{', '.join(where) or ('none' if shared else NOT_RUN)} | "
            f"{_high_end(warm)} / {_high_end(cold)} |")


def warmup_table(plan, summary):
    """Where does dropping warmup cost >= LOSS_POINTS, or diverge?"""
    lines = [
        "Warmup necessity: without warmup against with it, same method, B and "
        "protocol. Tuned: each curve at its own chosen rate (the finals, mean ± "
        f"std over seeds, when both have them; else the tuning seed "
        f"{plan.tune_seed}'s run at each chosen rate, which decides nothing). "
        f"Loses: decided by the Welch {CONFIDENCE} interval of the difference "
        f"(yes: it lies at or below -{LOSS_POINTS:g}; no: above). Same rate: "
        f"the rates run by both (tuning seed) where the run without warmup is at "
        f"least {LOSS_POINTS:g} points below the run with it, or diverged where "
        "that did not. High end: as in the tuning table.",
        "",
        *WARMUP_HEADER,
    ]
    lines += [_warmup_row(*pair) for pair in _pairs(summary)]
    return "\n".join(lines) + "\n"


def ablation_table(plan, summary):
    rows = [e for e in summary.values()
            if e["curve"].method == "clars" and not e["curve"].warmup
            and e["curve"].batch_size == plan.ablation_batch]
    rows.sort(key=lambda e: (e["curve"].excluded is not None, e["curve"].slice_size))
    lines = [
        f"Slice-size ablation: CLARS without warmup at B={plan.ablation_batch}, "
        "each slice size b with its own rate tuned on validation (same grid "
        "size), under each protocol (tied: one peak lr for everything; "
        "decoupled: the biases and BatchNorm at a fixed rate, the tuned lr is "
        "the adapted layers'). b = 1: exact per-example norms (micro-batches of "
        f"{plan.micro_batch}); otherwise b is the micro-batch, so BatchNorm's "
        "batch changes with b too. Stable range: as in the verdicts.",
        "",
        "| protocol | b | S | peak lr | tuned val. acc. (seed 0) | final val. acc. | "
        "test acc. | coherence, update 1 | stable range |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in rows:
        curve, s = e["curve"], _final_stats(e)
        tuned = (f"{100 * final_accuracy(e['tuning'][e['chosen']]):.2f}"
                 if e["chosen"] is not None else NOT_RUN)
        coherence = s.get("coherence") if s else None
        lines.append(
            f"| {_protocol(curve)} | {curve.slice_label} | {curve.samples} | "
            f"{_lr(e['chosen']) if e['chosen'] is not None else NOT_RUN} | {tuned} | "
            f"{plus_minus(s['final_val']) if s else NOT_RUN} | "
            f"{plus_minus(s['test']) if s else NOT_RUN} | "
            f"{'' if coherence is None else f'{coherence[0]:.3f}'} | "
            f"{e['range'] or NOT_RUN} |"
        )
    return "\n".join(lines) + "\n"


def verdicts_table(plan, summary):
    def stats_of(name):
        return _final_stats(summary[name]) if name in summary else {}

    names = plan.claim_curves
    lines = [
        f"Each claim, decided mechanically from the finals ({len(plan.final_seeds)} "
        "seeds each, [finals](#finals)) by `recipes/report.py`: a difference counts "
        f"only when its Welch {CONFIDENCE} interval (Welch-Satterthwaite df) "
        "excludes 0; otherwise it is not decided. Stable range ([tuning](#tuning)): "
        f"the ladder rates next to the curve's best within {STABLE_POINTS:g} point "
        "of it, over every tuning-seed run; bounded only if a higher rate broke "
        "(else a lower bound, ≥), and only bounded ranges are compared.",
        "",
        "| claim | comparison | numbers (%) | difference (points) | verdict |",
        "|---|---|---|---|---|",
    ]

    def row(claim, a, b, large=None):
        sa, sb = stats_of(a), stats_of(b)
        if not sa or not sb:
            lines.append(f"| {claim} | {a} vs {b} | {NOT_RUN} | {NOT_RUN} | {NOT_RUN} |")
            return
        text, interval = difference(sa["values"], sb["values"])
        word = verdict(interval)
        if large is not None and interval is not None and interval.sign > 0:
            word += (f"; by a large margin (≥ {large:g} points)? "
                     f"{_beyond(interval, large, 'yes', 'no')}")
        lines.append(
            f"| {claim} | {a} vs {b} | finals: {plus_minus(sa['final_val'])} vs "
            f"{plus_minus(sb['final_val'])} (n = {len(sa['values'])}, "
            f"{len(sb['values'])}) | {text} | {word} |")

    row("1. CLARS needs no warmup", names["clars"], names["lars_warmup"])
    if names.get("clars_per_example"):
        row("1. CLARS needs no warmup (per-example norms)", names["clars_per_example"],
            names["lars_warmup"])
    if names.get("clars_bigger"):
        row("1. CLARS needs no warmup (larger B)", names["clars_bigger"],
            names["lars_warmup_bigger"])
    row("2. CLARS beats gradual warmup by a large margin", names["clars"],
        names["sgd_warmup"], large=LOSS_POINTS)
    ranged = [n for n in (names["clars"], names["lars_warmup"],
                          names.get("clars_per_example"), names.get("clars_bigger"),
                          names.get("lars_warmup_bigger")) if n and n in summary]
    for name in ranged:
        lines.append(f"| 1. stable range | {name} | tuning: "
                     f"{len(summary[name]['tuning'])} rates run | | "
                     f"{summary[name]['range'] or NOT_RUN} |")
    for a, b in ((names["clars"], names["lars_warmup"]),
                 (names.get("clars_per_example"), names["lars_warmup"]),
                 (names.get("clars_bigger"), names.get("lars_warmup_bigger"))):
        if a in summary and b in summary:
            ra, rb = summary[a]["range"], summary[b]["range"]
            points = "" if ra is None or rb is None else (
                f"{'' if ra.bounded else '≥ '}{ra.points} vs "
                f"{'' if rb.bounded else '≥ '}{rb.points} points (tuning seed: one "
                "run per rate, no interval)")
            lines.append(f"| 1. stable range, compared | {a} vs {b} | {points} | | "
                         f"{compare_ranges(ra, rb)} |")
    # Claim 3: epochs until the validation accuracy (mean over the finals)
    # is within 1 point of LARS-with-warmup's final.
    reference = stats_of(names["lars_warmup"])
    for name in (names["clars"], names["lars_warmup"]):
        entry = summary.get(name)
        if not entry or not entry["finals"] or not reference:
            lines.append(f"| 3. converges faster than LARS with warmup | {name}: epochs "
                         f"to within 1 point of LARS+warmup's final | {NOT_RUN} | | "
                         f"{NOT_RUN} |")
            continue
        curves = np.array([[e.get("val_accuracy") or 0.0 for e in r["epochs"]]
                           for r in entry["finals"]], dtype="float64").mean(axis=0)
        target = reference["final_val"][0] - 0.01
        reached = [i + 1 for i, v in enumerate(curves) if v >= target]
        lines.append(
            f"| 3. converges faster than LARS with warmup | {name}: epochs to "
            f"within 1 point of LARS+warmup's final | validation by epoch, mean of "
            f"the finals: {', '.join(f'{100 * v:.1f}' for v in curves)} | | "
            f"{reached[0] if reached else 'never'} of {len(curves)} |")
    return "\n".join(lines) + "\n"


def _twin(summary, curve):
    """The tied-protocol curve of a decoupled one, or None."""
    for entry in summary.values():
        c = entry["curve"]
        if c.excluded is None and (c.method, c.batch_size, c.warmup, c.slice_size,
                                   c.warmup_epochs, c.batch_norm) == (
                curve.method, curve.batch_size, curve.warmup, curve.slice_size,
                curve.warmup_epochs, curve.batch_norm):
            return entry
    return None


def decoupled_table(plan, summary):
    """Issue 19's hypothesis: what warmup protects is the excluded variables
    at their plain rate. Tied against decoupled at tuned optima and at equal
    step, and warmup under each protocol."""
    pairs = [(_twin(summary, e["curve"]), e) for e in summary.values()
             if e["curve"].excluded is not None]
    pairs = [(tied, dec) for tied, dec in pairs if tied is not None]
    if not pairs:
        return "No decoupled curves in this plan.\n"
    rates = sorted({dec["curve"].excluded for _, dec in pairs})
    lines = [
        "Tied against decoupled. Tied: one peak lr for the adapted layers' step "
        "(lr × eta × trust ratio) and for the plain rate of the biases and "
        "BatchNorm; decoupled: the ladder moves only the layers' lr, the others "
        f"stay at {', '.join(f'{r:g}' for r in rates)} (same warmup and decay). "
        "Tuned optima: each curve at its own chosen rate (the finals if both "
        f"have them, else the tuning seed {plan.tune_seed}'s run, which decides "
        f"nothing); the difference's Welch {CONFIDENCE} interval decides. Stable "
        "range and high end: as in the verdicts and the tuning table.",
        "",
        "| decoupled curve | tied: peak lr, val. acc. | decoupled: layers' peak lr, "
        f"val. acc. | difference decoupled − tied (points, {CONFIDENCE} interval) | "
        "verdict | stable range: tied | stable range: decoupled | decoupled range "
        "against tied |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for tied, dec in pairs:
        cells, text, interval = _compared(dec, tied)
        cells = [cell if e["chosen"] is None else f"{_lr(e['chosen'])}: {cell}"
                 for e, cell in zip((dec, tied), cells)]
        lines.append(
            f"| {dec['curve'].name} | {cells[1]} | {cells[0]} | {text} | "
            f"{NOT_RUN if text == NOT_RUN else verdict(interval)} | "
            f"{tied['range'] or NOT_RUN} | "
            f"{dec['range'] or NOT_RUN} | {compare_ranges(dec['range'], tied['range'])} |")
    lines += [
        "",
        f"At equal step: the same layers' peak lr, seed {plan.tune_seed}, at every "
        "rate both ran: tied → decoupled accuracy, % (difference, points; one "
        "seed each: descriptive). At the excluded rate itself the two protocols give "
        "every variable the same peak rate. †: diverged.",
        "",
        "| decoupled curve | peak lr: tied → decoupled (difference) |",
        "|---|---|",
    ]
    for tied, dec in pairs:
        cells = []
        for lr in sorted(set(tied["tuning"]) & set(dec["tuning"])):
            t, d = tied["tuning"][lr], dec["tuning"][lr]
            cells.append(
                f"{_lr(lr)}: {100 * final_accuracy(t):.1f}{'†' * diverged(t)} → "
                f"{100 * final_accuracy(d):.1f}{'†' * diverged(d)} "
                f"({100 * (final_accuracy(d) - final_accuracy(t)):+.1f})")
        lines.append(f"| {dec['curve'].name} | {' · '.join(cells) or NOT_RUN} |")
    both = {(d["curve"].method, d["curve"].batch_size) for _, d in pairs}
    lines += [
        "",
        "Warmup under each protocol: as in [the warmup table](#where-warmup-is-"
        "necessary), for the methods run under both.",
        "",
        *WARMUP_HEADER,
    ]
    lines += [_warmup_row(label, warm, cold) for label, warm, cold in _pairs(summary)
              if (warm["curve"].method, warm["curve"].batch_size) in both]
    return "\n".join(lines) + "\n"


def rates_table(plan, summary):
    """The excluded rate's check: at each decoupled curve's chosen step, its
    rate at the shared value and at the `Plan.rate_variants` multiples."""
    rows = [e for e in summary.values() if e["curve"].excluded is not None]
    if not rows:
        return "No decoupled curves in this plan.\n"
    rates = sorted({v.excluded for e in rows for v in plan.rate_variants(e["curve"])}
                   | {e["curve"].excluded for e in rows})
    lines = [
        "The excluded rate's check: each decoupled curve at its chosen layers' "
        "peak lr, with the biases' and BatchNorm's peak rate at the shared "
        "value and at half and twice it (seed "
        f"{plan.tune_seed}, final validation accuracy, %; one seed each: "
        "descriptive). Capped: a neighbour beat the shared rate by "
        f"{LOSS_POINTS:g} points or more, so the shared rate may cap the curve.",
        "",
        "| decoupled curve | layers' peak lr | "
        + " | ".join(f"excluded {r:g}" for r in rates) + " | capped? |",
        "|---|---|" + "---|" * (len(rates) + 1),
    ]
    for e in rows:
        curve, chosen = e["curve"], e["chosen"]
        if chosen is None:
            lines.append(f"| {curve.name} | {e['state']} |" + " |" * (len(rates) + 1))
            continue
        runs = {**e["rates"], curve.excluded: e["tuning"][chosen]}
        cells = [f"{100 * final_accuracy(runs[r]):.2f}{'†' * diverged(runs[r])}"
                 if r in runs else NOT_RUN for r in rates]
        shared = final_accuracy(runs[curve.excluded])
        gains = {r: 100 * (final_accuracy(run) - shared) for r, run in e["rates"].items()}
        if len(gains) < len(plan.rate_variants(curve)):
            capped = NOT_RUN
        else:
            best = max(gains, key=gains.get)
            capped = (f"yes: {gains[best]:+.2f} at {best:g}"
                      if gains[best] >= LOSS_POINTS else
                      f"no (best neighbour {gains[best]:+.2f} at {best:g})")
        lines.append(f"| {curve.name} | {_lr(chosen)} | " + " | ".join(cells)
                     + f" | {capped} |")
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
        s = _final_stats(entry)
        if s:  # the finals' spread, for the main job to compare against
            out[name]["finals"] = {
                "seeds": s["seeds"],
                **{k: list(s[k]) for k in ("best_val", "final_val", "test")
                   if s[k] is not None},
            }
    return out


TABLES = {
    "tuning": tuning_table,
    "finals": finals_table,
    "warmup": warmup_table,
    "ablation": ablation_table,
    "verdicts": verdicts_table,
    "decoupled": decoupled_table,
    "rates": rates_table,
}


# Updates at which the coherence table samples a run (B=4096: 12 an epoch).
COHERENCE_UPDATES = (1, 6, 12, 24, 48, 96, 144)


def coherence_table(statistics_dir, warmup_updates=24):
    """Coherence over training, from the per-layer statistics on file.

    CLARS's relative step is lr * eta * coherence, so coherence that rises
    would act as a warmup, and coherence that falls as an extra decay.
    """
    paths = sorted(glob.glob(os.path.join(statistics_dir, "*.json")))
    if not paths:
        return f"No per-layer statistics on record ({NOT_RUN}).\n"
    lines = [
        "Coherence ||g_l|| / N_l over training: the geometric mean over the "
        "adapted layers at each update (1 for LARS), from the runs that logged "
        "every update (`docs/results/layer_statistics/`). CLARS's relative step "
        "is lr × eta × coherence: a coherence that rose would act as a warmup, "
        f"one that falls as an extra decay. Largest rise: the highest value in "
        f"the first {warmup_updates} updates (a 2-epoch warmup's length at "
        "B=4096) over update 1's; a linear warmup multiplies the rate by "
        f"{warmup_updates} over that span.",
        "",
        "| run | " + " | ".join(f"update {u}" for u in COHERENCE_UPDATES)
        + f" | largest rise, first {warmup_updates} updates | last / first |",
        "|---|" + "---|" * (len(COHERENCE_UPDATES) + 2),
    ]
    for path in paths:
        data = load_layer_statistics(path)
        series = dict(zip(data["updates"].tolist(), plots.mean_coherence(data)))
        first, last = series[min(series)], series[max(series)]
        early = max(v for u, v in series.items() if u <= warmup_updates)
        cells = [f"{series[u]:.3f}" if u in series else "-" for u in COHERENCE_UPDATES]
        lines.append(f"| {os.path.basename(path)[:-5]} | " + " | ".join(cells)
                     + f" | {early / first:.2f}x | {last / first:.2f} |")
    return "\n".join(lines) + "\n"


# Epochs at whose end the noise table samples B_simple (and update 1).
NOISE_EPOCHS = (1, 2, 4, 8, 12)


def _batch_of(name):
    return int(re.match(r"B(\d+)_", name).group(1))


def noise_table(noise_dir):
    """B_simple over training, from the logs with the noise scale on file
    whose run has its record (a run still training is left out)."""
    runs = os.path.join(os.path.dirname(os.path.abspath(noise_dir)), "runs")

    def finished(path):  # a record that names this log
        name = os.path.basename(path)
        for folder in (os.path.join(noise_dir, "runs"), runs):
            record = os.path.join(folder, name)
            if os.path.exists(record):
                with open(record) as f:
                    logged = json.load(f)["config"].get("layer_stats_path") or ""
                if logged.endswith(os.path.join("noise_scale", name)):
                    return True
        return False

    paths = sorted(filter(finished, glob.glob(os.path.join(noise_dir, "*.json"))))
    if not paths:
        return f"No noise-scale logs on record ({NOT_RUN}).\n"
    lines = [
        "The gradient noise scale B_simple = EMA(tr Sigma) / EMA(|G|^2) (McCandlish "
        "et al. 2018; docs/noise_scale.md) over training, in examples, from the "
        "runs that logged it (`docs/results/noise_scale/`: each claim curve's "
        "first final seed re-run with it logged every update, and the decoupled "
        "curves' finals, every 10). Estimated from the update's S samples of b "
        "examples (the run's layout); the averages' decay is 0.95. -: not "
        "logged at that update, or no value yet. B / B_simple: how far the batch "
        "is above the noise scale (far above 1: a larger batch buys little). "
        "Epoch e: the last logged update of epoch e (B = 4096: 12 updates an "
        "epoch; 8192: 6).",
        "",
        "| run | B | update 1 | " + " | ".join(f"epoch {e}" for e in NOISE_EPOCHS)
        + " | B / B_simple: first, last |",
        "|---|---|---|" + "---|" * (len(NOISE_EPOCHS) + 1),
    ]
    for path in paths:
        data = load_layer_statistics(path)
        name = os.path.basename(path)[:-5]
        batch = _batch_of(name)
        series = {u: v for u, v in zip(data["updates"].tolist(), data["b_simple"])
                  if np.isfinite(v)}
        # The last record of each epoch (epochs count from 0 in the log).
        last_of = {int(e) + 1: u for u, e in zip(data["updates"].tolist(), data["epochs"])}
        points = [1] + [last_of.get(e) for e in NOISE_EPOCHS]
        cells = [f"{series[u]:.0f}" if u in series else "-" for u in points]
        ends = (f"{batch / series[min(series)]:.1f}, {batch / series[max(series)]:.1f}"
                if series else "-")
        lines.append(f"| {name} | {batch} | " + " | ".join(cells) + f" | {ends} |")
    return "\n".join(lines) + "\n"


def tables(plan, summary, statistics_dir=None, noise_dir=None):
    """Every table, as {name: markdown}, plus `chosen.json`'s text; with
    `statistics_dir`, also the coherence table of the per-layer logs there,
    and with `noise_dir` the noise scale's table."""
    out = {name: make(plan, summary) for name, make in TABLES.items()}
    if statistics_dir is not None:
        out["coherence"] = coherence_table(statistics_dir)
    if noise_dir is not None:
        out["noise"] = noise_table(noise_dir)
    out["chosen.json"] = json.dumps(chosen_rates(plan, summary), indent=1,
                                    sort_keys=True) + "\n"
    return out


def noise_runs(plan, out_dir):
    """(legend, statistics JSON, B) of the noise phase's runs on record."""
    runs = []
    for name in plan.noise_curves:
        curve = plan.curve(name)
        for path in sorted(glob.glob(os.path.join(
                out_dir, "noise_scale", "runs", f"{name}_lr*_s*.json"))):
            stats = os.path.join(out_dir, "noise_scale", os.path.basename(path))
            if os.path.exists(stats):
                runs.append((f"{curve.legend}, B={curve.batch_size}", stats,
                             curve.batch_size))
    return runs


def figures_block(records, img="img", noise=False):
    """results.md's `figures` block: the figures the records allow."""
    if not records:
        return f"No figures yet: no run is on record ({NOT_RUN}).\n"
    lines = [
        f"![final validation accuracy against peak learning rate]({img}/warmup_necessity.png)",
        "",
        f"![validation accuracy per epoch of the finals]({img}/final_epochs.png)",
    ]
    if noise:
        lines += ["", f"![gradient noise scale and coherence over training]"
                  f"({img}/noise_scale.png)"]
    for record in records:
        path = record["config"].get("layer_stats_path")
        # Heatmaps of the runs that logged every update (not the noise logs).
        if (record["config"].get("layer_stats_interval") and path
                and os.path.basename(os.path.dirname(path)) == "layer_statistics"):
            name = os.path.basename(path)[:-len(".json")]
            lines += ["", f"![per-layer coherence and trust ratio, {name}]"
                      f"({img}/layers_{name}.png)"]
    return "\n".join(lines) + "\n"


def blocks(texts, records, noise=False):
    """The blocks of docs/results.md: every table of `tables` and the
    figures (`noise`: with the noise scale's)."""
    out = {name: text for name, text in texts.items() if not name.endswith(".json")}
    out["figures"] = figures_block(records, noise=noise)
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
    summary = summarize(plan, records)
    texts = tables(plan, summary, os.path.join(out_dir, "layer_statistics"),
                   os.path.join(out_dir, "noise_scale"))
    written = []
    for name, text in texts.items():
        path = os.path.join(out_dir, name if name.endswith(".json") else f"{name}.md")
        os.makedirs(out_dir, exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        written.append(path)
    if results_md and os.path.exists(results_md):
        with open(results_md) as f:
            text = f.read()
        new = replace_blocks(text, blocks(texts, records, bool(noise_runs(plan, out_dir))))
        if new != text:
            with open(results_md, "w") as f:
                f.write(new)
        written.append(results_md)
    if figures and records:
        written += [
            plot_warmup_necessity(plan, summary, os.path.join(img_dir, "warmup_necessity.png")),
            plot_finals(summary, os.path.join(img_dir, "final_epochs.png"))]
        noise = noise_runs(plan, out_dir)
        if noise:
            written.append(plots.plot_noise_scale(
                noise, os.path.join(img_dir, "noise_scale.png"),
                "Gradient noise scale and coherence: the claim curves' first final seed"))
        for path in sorted(glob.glob(os.path.join(out_dir, "layer_statistics", "*.json"))):
            # (the records name these files; see figures_block)
            png = os.path.join(img_dir, "layers_" + os.path.basename(path)[:-5] + ".png")
            written.append(plots.plot_layer_statistics(path, png))
    return written


# ------------------------------------------------------------- the figures


def plot_warmup_necessity(plan, summary, path):
    """Final validation accuracy against peak learning rate, one panel per
    (B, family) of the plan: where the warmup claim lives."""
    panels = []
    for title, names in plan.figure_panels:
        series = []
        for name in names:
            entry = summary.get(name)
            if not entry or not entry["tuning"]:
                continue
            lrs = sorted(entry["tuning"])
            series.append(dict(
                label=entry["curve"].legend, lrs=lrs, chosen=entry["chosen"],
                values=[100 * final_accuracy(entry["tuning"][lr]) for lr in lrs],
                dashed=not entry["curve"].warmup))
        panels.append((title, series))
    return plots.accuracy_against_lr(panels, path, plan.description)


def plot_finals(summary, path):
    """Validation accuracy per epoch of the finals (mean, min-max band), one
    panel per B, protocol and network (the tied and decoupled curves, and the
    network without BatchNorm, apart)."""
    def panel(curve):
        parts = [f"finals, B={curve.batch_size}"]
        if curve.excluded is not None:
            parts.append(_protocol(curve))
        if not curve.batch_norm:
            parts.append("no BatchNorm")
        return ", ".join(parts)

    titles = []
    for entry in sorted(summary.values(), key=lambda e: e["curve"].batch_size):
        if entry["finals"] and panel(entry["curve"]) not in titles:
            titles.append(panel(entry["curve"]))
    panels = [(title, [
        (f"{e['curve'].legend}, lr {_lr(e['chosen'])}",
         100 * np.array([[x.get("val_accuracy") or 0.0 for x in r["epochs"]]
                         for r in e["finals"]], dtype="float64"),
         not e["curve"].warmup)
        for e in summary.values() if e["finals"] and panel(e["curve"]) == title])
        for title in titles]
    return plots.epoch_bands(panels, path)
