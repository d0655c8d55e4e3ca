"""The trainer's callbacks: checkpoints that resume exactly, and its logs.

- `Checkpointer`: saves and restores everything a run's future depends on
  (weights, BatchNorm statistics, every optimizer variable, the epoch's
  training-metric state); the newest complete save resumes.
- `EpochLog`: the epoch history (metrics.json, the record's `epochs`).
- `FirstUpdateCoherence`: CLARS/LARS's coherence after update 1.

The data order is the trainer's part (`recipes.data.pipeline(skip=...)`).

Test hook (not a flag): the environment variable `KERAS_CLARS_TEST_KILL`
(`KILL_ENV`) makes the Checkpointer SIGKILL its own process, to test
preemption: `after:N` saves at micro-step N (mid-window too) and kills
right after the save is complete; `during:N` kills while writing save N,
after cutting its weights file in half and before its JSON.
"""

import csv
import glob
import json
import os
import re
import signal
import time

import keras
import numpy as np

from keras_clars.layerwise import inner_optimizer
from recipes.records import write_json

KILL_ENV = "KERAS_CLARS_TEST_KILL"


def optimizer_digest(optimizer):
    """A fingerprint of the optimizer's state: (micro-steps, sum of |values|)."""
    total = sum(
        float(np.abs(keras.ops.convert_to_numpy(v.value)).astype(np.float64).sum())
        for v in optimizer.variables
    )
    return int(keras.ops.convert_to_numpy(inner_optimizer(optimizer)._iterations)), total


def _replicas(variable):
    """A Keras variable's per-replica TensorFlow variables (one if not mirrored)."""
    value = variable.value
    return list(getattr(value, "values", (value,)))


def _state_variables(model):
    return model.weights + model.optimizer.variables


def _kill_requested(when, step):
    return os.environ.get(KILL_ENV) == f"{when}:{step}"


class Checkpointer(keras.callbacks.Callback):
    """Saves the training state; the newest complete save resumes, exactly.

    A save is `step-N.weights.h5` (N micro-steps done: the model's and the
    optimizer's variables), `step-N.replicas.npz` (under MirroredStrategy:
    the variables whose replicas hold different values, the per-replica
    BatchNorm statistics) and then `step-N.json`, written last: a save
    without its JSON (a process killed while writing) is ignored. The JSON
    also holds the epoch's training-metric state so far (each replica's own
    sums), added back after the first step of a resumed epoch: it logs the
    uninterrupted epoch's metrics. Keras's
    BackupAndRestore is not used because it restarts an interrupted epoch
    from its first batch.

    Args:
        directory: where the saves go.
        every: micro-steps between saves (0: only at epoch ends).
        steps_per_epoch: micro-steps per epoch.
        run: a JSON-able description of the run (what its result depends
            on), saved with each save: `restore` refuses a save of another
            run. None: no check.
        began: when this process's run began (`time.time()`; None: now).
            Each save holds the run's wall seconds so far (`seconds`: this
            process's, plus those of the processes it resumed from), and
            `restore` sets `earlier` to the seconds of the save it loads, so
            that a resumed run's record counts every process's time.
    """

    def __init__(self, directory, every, steps_per_epoch, run=None, began=None):
        super().__init__()
        self.directory = directory
        self.every = every
        self.steps_per_epoch = steps_per_epoch
        self.run = run
        self.began = time.time() if began is None else began
        self.earlier = 0.0  # wall seconds of the processes before this one
        self.done = 0
        self._metrics = None  # metric state to put back at the next epoch begin
        os.makedirs(directory, exist_ok=True)

    def latest(self):
        """The newest complete save's metadata, or None."""
        saves = glob.glob(os.path.join(self.directory, "step-*.json"))
        steps = sorted(int(re.search(r"step-(\d+)\.json$", s).group(1)) for s in saves)
        if not steps:
            return None
        with open(os.path.join(self.directory, f"step-{steps[-1]}.json")) as f:
            return json.load(f)

    def restore(self, model):
        """Loads the newest save into `model` (built, compiled); returns its step."""
        state = self.latest()
        if state is None:
            return 0
        saved = state.get("run")
        if self.run is not None and saved is not None and saved != self.run:
            name = next(k for k in sorted({*saved, *self.run}) if saved.get(k) != self.run.get(k))
            raise ValueError(
                f"{self.directory} holds a save of another run: --{name}="
                f"{saved.get(name)} there, --{name}={self.run.get(name)} now. Rerun "
                "with the same flags to resume it, or use another directory.")
        if not model.optimizer.built:  # LossScaleOptimizer.build adds its variables again
            model.optimizer.build(model.trainable_variables)
        model.load_weights(os.path.join(self.directory, state["weights"]))
        if state.get("replicas"):  # each replica's own BatchNorm statistics
            with np.load(os.path.join(self.directory, state["replicas"])) as saved:
                for index, values in saved.items():
                    variable = _state_variables(model)[int(index)]
                    for replica, value in zip(_replicas(variable), values, strict=True):
                        replica.assign(value)
        self.done = state["micro_steps"]
        self.earlier = state.get("seconds", 0.0)
        if self.done % self.steps_per_epoch:
            self._metrics = state["metrics"]
        return self.done

    def on_train_batch_end(self, batch, logs=None):
        if self._metrics is not None:
            self._add_saved_metrics()
        self.done += 1
        if self.done % self.steps_per_epoch and (
                self.every and self.done % self.every == 0
                or _kill_requested("after", self.done)):
            self.save()

    def _add_saved_metrics(self):
        # Keras builds the compiled metrics in the first step, and `fit` has
        # reset them to 0: the first step left 0 + x in each. A metric's state
        # is a sum, so the uninterrupted run's is saved + x: the same float.
        for variable, values in zip(self.model.metrics_variables, self._metrics, strict=True):
            for replica, saved in zip(_replicas(variable), values, strict=True):
                dtype = replica.dtype.as_numpy_dtype
                replica.assign(np.asarray(saved, dtype) + replica.numpy())
        self._metrics = None

    def on_epoch_end(self, epoch, logs=None):
        self.save()

    def save(self):
        name = f"step-{self.done}"
        weights = name + ".weights.h5"
        self.model.save_weights(os.path.join(self.directory, weights), overwrite=True)
        if _kill_requested("during", self.done):
            with open(os.path.join(self.directory, weights), "r+b") as f:
                f.truncate(os.path.getsize(f.name) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        # A MirroredStrategy replica updates its BatchNorm statistics from its
        # own slice: the copies differ, and the weights file keeps one.
        apart = {str(i): np.stack([r.numpy() for r in _replicas(v)])
                 for i, v in enumerate(_state_variables(self.model)) if len(_replicas(v)) > 1}
        apart = {i: values for i, values in apart.items()
                 if not (values == values[:1]).all()}
        if apart:
            np.savez(os.path.join(self.directory, name + ".replicas.npz"), **apart)
        iterations, digest = optimizer_digest(self.model.optimizer)
        epoch, step = divmod(self.done, self.steps_per_epoch)
        write_json(os.path.join(self.directory, name + ".json"), {
            "weights": weights, "replicas": name + ".replicas.npz" if apart else None,
            "micro_steps": self.done, "epoch": epoch,
            "step": step, "optimizer_micro_steps": iterations,
            "optimizer_digest": digest, "run": self.run,
            "seconds": self.earlier + time.time() - self.began,
            "metrics": [[np.asarray(r.numpy()).tolist() for r in _replicas(v)]
                        for v in self.model.metrics_variables],
        })
        for old in glob.glob(os.path.join(self.directory, "step-*")):
            if not os.path.basename(old).startswith(name + "."):
                os.remove(old)
        if _kill_requested("after", self.done):
            os.kill(os.getpid(), signal.SIGKILL)


def keep_csv_epochs(path, end):
    """Keeps the rows of epochs before `end` in the CSV log `path`, if any.

    A run killed after an epoch's row was written, and resumed before that
    epoch's end, writes the row again: the log keeps each epoch once.
    """
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [row for row in rows[1:] if int(row[0]) < end]
    if len(kept) < len(rows):
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows(kept)


class EpochLog(keras.callbacks.Callback):
    """The recipes' one epoch-history logger.

    Adds the learning rate, epoch time and update count to the logs (it runs
    before the CSV and TensorBoard loggers, so they see them) and keeps every
    epoch. With a `path`, rewrites the JSON list of epochs after each one.
    A resumed epoch's `epoch_time` counts the time since the restart.
    """

    def __init__(self, path=None, epochs=()):
        super().__init__()
        self.path = path
        self.epochs = list(epochs)

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(
            self.model.optimizer.learning_rate))
        logs["epoch_time"] = time.time() - self.start
        logs["updates"] = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        self.epochs.append({"epoch": epoch, **{k: float(v) for k, v in logs.items()}})
        if self.path:
            write_json(self.path, self.epochs)


class FirstUpdateCoherence(keras.callbacks.Callback):
    """Reads CLARS/LARS's per-layer coherence ||g_l|| / N_l after update 1.

    One device read, after the k-th micro-step. `result` is None until then,
    or a dict: `mean` and `min` over the layer-adapted variables (rank >= 2:
    kernels) and `layers` (path -> coherence). LARS's is 1 by definition.

    Args:
        accumulation_steps: k, micro-steps per update.
        start: micro-steps done before this process (a resumed run).
        path: a JSON file keeping `result` for a run resumed after update 1;
            None: keep nothing.
    """

    def __init__(self, accumulation_steps, start=0, path=None):
        super().__init__()
        self.k = accumulation_steps
        self.path = path
        self._seen = start
        self.result = None
        if start >= self.k and path and os.path.exists(path):
            with open(path) as f:
                self.result = json.load(f)

    def on_train_batch_end(self, batch, logs=None):
        self._seen += 1
        if self.result is not None or self._seen != self.k:
            return
        optimizer = inner_optimizer(self.model.optimizer)
        ranks = {v.path: len(v.shape) for v in self.model.trainable_variables}
        layers = {
            path: stats["coherence"]
            for path, stats in optimizer.layer_statistics().items()
            if ranks.get(path, 2) >= 2
        }
        finite = [v for v in layers.values() if np.isfinite(v)]
        self.result = {
            "mean": float(np.mean(finite)) if finite else None,
            "min": float(np.min(finite)) if finite else None,
            "layers": layers,
        }
        if self.path:
            write_json(self.path, self.result)
