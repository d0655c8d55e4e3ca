"""The warmup-necessity study (recipes.study) and its report (recipes.report)."""

import json
import os
import signal
import subprocess
import sys

import pytest
from absl import app

from recipes import callbacks, report, stats, study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "docs", "results")
FASHION = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


def _read(path):
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------- the plan


def test_every_curve_chooses_among_the_same_number_of_points():
    plan = study.Plan()
    curve = plan.curve("B4096_lars_warmup_b256")
    ladder = [0.25 * 2**i for i in range(-5, 12)]

    def state(peak):  # accuracy falls off on both sides of `peak`
        return plan.tuning_state(curve, {lr: 1 - abs(ladder.index(lr) - ladder.index(peak)) / 20
                                         for lr in ladder})

    window, status, chosen = state(2.0)  # interior: the first window stands
    assert window == [0.25, 0.5, 1, 2, 4] and status == "tuned" and chosen == 2.0
    window, status, chosen = state(16.0)  # past the top: slides until interior
    assert window == [2, 4, 8, 16, 32] and chosen == 16.0
    window, status, chosen = state(0.125 / 4)  # far below: at most 3 slides
    assert window == [0.25 / 8 * 2**i for i in range(5)] and chosen == 0.25 / 8
    assert len(window) == plan.grid_points == 5
    # A missing point of the window: not tuned, nothing chosen.
    window, status, chosen = plan.tuning_state(curve, {0.25: 0.5, 0.5: 0.6})
    assert status == "incomplete" and chosen is None
    assert plan.tuning_state(curve, {})[1] == report.NOT_RUN


def test_the_protocol_is_the_same_for_every_method():
    plan = study.Plan()
    configs = {c.name: plan.config(c, 1.0, 1) for c in plan.curves}
    for name, config in configs.items():
        curve = plan.curve(name)
        assert (config.image_size, config.depth, config.width, config.epochs) == (14, 8, 8, 12)
        assert config.validation_examples == 10848 and not config.augment
        assert config.trust_coefficient == study.ETA and config.weight_decay == 0
        assert config.warmup_epochs == (0 if not curve.warmup else
                                        curve.warmup_epochs or 2)
        assert config.batch_norm == curve.batch_norm
        assert config.per_example_norms == (curve.slice_size == 1)
        # BatchNorm over 256 examples for every method but the b ablation.
        assert config.micro_batch_size == (256 if curve.slice_size in (1, 256)
                                           else curve.slice_size)
    methods = {(c.method, c.batch_size, c.warmup, c.slice_size) for c in plan.curves}
    assert {("sgd", 4096, True, 256), ("sgd", 4096, False, 256), ("lars", 4096, True, 256),
            ("lars", 4096, False, 256), ("clars", 4096, False, 256),
            ("clars", 4096, False, 1), ("lars", 8192, True, 256),
            ("lars", 8192, False, 256), ("clars", 8192, False, 256),
            ("clars", 4096, False, 64), ("clars", 4096, False, 1024),
            ("lars", 16384, True, 256), ("lars", 16384, False, 256)} == methods
    # Issue 19's search for warmup: a 4-epoch warmup at B = 16384, and
    # LARS without BatchNorm at B = 4096, with and without warmup.
    variants = {(c.batch_size, c.warmup, c.warmup_epochs, c.batch_norm)
                for c in plan.curves if c.variant}
    assert variants == {(16384, True, 4, True), (4096, True, None, False),
                        (4096, False, None, False)}


def test_bad_arguments_are_refused():
    with pytest.raises(app.UsageError, match="unknown phase 'train_everything'"):
        study.run_args(["train_everything"])
    with pytest.raises(app.UsageError, match="--max_runs must be >= 0"):
        study.run_args(["status", "--max_runs", "-1"])
    with pytest.raises(ValueError, match="Unknown curve 'B1_adam'"):
        study.run_args(["status", "--curves", "B1_adam"])


# ------------------------------------------------- the committed report


def test_one_seed_shows_no_spread_and_decides_nothing():
    assert report.plus_minus(stats.mean_std([0.5])) == "50.00 (one seed)"
    assert report.plus_minus(stats.mean_std([0.5, 0.7])) == "60.00 ± 14.14"
    text, interval = report.difference([0.9], [0.8, 0.81, 0.79])
    assert text == "+10.00 (one seed: no interval)" and interval is None
    assert report.verdict(interval).startswith("not decided")


def test_verdicts_are_decided_by_the_95_percent_interval():
    # Three seeds each, 1 point apart with a spread of 0.5: d/SE = 2.45,
    # which the old twice-the-standard-error rule called "ahead"; the 95%
    # interval (df 4, t = 2.776) contains 0.
    a, b = [0.885, 0.890, 0.895], [0.875, 0.880, 0.885]
    text, interval = report.difference(a, b)
    assert interval.difference == pytest.approx(1.0)
    assert interval.low < 0 < interval.high
    assert report.verdict(interval) == "not decided (the 95% interval contains 0)"
    assert text == "+1.00 (95%: -0.13 to +2.13, df 4.0)"
    _, interval = report.difference([0.90, 0.905, 0.91], b)
    assert report.verdict(interval) == "ahead" and interval.low > 0
    assert report.verdict(report.difference(b, [0.90, 0.905, 0.91])[1]) == "behind"
    # A threshold counts only when the interval is past it.
    assert report._beyond(interval, 2.0, "large", "small").startswith("not decided")
    assert report._beyond(interval.scaled(10), 2.0, "large", "small") == "large"
    assert report._beyond(interval.scaled(0.1), 2.0, "large", "small") == "small"


def _records(curve, accuracies, phase="tune", seed=0):
    return [{"study": {"curve": curve, "lr": lr, "seed": seed, "phase": phase},
             "final_validation_accuracy": a, "epochs": [{"loss": 1.0}]}
            for lr, a in accuracies.items()]


def test_stable_range_is_bounded_only_by_a_rate_that_broke():
    plan = study.Plan()
    name = "B4096_lars_warmup_b256"
    window = {0.25: 0.80, 0.5: 0.85, 1: 0.87, 2: 0.885, 4: 0.88}
    summary = report.summarize(plan, _records(name, window))
    r = summary[name]["range"]
    assert (r.low, r.high, r.points, r.bounded) == (2, 4, 2, False)
    assert str(r) == "2 to ≥ 4 (≥ 2 points; lower bound: nothing broke up to 4)"
    # The break runs: 8 is 3 points down (not broken), 16 diverged.
    records = _records(name, window) + _records(name, {8: 0.855, 16: 0.1}, "break")
    summary = report.summarize(plan, records)
    r = summary[name]["range"]
    assert (r.low, r.high, r.points, r.broke) == (2, 4, 2, 16)
    assert str(r) == "2 to 4 (2 points; broke at 16)"
    table = report.tuning_table(plan, summary)
    assert "8: 85.5‡" in table and "16: 10.0†‡" in table and "| broke at 16 |" in table
    # Only bounded ranges are compared; a lower bound decides only when it
    # already exceeds the other range.
    wide = report.StableRange(1, 8, 4)  # >= 4 points
    assert report.compare_ranges(r, wide) == "narrower"
    assert report.compare_ranges(wide, r) == "wider"
    assert report.compare_ranges(report.StableRange(2, 4, 2), report.StableRange(
        2, 8, 3, 16)).startswith("not decided")  # >= 2 points against 3
    assert report.compare_ranges(r, report.StableRange(2, 8, 3, 16)) == "narrower"
    assert report.compare_ranges(r, report.StableRange(1, 2, 2, 4)) == "as wide"


def test_decoupled_comparison_works_with_incomplete_data():
    plan = study.Plan()
    tied, decoupled = "B4096_lars_nowarmup_b256", "B4096_lars_nowarmup_b256_x4"
    records = (_records(tied, {0.25: 0.80, 0.5: 0.85, 1: 0.87, 2: 0.88, 4: 0.885})
               + _records(tied, {8: 0.1}, "break")
               + _records(decoupled, {2: 0.86, 4: 0.885, 8: 0.87}))
    table = report.decoupled_table(plan, report.summarize(plan, records))
    row = [line for line in table.splitlines() if line.startswith(f"| {decoupled} |")]
    assert len(row) == 2  # tuned optima, equal step
    # Tuned optima: the tied curve is tuned, the decoupled one incomplete.
    assert "| 4: 88.50 (tuning seed only) | incomplete | not run yet |" in row[0]
    # Equal step: the rates both ran, with the difference.
    assert "8: 10.0† → 87.0 (+77.0)" in row[1] and "4: 88.5 → 88.5 (+0.0)" in row[1]
    assert "| B4096_lars_warmup_b256_x4 | not run yet |" in table


def test_rate_check_reads_the_variants_at_the_chosen_step():
    plan = study.Plan()
    name = "B4096_lars_nowarmup_b256_x4"
    curve = plan.curve(name)
    assert [v.name for v in plan.rate_variants(curve)] == [
        "B4096_lars_nowarmup_b256_x2", "B4096_lars_nowarmup_b256_x8"]
    assert plan.rate_variants(plan.curve("B4096_lars_nowarmup_b256")) == []
    window = {0.5: 0.84, 1: 0.85, 2: 0.87, 4: 0.88, 8: 0.89, 16: 0.875}
    records = (_records(name, window) + _records(
        "B4096_lars_nowarmup_b256_x2", {8: 0.86, 4: 0.99}, "rates"))
    row = [line for line in report.rates_table(
        plan, report.summarize(plan, records)).splitlines() if name in line]
    # Only the chosen step's check counts (lr 4's run is another step).
    assert row == [f"| {name} | 8 | 86.00 | 89.00 | not run yet | not run yet |"]
    records += _records("B4096_lars_nowarmup_b256_x8", {8: 0.915}, "rates")
    row = [line for line in report.rates_table(
        plan, report.summarize(plan, records)).splitlines() if name in line]
    assert row == [f"| {name} | 8 | 86.00 | 89.00 | 91.50 | yes: +2.50 at 8 |"]


def test_a_curve_with_more_final_seeds_counts_all_of_them():
    plan = study.Plan()
    more, plain = "B4096_lars_warmup_b256_nobn", "B16384_lars_warmup_b256"
    assert plan.seeds(plan.curve(more)) == (1, 2, 3, 4, 5)
    assert plan.seeds(plan.curve(plain)) == plan.final_seeds == (1, 2, 3)
    window = {0.5: 0.80, 1: 0.82, 2: 0.1, 4: 0.1, 8: 0.1}
    records = []
    for name in (more, plain):
        records += _records(name, window)
        for seed in range(1, 6):  # seeds 4 and 5 count only where the curve asks
            records += _records(name, {1: 0.80 + seed / 100}, "final", seed)
        records += _records(name, {0.5: 0.5}, "final", 4)  # not the chosen lr
    for record in records:
        record["wall_seconds"] = 100.0
    summary = report.summarize(plan, records)
    assert [r["study"]["seed"] for r in summary[more]["finals"]] == [1, 2, 3, 4, 5]
    assert [r["study"]["seed"] for r in summary[plain]["finals"]] == [1, 2, 3]
    row = [line for line in report.finals_table(plan, summary).splitlines()
           if line.startswith(f"| {more} |")]
    assert "| 1, 2, 3, 4, 5 | 83.00 ± 1.58 |" in row[0]


def test_committed_tables_equal_the_regenerated_ones():
    plan = study.Plan()
    records = report.load_records(os.path.join(RESULTS, "runs"))
    regenerated = report.tables(plan, report.summarize(plan, records),
                                os.path.join(RESULTS, "layer_statistics"),
                                os.path.join(RESULTS, "noise_scale"))
    for name, text in regenerated.items():
        path = os.path.join(RESULTS, name if name.endswith(".json") else f"{name}.md")
        with open(path) as f:
            assert f.read() == text, f"{path} is stale: run python -m recipes.study report"
    with open(os.path.join(ROOT, "docs", "results.md")) as f:
        results_md = f.read()
    blocks = report.blocks(regenerated, records, bool(report.noise_runs(plan, RESULTS)))
    assert report.replace_blocks(results_md, blocks) == results_md
    for name in blocks:  # every table and the figures are in results.md
        assert f"<!-- report:{name} -->" in results_md


# ------------------------------------------------------------ end to end


@pytest.mark.skipif(not os.path.exists(FASHION), reason="dataset-fashion-mnist missing")
def test_quick_study_runs_resumes_and_reports(tmp_path):
    out = str(tmp_path)
    first = study.run_args(["--quick", "--out", out, "--max_runs", "3"])
    assert first.done_now == 3  # a slice: stopped after 3 runs
    done = study.run_args(["--quick", "--out", out])
    # 2 main curves x 2 points + 2 finals; ablation: 2 points + 1 final;
    # noise: CLARS's final seed again, with the noise scale logged.
    assert first.done_now + done.done_now == 10
    names = sorted(os.listdir(os.path.join(out, "runs")))
    assert len(names) == 9
    records = report.load_records(os.path.join(out, "runs"))
    for record in records:
        s = record["study"]
        assert s["key"] + ".json" in names
        assert len(record["epochs"]) == 2 and record["summary"]["eval_split"] == "validation"
        assert 0 <= record["test_accuracy"] <= 1
        assert record["summary"]["warmup_updates"] == (2 if "_warmup_" in s["key"] else 0)
        assert s["seed"] in (0, 1) and (s["phase"] == "tune") == (s["seed"] == 0)
    # A rerun trains nothing; no run's checkpoints are left.
    assert study.run_args(["--quick", "--out", out, "tune", "final", "ablation"]).done_now == 0
    assert os.listdir(os.path.join(out, "partial", "runs")) == []

    chosen = _read(os.path.join(out, "chosen.json"))
    plan = study.Plan(quick=True)
    assert set(chosen) == {c.name for c in plan.curves}
    for name, entry in chosen.items():
        tuning = {r["study"]["lr"]: report.final_accuracy(r) for r in records
                  if r["study"]["curve"] == name and r["study"]["seed"] == 0}
        assert entry["peak_lr"] == max(tuning, key=lambda lr: (tuning[lr], -lr))
    finals = open(os.path.join(out, "finals.md")).read()
    for name in chosen:
        assert f"| {name} |" in finals
    for png in ("warmup_necessity.png", "final_epochs.png"):
        with open(os.path.join(out, "img", png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # The CLARS final logged its per-layer statistics, drawn as heatmaps.
    (stats,) = os.listdir(os.path.join(out, "layer_statistics"))
    assert os.path.exists(os.path.join(out, "img", "layers_" + stats[:-5] + ".png"))
    # The noise phase: the same run with B_simple logged every update, its
    # record apart, its table and figure.
    (noise,) = os.listdir(os.path.join(out, "noise_scale", "runs"))
    assert noise == stats
    logged = _read(os.path.join(out, "noise_scale", noise))
    assert [r["update"] for r in logged["records"]] == [1, 2, 3, 4]
    assert "| B256_clars_nowarmup_b64_lr" in open(os.path.join(out, "noise.md")).read()
    with open(os.path.join(out, "img", "noise_scale.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # A record made before a field existed (at its default) is the same run.
    path = os.path.join(out, "runs", names[0])
    record = _read(path)
    del record["config"]["noise_scale"]
    with open(path, "w") as f:
        json.dump(record, f)
    assert study.run_args(["--quick", "--out", out, "tune"]).done_now == 0
    # A record made under another protocol is refused, not reused.
    record["config"]["epochs"] = 3
    with open(path, "w") as f:
        json.dump(record, f)
    with pytest.raises(ValueError, match="different configuration \\(epochs\\)"):
        study.run_args(["--quick", "--out", out, "status"])
    with pytest.raises(ValueError, match="different configuration \\(epochs\\)"):
        study.run_args(["--quick", "--out", out, "tune", "ablation"])


def _study(out, kill=None):
    """The quick study's first run, in its own process (killed on `kill`)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop(callbacks.KILL_ENV, None)
    if kill:
        env[callbacks.KILL_ENV] = kill
    return subprocess.Popen(
        [sys.executable, "-m", "recipes.study", "--quick", "--out", str(out),
         "--max_runs", "1", "tune"], cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.skipif(not os.path.exists(FASHION), reason="dataset-fashion-mnist missing")
def test_a_killed_study_run_resumes_to_the_uninterrupted_record(tmp_path):
    # The quick plan's first run: 8 micro-steps an epoch, 2 epochs; the
    # study checkpoints at epoch ends. Killed (SIGKILL) right after the save
    # at the end of epoch 0, then the same command again.
    reference = _study(tmp_path / "reference")
    killed = _study(tmp_path / "chain", kill="after:8")
    output, _ = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, output[-3000:]
    assert not os.path.exists(tmp_path / "chain" / "runs")  # no record yet
    (name,) = os.listdir(tmp_path / "chain" / "partial" / "runs")
    saves = tmp_path / "chain" / "partial" / "runs" / name / "checkpoints"
    assert sorted(os.listdir(saves)) == ["step-8.json", "step-8.weights.h5"]
    rerun = _study(tmp_path / "chain")
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output[-3000:]
    assert "Resumed from" in output and "at epoch 1, micro-step 0 of 8." in output
    output, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, output[-3000:]

    want = _read(tmp_path / "reference" / "runs" / f"{name}.json")
    got = _read(tmp_path / "chain" / "runs" / f"{name}.json")
    assert os.listdir(tmp_path / "chain" / "partial" / "runs") == []  # deleted once on record
    assert want["config"] == got["config"] and want["study"] == got["study"]
    assert got["config"]["model_dir"] == "" and "partial" not in json.dumps(got["config"])
    assert want["summary"]["resumes"] == []
    assert [(r["epoch"], r["step"]) for r in got["summary"]["resumes"]] == [(1, 0)]

    def metrics(record):
        return [{k: v for k, v in e.items() if k != "epoch_time"} for e in record["epochs"]]

    assert len(want["epochs"]) == 2 and metrics(got) == metrics(want)
    for key in ("final_validation_accuracy", "best_validation_accuracy", "test_accuracy"):
        assert got[key] == want[key] is not None, key

    def summary(record):  # but the time and where it resumed
        return {k: v for k, v in record["summary"].items()
                if k not in ("train_seconds", "resumes", "resumed_at")}

    assert summary(got) == summary(want) and "test_loss" in summary(want)


def test_coherence_table_reads_rise_and_decay(tmp_path):
    # Two adapted layers and one excluded; geometric mean over the adapted.
    from keras_clars.callbacks import FORMAT

    records = [{"update": u, "epoch": 0, "values": {"coherence": [c, c / 4, 1.0]}}
               for u, c in [(1, 0.2), (6, 0.4), (12, 0.3), (24, 0.1), (48, 0.05)]]
    with open(tmp_path / "run_a.json", "w") as f:
        json.dump({"format": FORMAT, "layers": ["a", "b", "c"], "statistics": [
            "coherence"], "adapted": [True, True, False], "records": records}, f)
    table = report.coherence_table(str(tmp_path))
    row = [line for line in table.splitlines() if line.startswith("| run_a |")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "0.100"    # update 1: sqrt(0.2 * 0.05)
    assert cells[2] == "0.200"    # update 6
    assert cells[-2] == "2.00x"   # the rise to update 6, within 24 updates
    assert cells[-1] == "0.25"    # update 48 over update 1
    assert cells[cells.index("0.025") + 1] == "-"  # update 96 not logged
