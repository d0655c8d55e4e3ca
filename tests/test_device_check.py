"""benchmarks/device_check.py, the prepared accelerator run, at CI size
(--cpu, on JAX's CPU), so that it cannot rot between GPU sessions."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_device_check_runs_at_ci_size(tmp_path):
    pytest.importorskip("jax")
    out = tmp_path / "device_check.json"
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.device_check", "--cpu",
         "--out", str(out)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["cpu_size"] is True
    ratios = [record["update"]["CLARS/SGD"], record["update"]["CLARS/LARS"],
              record["training"]["per_example/CLARS"]]
    rates = record["training"]["images_per_s"]
    assert set(rates) == {"SGD", "LARS", "CLARS", "CLARS k=4",
                          "CLARS per-example"}
    assert all(math.isfinite(v) and v > 0 for v in ratios + list(rates.values()))
