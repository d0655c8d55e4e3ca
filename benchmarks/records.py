"""The benchmarks' JSON records: what ran, where, under what load.

    record = records.start("benchmarks.trace_update", argv)
    ...                                      # fill in the measurements
    records.write(path, record)              # adds the load at the end

Every record says its command, the date, the commit of the code that ran
(and whether keras_clars/ or benchmarks/ had uncommitted changes), the
backend and versions, and the load average at its start and end: timings
on a shared machine mean little without the load. Kept free of TensorFlow
and JAX imports, so that a JAX process does not load TensorFlow for it.
"""

import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git(*args):
    """The output of `git args` in the repository, or "" if git fails."""
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def commit():
    """{"commit": HEAD, "uncommitted": paths changed under keras_clars/ or
    benchmarks/, records aside} (an empty list: the commit is the code that
    ran)."""
    changed = git("status", "--porcelain", "--", "keras_clars", "benchmarks",
                  ":!benchmarks/results")
    return {"commit": git("rev-parse", "HEAD").strip() or None,
            "uncommitted": [line[3:] for line in changed.splitlines()]}


def start(module, argv=None):
    """A new record of `python -m module argv` (argv None: this process's
    arguments): date, code, environment, load now."""
    import keras

    argv = sys.argv[1:] if argv is None else argv
    return {
        "command": " ".join(["python", "-m", module] + list(argv)),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        **commit(),
        "environment": {
            "backend": keras.backend.backend(), "keras": keras.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count(),
        },
        "load_average_at_start": os.getloadavg(),
    }


def save(path, value):
    """Writes `value` to `path` as indented JSON, atomically (a temporary
    file, then a rename): a reader sees the old file or the new one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)


def write(path, record):
    """Adds the load average at the end, and saves `record` to `path`."""
    record["load_average_at_end"] = os.getloadavg()
    save(path, record)
    print(f"wrote {path}", flush=True)
