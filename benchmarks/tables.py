"""docs/performance.md's tables, printed from the benchmarks' JSON records.

    python -m benchmarks.tables [--results benchmarks/results/idle]
        [--hlo benchmarks/results/update_hlo_tensorflow.json ...]

Reads the records `python -m benchmarks.idle_suite` wrote into --results
(its suite.json, and each part's record) and prints markdown: where and
when they were measured, then one table per question, each ratio followed
by "met" or "not met" against its target. No number in these tables is
typed by hand; paste the output into docs/performance.md. A part that did
not run, or failed, prints as a line saying so.
"""

import argparse
import json
import os

from benchmarks.idle_suite import RESULTS


def verdict(value, target):
    """`value` to 2 decimals, in bold, and whether it is at most `target`."""
    return f"**{value:.2f}** {'met' if value <= target else 'not met'}"


def _load(suite, part):
    entry = suite["parts"].get(part, {})
    before, after = entry.get("load_average_before"), entry.get("load_average_after")
    return f"{before[0]:.2f}-{after[0]:.2f}" if before and after else "?"


def _read(results, part):
    path = os.path.join(results, part + ".json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def header(suite):
    lines = [f"Measured by `{suite['command']}` at commit "
             f"{suite['commit'][:7]}, {suite['date_utc']} UTC."]
    if suite.get("uncommitted"):
        lines.append(f"**Uncommitted changes at the time:** {suite['uncommitted']}.")
    lines.append(f"`uptime` before: `{suite['uptime_before']}`; after: "
                 f"`{suite.get('uptime_after', '?')}`.")
    lines.append("")
    lines.append("| part | status | commit | run | wall | load average (1 min) "
                 "before-after |")
    lines.append("|---|---|---|---|---|---|")
    for name, entry in suite["parts"].items():
        status = ("ok" if entry.get("ok") else entry.get("skipped")
                  or f"FAILED (exit {entry.get('returncode')})")
        wall = f"{entry['wall_s']:.0f} s" if "wall_s" in entry else "-"
        commit = (entry.get("commit") or "-")[:7] + (
            " (uncommitted changes)" if entry.get("uncommitted") else "")
        lines.append(f"| {name} | {status} | {commit} | {entry.get('date_utc', '-')} "
                     f"| {wall} | {_load(suite, name)} |")
    return lines


def per_example(results, suite):
    from benchmarks.per_example_cost import AIM, FIRST_STEP_TARGET, TARGET

    lines = [f"| backend | model | batch | CLARS step | per-example step | "
             f"time x (<= {TARGET}) | peak memory x (<= {TARGET}) | "
             f"step memory x | first step x (<= {FIRST_STEP_TARGET}) | load |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    missing = []
    for backend in ("tensorflow", "jax"):
        record = _read(results, f"per_example_{backend}")
        if record is None:
            missing.append(backend)
            continue
        for model, entry in record["models"].items():
            p, w, r = entry["clars"], entry["per_example"], entry["ratios"]
            lines.append(
                f"| {backend} | {model} | {p['batch']} | {p['step_s']:.3f} s | "
                f"{w['step_s']:.3f} s | {verdict(r['time'], TARGET)} | "
                f"{verdict(r['peak_memory'], TARGET)} | {r['step_memory']:.2f} | "
                f"{verdict(r['first_step'], FIRST_STEP_TARGET)} | "
                f"{_load(suite, 'per_example_' + backend)} |")
    lines.append("")
    lines.append(f"The aim of {AIM}x in time: " + ", ".join(
        f"{backend} {model} {'met' if entry['ratios']['time'] <= AIM else 'not met'}"
        for backend in ("tensorflow", "jax")
        if (record := _read(results, f"per_example_{backend}"))
        for model, entry in record["models"].items()) + ".")
    if missing:
        lines.append(f"Not measured in this run: per-example cost on {missing}.")
    return lines


def update(results, suite):
    from benchmarks.optimizer_step import TARGETS

    lines = ["| backend | jit | SGD | LARS | CLARS | CLARS/SGD (<= "
             f"{TARGETS['CLARS/SGD']}) | LARS/SGD | CLARS/LARS (<= "
             f"{TARGETS['CLARS/LARS']}) | load |", "|---|---|---|---|---|---|---|---|---|"]
    record = _read(results, "optimizer_step")
    for jit in ("False", "True"):
        row = (record or {}).get("update", {}).get(f"jit={jit}")
        label = "on (XLA)" if jit == "True" else "off"
        if row is None:
            lines.append(f"| tensorflow | {label} | not measured | | | | | | |")
            continue
        ms, r = row["median_ms"], row["ratios"]
        lines.append(
            f"| tensorflow | {label} | "
            + " | ".join(f"{ms[n]:.1f} ms" for n in ("SGD", "LARS", "CLARS"))
            + f" | {verdict(r['CLARS/SGD'], TARGETS['CLARS/SGD'])} | "
            f"{r['LARS/SGD']:.2f} | {verdict(r['CLARS/LARS'], TARGETS['CLARS/LARS'])}"
            f" | {_load(suite, 'optimizer_step')} |")
    jax = _read(results, "update_jax")
    if jax is None or "update" not in jax:
        lines.append("| jax | on (XLA) | not measured | | | | | | |")
    else:
        u = jax["update"]
        s = u["seconds"]
        lines.append(
            "| jax | on (`jax.jit`) | "
            + " | ".join(f"{1e3 * s[n]:.1f} ms" for n in ("SGD", "LARS", "CLARS"))
            + f" | {verdict(u['CLARS/SGD'], TARGETS['CLARS/SGD'])} | "
            f"{s['LARS'] / s['SGD']:.2f} | "
            f"{verdict(u['CLARS/LARS'], TARGETS['CLARS/LARS'])} | "
            f"{_load(suite, 'update_jax')} |")
    return lines


def norms(results):
    record = _read(results, "optimizer_step")
    if not record or "norms" not in record:
        return ["The norms alone: not measured in this run."]
    n = record["norms"]
    lines = ["| the 214 weight norms alone | median | / l2_loss, same jit | "
             "largest relative difference from the first row |", "|---|---|---|---|"]
    ratios = n["ratios"]
    for name, ms in n["median_ms"].items():
        ratio = ratios.get(f"{name}/l2_loss {name.split()[-1]}", 1.0)
        lines.append(f"| {name} | {ms:.1f} ms | {ratio:.2f} | "
                     f"{n['max_relative_difference'][name]:.1e} |")
    both = ratios.get("l2_loss jit=True/l2_loss jit=False")
    if both is not None:
        lines.append("")
        lines.append(f"l2_loss under XLA / without: {both:.2f}.")
    return lines


def train(results):
    from benchmarks.optimizer_step import TARGETS

    record = _read(results, "optimizer_step")
    if not record or "train" not in record:
        return ["The training step: not measured in this run."]
    t = record["train"]
    target = TARGETS["train CLARS/SGD"]
    return [f"| ResNet-50 training step | SGD | CLARS | CLARS/SGD (<= {target}) |",
            "|---|---|---|---|",
            f"| {t['image_size']} px, batch {t['batch']}, jit_compile="
            f"{t['jit_compile']} | {t['median_ms']['SGD']:.1f} ms | "
            f"{t['median_ms']['CLARS']:.1f} ms | "
            f"{verdict(t['ratios']['CLARS/SGD'], target)} |"]


def trace(results, suite):
    record = _read(results, "trace_update")
    if record is None:
        return ["Tracing: not measured in this run."]
    lines = [f"{record['model']} ({record['variables']} variables, k = "
             f"{record['k']}), median of {record['traces']} traces; load "
             f"{_load(suite, 'trace_update')}:", "",
             "| optimizer | trace, wall | trace, CPU | CPU / SGD's (<= 2) | "
             "one update (jit off) | / SGD's |", "|---|---|---|---|---|---|"]
    for name, o in record["optimizers"].items():
        lines.append(f"| {name} | {o['trace_wall_s']:.2f} s | {o['trace_cpu_s']:.2f} s"
                     f" | {verdict(o['trace_cpu/SGD'], 2.0)} | {o['update_ms']:.1f} ms"
                     f" | {o['update/SGD']:.2f} |")
    return lines


def noise_scale(results, suite):
    record = _read(results, "noise_scale_cost")
    if record is None:
        return ["The noise scale's cost: not measured in this run."]
    return [f"{record['model']}, CLARS, B = {record['batch']} as S = "
            f"{record['samples']} micro-batches of {record['micro_batch']}, chunks "
            f"of {record['updates_per_chunk']} updates, {record['pairs']} pairs; "
            f"load {_load(suite, 'noise_scale_cost')}:", "",
            "| noise scale off | on, logged every "
            f"{record['interval']} updates | wall ratio (<= 1.02) | CPU ratio |",
            "|---|---|---|---|",
            f"| {record['median_chunk_off_s']:.2f} s | {record['median_chunk_on_s']:.2f} s"
            f" | {verdict(record['ratio'], 1.02)} | {record['cpu_ratio']:.3f} |"]


def _or_dash(value):
    return "-" if value is None or value == "" else value


def hlo(paths):
    lines = ["| backend | commit | optimizer | kernels | loop fusions | reduce | "
             "reduce-window | before first update | order | fusions by source op |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        with open(path) as f:
            record = json.load(f)
        for name, c in record["optimizers"].items():
            sources = ", ".join(f"{k} {v}" for k, v in c["fusions_by_source_op"].items()
                                if k != "(none)") or "-"
            lines.append(f"| {record['environment']['backend']} | "
                         f"{record['commit'][:7]} | {name} | "
                         f"{c['kernels']} | {c['fusions_by_kind'].get('kLoop', 0)} | "
                         f"{c['reduce']} | {c['reduce_window']} | "
                         f"{_or_dash(c.get('before_first_momentum'))} | "
                         f"{_or_dash(c.get('sequence_digest', '')[:8])} | {sources} |")
    lines.append("")
    lines.append("(`python -m benchmarks.update_hlo`; counts, not timings: the "
                 "load does not move them.)")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default=RESULTS)
    parser.add_argument("--hlo", nargs="*", default=[],
                        help="records of benchmarks.update_hlo to tabulate")
    args = parser.parse_args(argv)
    sections = []
    suite_path = os.path.join(args.results, "suite.json")
    if os.path.exists(suite_path):
        with open(suite_path) as f:
            suite = json.load(f)
        sections += [("The run", header(suite)),
                     ("Per-example cost (issue 20)", per_example(args.results, suite)),
                     ("One update, ResNet-50", update(args.results, suite)),
                     ("The norms alone (TensorFlow)", norms(args.results)),
                     ("The training step (TensorFlow)", train(args.results)),
                     ("Tracing one update (TensorFlow)", trace(args.results, suite)),
                     ("The gradient noise scale (issue 17)",
                      noise_scale(args.results, suite))]
    else:
        print(f"No {suite_path}: run `python -m benchmarks.idle_suite` first.")
    if args.hlo:
        sections.append(("The compiled update (XLA)", hlo(args.hlo)))
    for title, lines in sections:
        print(f"\n<!-- {title}: generated by python -m benchmarks.tables -->")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
