"""The evidence study's code path, end to end on a tiny slice of the data."""

import csv
import importlib.util
import json
import math
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


def _load_study():
    spec = importlib.util.spec_from_file_location(
        "convergence", os.path.join(ROOT, "benchmarks", "convergence.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


convergence = _load_study()


@pytest.mark.skipif(not os.path.exists(FASHION), reason="dataset-fashion-mnist missing")
def test_quick_study_writes_consistent_results(tmp_path):
    out = str(tmp_path)
    # --quick: sgd and clars, B=256 from 4 micro-batches of 64, 1 epoch, 1 seed.
    convergence.main(["--quick", "--out", out])

    runs = sorted(os.listdir(os.path.join(out, "runs")))
    assert [r.split("_")[1] for r in runs] == ["clars", "sgd"]
    results = [json.load(open(os.path.join(out, "runs", r))) for r in runs]
    for r in results:
        assert r["epochs"] == 1
        for key in ("train_loss", "train_acc", "val_acc", "test_acc", "epoch_time"):
            assert len(r[key]) == 1, key
        assert all(math.isfinite(v) and v > 0 for v in r["train_loss"])
        for key in ("train_acc", "val_acc", "test_acc"):
            assert 0.0 <= r[key][0] <= 1.0
        assert r["accumulation_steps"] == 4 and r["updates_per_epoch"] == 2
        # One loss per update, and their mean is the epoch's mean loss.
        assert len(r["update_loss"]) == r["total_updates"] == 2
        np.testing.assert_allclose(np.mean(r["update_loss"]), r["train_loss"][0], rtol=1e-4)
        assert r["non_finite_updates"] in (0, None)
    # Same seed, same initial weights: the first update's loss is the same.
    np.testing.assert_allclose(results[0]["update_loss"][0], results[1]["update_loss"][0],
                               rtol=1e-5)
    # The schedules differ as configured: SGD warms up, CLARS does not.
    by_method = {r["method"]: r for r in results}
    assert by_method["sgd"]["warmup_updates_used"] == 1
    assert by_method["clars"]["warmup_updates_used"] == 0

    summary = json.load(open(os.path.join(out, "summary.json")))
    assert set(summary["final"]) == {"sgd_B256", "clars_B256"}
    row = summary["final"]["clars_B256"]
    assert row["test_acc"][0] == pytest.approx(by_method["clars"]["test_acc"][0])
    assert row["cost_vs_sgd"] > 0

    with open(os.path.join(out, "epochs.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {r["method"] for r in rows} == {"sgd", "clars"}

    # CLARS seed 0 logs its per-layer statistics at every update.
    stats = json.load(open(os.path.join(out, by_method["clars"]["layer_statistics_file"])))
    assert [rec["update"] for rec in stats["records"]] == [1, 2]
    coherence = np.array([rec["values"]["coherence"] for rec in stats["records"]])
    assert np.all((coherence > 0) & (coherence <= 1 + 1e-6))

    for name in ("convergence.png", "first_epochs.png", "layers_clars.png"):
        with open(os.path.join(out, "img", name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "sgd,adam"], "adam"),
        (["--batch_sizes", "1000"], "1000"),
        (["--epochs", "0"], "epochs"),
        (["--train_size", "57344", "--val_size", "5000"], "57344 \\+ 5000"),
    ],
)
def test_bad_arguments_name_the_value(argv, message):
    with pytest.raises(ValueError, match=message):
        convergence.check_args(convergence.parse_args(argv))
