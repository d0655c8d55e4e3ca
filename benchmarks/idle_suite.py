"""Every performance record of docs/performance.md, in one run on an idle machine.

    python -m benchmarks.idle_suite                 # all parts, at most 12 minutes
    python -m benchmarks.idle_suite --parts optimizer_step,trace_update
    python -m benchmarks.idle_suite --list          # the plan: commands, nothing run
    python -m benchmarks.tables                     # then: the docs' tables

Runs each benchmark below as its own process, one after the other, each
writing its JSON record into --results (default benchmarks/results/idle/),
and writes `suite.json` there after every part: the commit, `uptime` before
the first part and after the last, and per part its command, commit, exit
status, wall and CPU seconds, load average before and after, and the tail
of its output. With --parts, the other parts' entries in suite.json are
kept (a part cut short can be rerun alone in a second idle window). A part that fails or runs out of time is recorded as such and the
next one runs; the run stops starting parts once --budget seconds are used.

The parts (docs/performance.md says what each measures, and its targets):

- `optimizer_step`: the ResNet-50 update, jit off and on (XLA), Keras SGD,
  LARS and CLARS interleaved; its norms alone three ways; a training step
  at 64 px, batch 16 (TensorFlow).
- `update_jax`: the same update under `jax.jit` (`device_check --parts
  update` at full size on the CPU).
- `trace_update`: tracing one update, DenseNet-121 (issue 18's check).
- `noise_scale_cost`: CLARS training with the gradient noise scale on and
  logged every 10 updates against without (issue 17).
- `per_example_tensorflow`, `per_example_jax`: per-example norms against a
  CLARS step, ResNet-20 at 32 px batch 128 and ResNet-50 at 224 px batch
  32: time, peak memory, first step (issue 20).

The machine must be otherwise idle: pause other work first, and read the
load averages in suite.json before quoting any number.
"""

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time

from benchmarks import records

RESULTS = os.path.join("benchmarks", "results", "idle")


def plan(results, rounds=None):
    """[(name, backend, args after `python -m`, the record's path)], in the
    order they run; `rounds` overrides every part's repeat count (a smoke
    run's)."""
    def out(name):
        return os.path.join(results, name + ".json")

    def repeats(default):
        return str(rounds or default)

    parts = [
        ("optimizer_step", "tensorflow",
         ["benchmarks.optimizer_step", "--parts", "update,norms,train",
          "--repeats", repeats(7), "--inner", "3", "--train_inner", "1"]),
        ("update_jax", "jax",
         ["benchmarks.device_check", "--parts", "update",
          "--rounds", repeats(15)]),
        ("trace_update", "tensorflow",
         ["benchmarks.trace_update", "--model", "densenet121",
          "--traces", repeats(3), "--repeats", repeats(5)]),
    ]
    parts.append(("noise_scale_cost", "tensorflow",
                  ["benchmarks.noise_scale_cost", "--pairs", repeats(5)]))
    for backend in ("tensorflow", "jax"):
        parts.append((f"per_example_{backend}", backend,
                      ["benchmarks.per_example_cost", "--parts",
                       "resnet20,resnet50", "--backend", backend]
                      + (["--rounds", str(rounds)] if rounds else [])))
    return [(name, backend, args + ["--out", out(name)], out(name))
            for name, backend, args in parts]


def uptime():
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"load average {os.getloadavg()}"


def _cpu_seconds_of_children():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_part(name, backend, args, record_path, timeout):
    """Runs one part; returns what suite.json keeps of it."""
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    if backend == "jax":
        env.setdefault("JAX_PLATFORMS", "cpu")
    command = [sys.executable, "-m"] + args
    entry = {"command": " ".join(["python", "-m"] + args),
             "backend": backend, "record": record_path,
             "load_average_before": os.getloadavg()}
    if os.path.exists(record_path):
        os.remove(record_path)  # a stale record must not pass for this run's
    wall, cpu = time.perf_counter(), _cpu_seconds_of_children()
    # Its own process group: on timeout, the part's own children go too.
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
        entry["returncode"] = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        entry["returncode"] = None
        entry["timed_out_after_s"] = timeout
    entry["wall_s"] = time.perf_counter() - wall
    entry["cpu_s"] = _cpu_seconds_of_children() - cpu
    entry["load_average_after"] = os.getloadavg()
    # A record cut short (a timeout, a failed model) is kept, not "ok".
    entry["ok"] = entry["returncode"] == 0 and os.path.exists(record_path)
    entry["output_tail"] = output[-2500:]
    return entry


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default=RESULTS,
                        help="folder of the records and suite.json")
    parser.add_argument("--parts", default=None,
                        help="comma-separated subset of the parts (default: all)")
    parser.add_argument("--budget", type=float, default=720,
                        help="seconds; no part starts after they are used, and "
                        "each part is stopped when they run out")
    parser.add_argument("--rounds", type=int, default=None,
                        help="every part's repeat count (default: each its own)")
    parser.add_argument("--list", action="store_true",
                        help="print the plan and run nothing")
    args = parser.parse_args(argv)
    parts = plan(args.results, args.rounds)
    if args.parts:
        wanted = args.parts.split(",")
        unknown = sorted(set(wanted) - {p[0] for p in parts})
        if unknown:
            raise SystemExit(f"parts must be among {[p[0] for p in parts]}; "
                             f"received parts={unknown}.")
        parts = [p for p in parts if p[0] in wanted]
    if args.list:
        for name, backend, part_args, _ in parts:
            print(f"{name}: KERAS_BACKEND={backend} python -m {' '.join(part_args)}")
        return
    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, "suite.json")
    # A run of some parts (--parts) keeps the other parts' entries.
    kept = {}
    if args.parts and os.path.exists(path):
        with open(path) as f:
            kept = json.load(f)["parts"]
    suite = {"command": "python -m benchmarks.idle_suite " + " ".join(
                 sys.argv[1:] if argv is None else argv),
             "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
             **records.commit(), "uptime_before": uptime(),
             "budget_s": args.budget, "parts": kept}
    started = time.perf_counter()
    print(f"{suite['commit']}: {suite['uptime_before']}", flush=True)
    for name, backend, part_args, record_path in parts:
        left = args.budget - (time.perf_counter() - started)
        if left < 30:
            suite["parts"][name] = {"skipped": f"budget used ({args.budget} s)"}
            print(f"{name}: skipped, the budget is used", flush=True)
            continue
        entry = run_part(name, backend, part_args, record_path, left)
        entry.update(records.commit(), date_utc=suite["date_utc"])
        suite["parts"][name] = entry
        print(f"{name}: {'ok' if entry['ok'] else 'FAILED'} in "
              f"{entry['wall_s']:.0f} s wall, {entry['cpu_s']:.0f} s CPU; load "
              f"{entry['load_average_before'][0]:.2f} -> "
              f"{entry['load_average_after'][0]:.2f}", flush=True)
        if not entry["ok"]:
            print(entry["output_tail"][-1500:], flush=True)
        suite["uptime_after"] = uptime()
        suite["wall_s"] = time.perf_counter() - started
        records.save(path, suite)
    print(f"{suite.get('uptime_after', '')}\nwrote {path}; tables: "
          f"python -m benchmarks.tables --results {args.results}", flush=True)
    failed = [n for n, e in suite["parts"].items() if not e.get("ok")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
