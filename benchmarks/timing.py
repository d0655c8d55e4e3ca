"""Interleaved timing: every benchmark's way to time contestants side by side.

Each round calls every contestant once, in an order shuffled per round, so
that other work on a shared machine slows all of them alike; ratios of the
medians are then fair. Wall and process CPU time (all threads: less
disturbed by other processes) are taken of the same calls.

    times = interleaved({"SGD": sgd_step, "CLARS": clars_step}, repeats=9)
    median(times["CLARS"]) / median(times["SGD"])
    median(times.cpu["CLARS"])
"""

import random
import statistics
import time


class Times(dict):
    """{name: [wall seconds per call]}, and `cpu`: {name: [CPU seconds]}."""

    def __init__(self, names):
        super().__init__((name, []) for name in names)
        self.cpu = {name: [] for name in names}


def interleaved(functions, repeats, warmup=1, seed=0):
    """Times zero-argument callables round-robin.

    Args:
        functions: {name: callable}, each called with no arguments.
        repeats: timed rounds; each calls every function once.
        warmup: untimed rounds first (tracing, compilation, caches).
        seed: of the per-round shuffle of the order.

    Returns:
        `Times`: {name: [seconds of each timed call]}, its `cpu` attribute
        the process CPU seconds of the same calls.
    """
    order = list(functions)
    for _ in range(warmup):
        for name in order:
            functions[name]()
    rng = random.Random(seed)
    times = Times(order)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            wall, cpu = time.perf_counter(), time.process_time()
            functions[name]()
            times[name].append(time.perf_counter() - wall)
            times.cpu[name].append(time.process_time() - cpu)
    return times


def median(seconds):
    return statistics.median(seconds)


def ratio(times, a, b):
    """median(times[a]) / median(times[b])."""
    return median(times[a]) / median(times[b])
