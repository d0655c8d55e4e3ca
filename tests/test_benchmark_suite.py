"""benchmarks/idle_suite.py and benchmarks/tables.py without running a
benchmark: every command of the suite's plan parses with its benchmark's own
command line, and the tables say "met" / "not met" by the targets, and say
which parts failed or did not run. (The benchmarks themselves are too slow
for CI; device_check runs at CI size in test_device_check.py.)"""

import importlib
import json
import os

from benchmarks import idle_suite, tables
from benchmarks.optimizer_step import TARGETS
from benchmarks.per_example_cost import TARGET


def test_every_command_of_the_plan_parses(tmp_path):
    backend_before = os.environ.get("KERAS_BACKEND")
    parts = idle_suite.plan(str(tmp_path))
    assert [p[0] for p in parts] == [
        "optimizer_step", "update_jax", "trace_update", "noise_scale_cost",
        "per_example_tensorflow", "per_example_jax"]
    for name, backend, args, record in parts:
        module = importlib.import_module(args[0])
        parsed = module.arguments().parse_args(args[1:])
        assert parsed.out == record == os.path.join(str(tmp_path), name + ".json")
    # Importing the benchmarks leaves the backend of later processes alone.
    assert os.environ.get("KERAS_BACKEND") == backend_before
    smoke = {name: args for name, _, args, _ in idle_suite.plan("r", rounds=1)}
    assert smoke["per_example_jax"][-4:-2] == ["--rounds", "1"]


def _write(folder, name, value):
    with open(os.path.join(folder, name + ".json"), "w") as f:
        json.dump(value, f)


def test_tables_derive_the_verdicts_from_the_records(tmp_path, capsys):
    load = {"load_average_before": [0.5, 0, 0], "load_average_after": [0.7, 0, 0]}
    _write(tmp_path, "suite", {
        "command": "python -m benchmarks.idle_suite", "commit": "abcdef0123",
        "uncommitted": [], "date_utc": "2026-12-01 01:00:00",
        "uptime_before": "load average: 0.50", "uptime_after": "load average: 0.70",
        "parts": {"optimizer_step": {"ok": True, "wall_s": 100, **load},
                  "update_jax": {"ok": False, "returncode": 1, "wall_s": 5, **load},
                  "per_example_tensorflow": {"ok": True, "wall_s": 300, **load},
                  "per_example_jax": {"skipped": "budget used (720 s)"}}})
    below, above = TARGET - 0.01, TARGET + 0.01
    step = {"batch": 128, "step_s": 1.0}
    _write(tmp_path, "per_example_tensorflow", {"models": {
        "resnet20": {"clars": step, "per_example": step, "ratios": {
            "time": below, "peak_memory": above, "step_memory": 2.0,
            "first_step": 1.0}}}})
    ms = {"SGD": 10.0, "LARS": 14.0, "CLARS": 14.5}
    _write(tmp_path, "optimizer_step", {"update": {
        "jit=False": {"median_ms": ms, "ratios": {
            "CLARS/SGD": TARGETS["CLARS/SGD"] - 0.05, "LARS/SGD": 1.4,
            "CLARS/LARS": TARGETS["CLARS/LARS"] + 0.01}}}})
    tables.main(["--results", str(tmp_path)])
    out = capsys.readouterr().out
    assert "commit abcdef0" in out
    row = next(line for line in out.splitlines() if line.startswith("| tensorflow | resnet20"))
    assert f"**{below:.2f}** met" in row and f"**{above:.2f}** not met" in row
    row = next(line for line in out.splitlines() if line.startswith("| tensorflow | off"))
    assert row.count("not met") == 1 and "10.0 ms" in row
    assert "| tensorflow | on (XLA) | not measured" in out
    assert "| jax | on (XLA) | not measured" in out
    assert "| update_jax | FAILED (exit 1) |" in out
    assert "| per_example_jax | budget used (720 s) | - |" in out
    assert "Not measured in this run: per-example cost on ['jax']" in out
    assert "Tracing: not measured in this run." in out


HLO = """HloModule m

%fused_norm (p: f32[8]) -> f32[] {
  %p = f32[8]{0} parameter(0)
  ROOT %r = f32[] reduce(%p, %p), dimensions={0}, to_apply=%add
}

%true_branch (t: (f32[8], /*index=1*/f32[])) -> (f32[8]) {
  %t = (f32[8]{0}, /*index=1*/f32[]) parameter(0)
  %w = f32[8]{0} get-tuple-element(%t), index=0
  %n = f32[] fusion(%w), kind=kLoop, calls=%fused_norm, metadata={op_type="L2Loss" op_name="{name}/L2Loss"}
  %u = f32[8]{0} fusion(%w, %n), kind=kLoop, calls=%fused_update, metadata={op_type="ResourceApplyMomentum" op_name="{name}/R"}
  ROOT %out = (f32[8]{0}) tuple(%u)
}

%false_branch (f: (f32[8], /*index=1*/f32[])) -> (f32[8]) {
  %f = (f32[8]{0}, /*index=1*/f32[]) parameter(0)
  %v = f32[8]{0} get-tuple-element(%f), index=0
  ROOT %o = (f32[8]{0}) tuple(%v)
}

ENTRY %main (a: f32[8], c: pred[]) -> (f32[8]) {
  %a = f32[8]{0} parameter(0)
  %c = pred[] parameter(1)
  %g = f32[] dot(%a, %a), lhs_contracting_dims={0}, rhs_contracting_dims={0}
  %x = (f32[8]{0}, /*index=1*/f32[]) tuple(%a, %g)
  ROOT %{name} = (f32[8]{0}) conditional(%c, %x, %x), true_computation=%true_branch, false_computation=%false_branch
}
"""


def test_update_hlo_counts_the_kernels_of_a_conditional_branch(tmp_path):
    from benchmarks import update_hlo

    counts = update_hlo.count(HLO.replace("{name}", "cond"))
    # The dot, the conditional, and its larger branch's two fusions.
    assert counts["kernels"] == 4
    assert counts["kernels_by_opcode"] == {"fusion": 2, "dot": 1, "conditional": 1}
    assert counts["fusions_by_source_op"] == {"L2Loss": 1, "ResourceApplyMomentum": 1}
    assert counts["reduce"] == 1
    assert counts["before_first_momentum"] == 3  # dot, conditional, norm
    # The order of the kernels, not their names, makes the digest.
    assert update_hlo.count(HLO.replace("{name}", "if"))["sequence_digest"] \
        == counts["sequence_digest"]
    swapped = HLO.replace("calls=%fused_norm", "calls=%n2").replace(
        'op_type="L2Loss"', 'op_type="Sum"')
    assert update_hlo.count(swapped.replace("{name}", "cond"))[
        "sequence_digest"] != counts["sequence_digest"]
    # benchmarks.tables prints both, and "-" for a record from before them.
    old = {k: v for k, v in counts.items()
           if k not in ("sequence_digest", "before_first_momentum")}
    paths = []
    for name, c in (("new", counts), ("old", old)):
        paths.append(str(tmp_path / f"{name}.json"))
        _write(tmp_path, name, {"environment": {"backend": "tensorflow"},
                                "commit": name * 3, "optimizers": {"CLARS": c}})
    new_row, old_row = tables.hlo(paths)[2:4]
    assert f"| 3 | {counts['sequence_digest'][:8]} |" in new_row
    assert "| 4 | 2 | 1 | 0 | - | - |" in old_row
