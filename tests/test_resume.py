"""Preemption: a run SIGKILLed at a checkpoint resumes to the bit-identical end.

Each setting trains once uninterrupted (the reference) and once as a chain of
processes, each killed for real (SIGKILL, by the test-only environment
variable `recipes.callbacks.KILL_ENV` read by the Checkpointer) and restarted
with the same command:

1. killed right after a checkpoint forced in the middle of an accumulation
   window (micro-step 18 of 16-step epochs, k=4);
2. restarted, killed right after the regular mid-epoch checkpoint 24;
3. restarted, killed right after the epoch-end checkpoint 32;
4. restarted, killed *during* the write of checkpoint 36 (its weights file
   cut in half, its JSON never written): the rerun must resume from 32;
5. restarted, runs to the end.

Each restart must resume where the previous process was killed, and the end
must equal the reference bit for bit: the final checkpoint (weights,
BatchNorm statistics, every optimizer variable), and every epoch's metrics
(training and validation) but its wall time.
"""

import csv
import json
import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest

from recipes import callbacks
from recipes import fashion_mnist as datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(datasets.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")),
    reason="dataset-fashion-mnist missing")
# 1024 examples, B=256 of micro-batches 64: k=4, 4 updates = 16 micro-steps
# an epoch, 3 epochs; a checkpoint every 3 updates (12 micro-steps) and at
# every epoch end: 12, 16, 24, 32, 36, 48.
ARGS = ["--dataset=fashion_mnist", "--depth=8", "--width=4", "--image_size=14",
        "--noaugment", "--batch_size=256", "--micro_batch_size=64", "--epochs=3",
        "--train_examples=1024", "--validation_examples=512", "--eval_steps=3",
        "--seed=3", "--deterministic", "--optimizer=clars", "--base_lr=2",
        "--trust_coefficient=0.01", "--checkpoint_steps=3", "--verbose=0"]
FINAL, STEPS = 48, 16
# (kill, the step the next process must resume from)
CHAIN = [("after:18", 18), ("after:24", 24), ("after:32", 32), ("during:36", 32)]


def _run(args, model_dir, kill=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop(callbacks.KILL_ENV, None)
    if kill:
        env[callbacks.KILL_ENV] = kill
    return subprocess.Popen(
        [sys.executable, "-m", "recipes.train", *args, f"--model_dir={model_dir}",
         f"--record_path={model_dir}/record.json"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process, timeout=300):
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def _read(path):
    with open(path) as f:
        return json.load(f)


def _arrays(path):
    """Every dataset of a Keras weights file, by its path in the file."""
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, node: out.__setitem__(name, node[()])
                     if isinstance(node, h5py.Dataset) else None)
    return out


def _csv_epochs(path):
    with open(path) as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def _check_chain(tmp_path, args, chain=CHAIN):
    """Runs the reference beside the killed chain; asserts the same end."""
    reference_dir, chain_dir = tmp_path / "reference", tmp_path / "chain"
    saves = chain_dir / "checkpoints"
    reference = _run(args, reference_dir)
    expected_resume = saved = None
    for kill, resume_at in [*chain, (None, None)]:
        code, output = _finish(_run(args, chain_dir, kill))
        assert code == (-signal.SIGKILL if kill else 0), output[-3000:]
        if expected_resume is None:  # the first process: a fresh start
            fresh = _read(chain_dir / "resume.json")
            assert fresh["micro_steps"] == fresh["optimizer_micro_steps"] == 0
        else:
            # It resumed where the previous process left its newest complete save.
            resumed = _read(chain_dir / "resume.json")
            epoch, step = divmod(expected_resume, STEPS)
            assert (resumed["micro_steps"], resumed["epoch"], resumed["step"]) == (
                expected_resume, epoch, step)
            assert f"Resumed from {chain_dir} at epoch {epoch}, micro-step {step} of " \
                f"{STEPS}." in output
            # The optimizer state is the one saved: its step count and values.
            assert resumed["optimizer_micro_steps"] == saved["optimizer_micro_steps"] \
                == expected_resume
            assert resumed["optimizer_digest"] == saved["optimizer_digest"]
            assert resumed["optimizer_digest"] != fresh["optimizer_digest"]
        if kill and kill.startswith("during:"):
            # The cut save is there, without its JSON: never to be used.
            step = int(kill.split(":")[1])
            assert (saves / f"step-{step}.weights.h5").exists()
            assert not (saves / f"step-{step}.json").exists()
        if kill:
            saved = _read(saves / f"step-{resume_at}.json")
            assert saved["micro_steps"] == resume_at
            expected_resume = resume_at
    code, reference_output = _finish(reference)
    assert code == 0, reference_output[-3000:]
    assert _csv_epochs(chain_dir / "metrics.csv") == [0, 1, 2]
    assert [e["epoch"] for e in _read(chain_dir / "metrics.json")] == [0, 1, 2]
    assert _read(saves / f"step-{FINAL}.json")["optimizer_digest"] == _read(
        reference_dir / "checkpoints" / f"step-{FINAL}.json")["optimizer_digest"]

    # Bit for bit: weights, BatchNorm statistics, every optimizer variable.
    final = f"checkpoints/step-{FINAL}.weights.h5"
    expected, actual = _arrays(reference_dir / final), _arrays(chain_dir / final)
    assert sorted(actual) == sorted(expected)
    assert any("optimizer" in name for name in expected)
    assert sum(a.size for a in expected.values()) > 1000
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype, name
        assert np.array_equal(actual[name], value), name

    # Every epoch's metrics, training and validation, but its wall time.
    def metrics(record):
        return [{k: v for k, v in e.items() if k != "epoch_time"} for e in record["epochs"]]

    want, got = _read(reference_dir / "record.json"), _read(chain_dir / "record.json")
    assert [e["epoch"] for e in want["epochs"]] == [0, 1, 2]
    assert metrics(got) == metrics(want)
    for key in ("final_validation_accuracy", "best_validation_accuracy", "test_accuracy",
                "first_update_coherence"):
        assert got[key] == want[key], key
    assert got["summary"]["first_update_coherence"] == want["summary"]["first_update_coherence"]
    # The record carries every resume, in order; the reference none.
    assert want["summary"]["resumes"] == []
    assert [r["micro_steps"] for r in got["summary"]["resumes"]] == [r for _, r in chain]
    assert all(r["at"].endswith("Z") for r in got["summary"]["resumes"])
    return want, got


def test_killed_runs_resume_to_the_uninterrupted_end(tmp_path):
    _check_chain(tmp_path, ARGS)


def test_killed_per_example_augmented_mixed_runs_resume_to_the_uninterrupted_end(tmp_path):
    # Per-example norms, augmentation on, mixed float16 (a loss scale):
    # killed mid-window and during a save's write.
    args = [a for a in ARGS if a != "--noaugment"]
    args += ["--per_example_norms", "--augment", "--dtype=mixed_float16"]
    _check_chain(tmp_path, args, CHAIN[:1] + CHAIN[3:])
