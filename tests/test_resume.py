"""Preemption: a run SIGKILLed at a checkpoint resumes to the bit-identical end.

Each setting trains once uninterrupted (the reference) and once as a chain of
processes, each killed for real (SIGKILL, by the test-only environment
variable `recipes.callbacks.KILL_ENV` read by the Checkpointer) and restarted
with the same command:

1. killed right after a checkpoint forced in the middle of an accumulation
   window (micro-step 2 of 8-step epochs, k=4);
2. restarted, killed right after the regular mid-epoch checkpoint 4 (the
   end of update 1, before its coherence is read);
3. restarted, killed right after the epoch-end checkpoint 8;
4. restarted, killed *during* the write of checkpoint 12 (its weights file
   cut in half, its JSON never written): the rerun must resume from 8;
5. restarted, runs to the end.

Each restart must resume where the previous process was killed, and the end
must equal the reference bit for bit: the final checkpoint (weights,
BatchNorm statistics, every optimizer variable; under MirroredStrategy each
replica's BatchNorm statistics), and every epoch's metrics (training and
validation) but its wall time.

The two settings' chains run at the same time (one module fixture), each
process's state read as it ends, and the references after them where cores
are few; the tests then assert on what was read.
"""

import concurrent.futures
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
# 512 examples, B=256 of micro-batches 64: k=4, 2 updates = 8 micro-steps
# an epoch, 2 epochs; a checkpoint every update (4 micro-steps): 4, 8, 12, 16.
ARGS = ["--dataset=fashion_mnist", "--depth=8", "--width=4", "--image_size=14",
        "--noaugment", "--batch_size=256", "--micro_batch_size=64", "--epochs=2",
        "--train_examples=512", "--validation_examples=512", "--eval_steps=2",
        "--seed=3", "--deterministic", "--optimizer=clars", "--base_lr=2",
        "--trust_coefficient=0.01", "--checkpoint_steps=1", "--verbose=0"]
FINAL, STEPS = 16, 8
# (kill, the step the next process must resume from)
CHAIN = [("after:2", 2), ("after:4", 4), ("after:8", 8), ("during:12", 8)]


def _run(args, model_dir, kill=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop(callbacks.KILL_ENV, None)
    if kill:
        env[callbacks.KILL_ENV] = kill
    return subprocess.Popen(
        [sys.executable, "-m", "recipes.train", *args, f"--model_dir={model_dir}",
         f"--record_path={model_dir}/record.json"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process, timeout=600):
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:  # timed out: not left running
            process.kill()
            process.wait()
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


def _read_if(path):
    return _read(path) if os.path.exists(path) else None


def _csv_epochs(path):
    with open(path) as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def _run_chain(chain_dir, args, chain):
    """Runs the killed chain, one process after another; what each left.

    Returns a step per chain process, with what it left before the next one
    overwrote it (resume.json, the save it was killed after).
    """
    saves = chain_dir / "checkpoints"
    steps = []
    for kill, resume_at in [*chain, (None, None)]:
        code, output = _finish(_run(args, chain_dir, kill))
        step = dict(kill=kill, resume_at=resume_at, code=code, output=output,
                    resumed=_read_if(chain_dir / "resume.json"))
        if kill and kill.startswith("during:"):
            cut = int(kill.split(":")[1])
            step["cut"] = ((saves / f"step-{cut}.weights.h5").exists(),
                           (saves / f"step-{cut}.json").exists())
        if kill:
            step["saved"] = _read_if(saves / f"step-{resume_at}.json")
        steps.append(step)
        if code != (-signal.SIGKILL if kill else 0):
            break  # the check reports it
    return steps


def _check_chain(run, chain):
    """Asserts that each restart resumed where its predecessor was killed, and
    that the chain's end is the reference's."""
    reference_dir, chain_dir, steps, (code, reference_output) = run
    saves = chain_dir / "checkpoints"
    assert len(steps) == len(chain) + 1, steps[-1]["output"][-3000:]
    expected_resume = saved = None
    for step in steps:
        kill, resume_at, output = step["kill"], step["resume_at"], step["output"]
        assert step["code"] == (-signal.SIGKILL if kill else 0), output[-3000:]
        if expected_resume is None:  # the first process: a fresh start
            fresh = step["resumed"]
            assert fresh["micro_steps"] == fresh["optimizer_micro_steps"] == 0
            assert fresh["earlier_seconds"] == 0
        else:
            # It resumed where the previous process left its newest complete save.
            resumed = step["resumed"]
            epoch, at = divmod(expected_resume, STEPS)
            assert (resumed["micro_steps"], resumed["epoch"], resumed["step"]) == (
                expected_resume, epoch, at)
            assert f"Resumed from {chain_dir} at epoch {epoch}, micro-step {at} of " \
                f"{STEPS}." in output
            # The optimizer state is the one saved: its step count and values.
            assert resumed["optimizer_micro_steps"] == saved["optimizer_micro_steps"] \
                == expected_resume
            assert resumed["optimizer_digest"] == saved["optimizer_digest"]
            assert resumed["optimizer_digest"] != fresh["optimizer_digest"]
            # The run's wall time goes on from the save's, which counts the
            # processes before it.
            assert resumed["earlier_seconds"] == saved["seconds"] > 0
        if kill and kill.startswith("during:"):
            # The cut save is there, without its JSON: never to be used.
            weights_exist, json_exists = step["cut"]
            assert weights_exist
            assert not json_exists
        if kill:
            saved = step["saved"]
            assert saved["micro_steps"] == resume_at
            expected_resume = resume_at
    assert code == 0, reference_output[-3000:]
    assert _csv_epochs(chain_dir / "metrics.csv") == [0, 1]
    assert [e["epoch"] for e in _read(chain_dir / "metrics.json")] == [0, 1]
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
    # Under MirroredStrategy, each replica's own BatchNorm statistics too.
    replicas = f"checkpoints/step-{FINAL}.replicas.npz"
    assert (chain_dir / replicas).exists() == (reference_dir / replicas).exists()
    if (reference_dir / replicas).exists():
        with np.load(reference_dir / replicas) as want, np.load(chain_dir / replicas) as got:
            assert sorted(got) == sorted(want) and len(want) > 0
            for name in want:
                assert np.array_equal(got[name], want[name]), name

    # Every epoch's metrics, training and validation, but its wall time.
    def metrics(record):
        return [{k: v for k, v in e.items() if k != "epoch_time"} for e in record["epochs"]]

    want, got = _read(reference_dir / "record.json"), _read(chain_dir / "record.json")
    assert [e["epoch"] for e in want["epochs"]] == [0, 1]
    assert metrics(got) == metrics(want)
    assert want["first_update_coherence"] is not None
    for key in ("final_validation_accuracy", "best_validation_accuracy", "test_accuracy",
                "first_update_coherence"):
        assert got[key] == want[key], key
    assert got["summary"]["first_update_coherence"] == want["summary"]["first_update_coherence"]
    # The record carries every resume, in order; the reference none.
    assert want["summary"]["resumes"] == []
    # The chain's wall time counts its earlier processes, the reference's none.
    assert want["summary"]["resumed_at"]["earlier_seconds"] == 0
    assert got["wall_seconds"] > got["summary"]["resumed_at"]["earlier_seconds"] \
        == steps[-1]["resumed"]["earlier_seconds"] > 0
    assert [r["micro_steps"] for r in got["summary"]["resumes"]] == [r for _, r in chain]
    assert all(r["at"].endswith("Z") for r in got["summary"]["resumes"])
    return want, got


# MirroredStrategy on 2 logical CPUs, slices of 32 (k=4 still), with
# per-example norms, augmentation on and mixed float16 (a loss scale): the
# whole chain. Each process has one strategy (the subprocesses start
# TensorFlow anew).
MIRRORED = [a for a in ARGS if a not in ("--noaugment", "--micro_batch_size=64")] + [
    "--micro_batch_size=32", "--strategy=mirrored", "--logical_cpus=2",
    "--per_example_norms", "--augment", "--dtype=mixed_float16"]
# Each test's setting, by the test's name.
SETTINGS = {
    "test_killed_runs_resume_to_the_uninterrupted_end": ARGS,
    "test_killed_mirrored_per_example_augmented_mixed_runs_resume_to_the_uninterrupted_end":
        MIRRORED,
}


@pytest.fixture(scope="module")
def chains(request, tmp_path_factory):
    """The selected tests' runs: {name: (reference_dir, chain_dir, the chain's
    steps, the reference's (code, output))}.

    A chain is one process after another, most of each TensorFlow's
    start-up and tracing on one core, and the mirrored chain is the longest
    (each of its processes costs nearly twice a plain one's CPU). So the
    chains start first, each on its own core, and the references, which
    depend on nothing, queue behind them (as many processes at once as
    cores, at least one per chain): on a 2-core machine the plain chain's
    core runs both references while the mirrored chain runs alone, instead
    of four processes sharing 2 cores at the start and the mirrored chain's
    last processes running alone at the end.
    """
    wanted = [name for name in SETTINGS
              if any(item.originalname == name for item in request.session.items)]
    dirs = {name: tmp_path_factory.mktemp(name[:30]) for name in wanted}
    workers = max(len(wanted), min(os.cpu_count() or 1, 2 * len(wanted)))
    pool = concurrent.futures.ThreadPoolExecutor(workers)
    try:
        steps = {name: pool.submit(_run_chain, dirs[name] / "chain", SETTINGS[name], CHAIN)
                 for name in wanted}
        references = {name: pool.submit(lambda name=name: _finish(
            _run(SETTINGS[name], dirs[name] / "reference"))) for name in wanted}
        return {name: (dirs[name] / "reference", dirs[name] / "chain", steps[name].result(),
                       references[name].result()) for name in wanted}
    finally:  # on an error, what has not started does not
        pool.shutdown(wait=True, cancel_futures=True)


def test_killed_runs_resume_to_the_uninterrupted_end(chains, request):
    _check_chain(chains[request.node.originalname], CHAIN)


def test_killed_mirrored_per_example_augmented_mixed_runs_resume_to_the_uninterrupted_end(
        chains, request):
    want, got = _check_chain(chains[request.node.originalname], CHAIN)
    assert want["summary"]["replicas"] == got["summary"]["replicas"] == 2
    assert want["config"]["dtype"] == "mixed_float16" and want["config"]["per_example_norms"]
