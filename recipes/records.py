"""Run records of the recipes: the one JSON writer, and what a record holds.

`write_json(path, value)` is the recipes' one writer of JSON files (run
records, summaries, checkpoint metadata, study records): atomic, so a reader
or a killed process sees the old file or the new one, never half of one.
"""

import dataclasses
import json
import os
import platform
import subprocess
import time

import keras
import numpy as np
import tensorflow as tf

import keras_clars
# The library's atomic writer (a sibling temporary, fsync, then a rename).
from keras_clars.callbacks import _write_json_atomically

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD_FORMAT = "keras-clars-run/1"


def write_json(path, value):
    """Writes `value` as indented JSON to `path`, atomically."""
    _write_json_atomically(path, value, indent=1)


def read_json(path, default=None):
    """The JSON value in `path`, or `default` when there is no such file."""
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def utc_now():
    """The time now, as the records write it (ISO 8601, UTC)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def environment():
    """The code and package versions a record was made with."""
    def git(*args):
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = git("status", "--porcelain", "--", "keras_clars", "recipes")
    return {
        "git_commit": git("rev-parse", "HEAD").strip() or None,
        # Uncommitted changes to the code that ran, if any (paths only).
        "uncommitted": [line[3:] for line in changed.splitlines() if line.strip()],
        "versions": {
            "python": platform.python_version(),
            "keras_clars": keras_clars.__version__,
            "keras": keras.__version__,
            "tensorflow": tf.__version__,
            "numpy": np.__version__,
        },
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }


def make_record(config, summary, epochs, wall_seconds, code=None):
    """A run's JSON record: what it was, what it gave, what it ran on.

    `config`: the run's dataclass; `code`: `environment()` as the run
    started (default: now).
    """
    validation = [e.get("val_accuracy") for e in epochs] if summary[
        "eval_split"] == "validation" else []
    finite = [v for v in validation if v is not None and np.isfinite(v)]
    return {
        "format": RECORD_FORMAT,
        "config": dataclasses.asdict(config),
        **(code or environment()),
        "finished_at": utc_now(),
        "wall_seconds": wall_seconds,
        "summary": {k: v for k, v in summary.items() if k != "final"},
        "epochs": epochs,
        "final_validation_accuracy": validation[-1] if validation else None,
        "best_validation_accuracy": max(finite) if finite else None,
        "test_accuracy": summary.get("test_accuracy"),
        "first_update_coherence": (summary.get("first_update_coherence") or {}).get("mean"),
    }
