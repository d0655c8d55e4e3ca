"""Subprocess side of the tf.distribute tests (and of the distributed benchmark).

The number of logical CPU devices, and a multi-worker cluster, are fixed when
TensorFlow starts, so each scenario runs in its own process:

    python tests/distributed_worker.py mirrored OUT.npz --devices 4
    python tests/distributed_worker.py checkpoint OUT.npz --workdir DIR
    TF_CONFIG=... python tests/distributed_worker.py multi_worker OUT.npz

Each mode writes arrays to OUT.npz; the tests compare them. The reference is
`numpy_reference.reference_update` (float64), fed with per-slice gradients
from a single-device copy of the model: slice r of a micro-batch is what
replica r sees (MirroredStrategy and MultiWorkerMirroredStrategy split each
global batch into R contiguous slices, replica/worker order).

Importing this module does not import TensorFlow: the tests use `launch()`
and the model helpers from the parent process.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np


BATCH = 8  # global micro-batch
HYPER = dict(momentum=0.9, trust_coefficient=0.02, weight_decay=1e-3)
# lr_t = 0.7 ** t at update t: a schedule read at the micro-step count
# instead of the update index would give other weights.
DECAY = 0.7
CONFIGS = (("LARS", None), ("CLARS", None), ("LARS", 2), ("CLARS", 2))


# ---------------------------------------------------------------- processes


def free_ports(count):
    """Ports the OS reports free now (bound to port 0, then released)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def launch(commands, timeout, envs=None):
    """Runs commands in parallel, each in its own process group.

    Every process is waited for at most until the shared deadline, and every
    process group is killed on the way out, whatever happened.

    Args:
        commands: argument lists.
        timeout: seconds for all of them together.
        envs: one environment dict per command (default: a copy of ours).

    Returns:
        A list of `(returncode, output)`; returncode is None on timeout.
    """
    envs = envs or [dict(os.environ) for _ in commands]
    procs = []
    try:
        for command, env in zip(commands, envs):
            procs.append(
                subprocess.Popen(
                    command,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + timeout
        results = []
        for proc in procs:
            try:
                output, _ = proc.communicate(
                    timeout=max(deadline - time.monotonic(), 0.1)
                )
                results.append((proc.returncode, output))
            except subprocess.TimeoutExpired:
                results.append((None, "timed out"))
        return results
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def run_modes(runs, timeout=300, env=None):
    """Runs modes of this script at the same time; returns their arrays or raises.

    Args:
        runs: `(mode, out, *args)` tuples, one per process.
    """
    commands = [[sys.executable, os.path.abspath(__file__), mode, str(out), *args]
                for mode, out, *args in runs]
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    finished = launch(commands, timeout, [environment] * len(commands))
    for (mode, *_), (code, output) in zip(runs, finished):
        if code != 0:
            raise AssertionError(f"{mode} worker failed ({code}):\n{output[-4000:]}")
    return [dict(np.load(out)) for _, out, *_ in runs]


def run_mode(mode, out, *args, timeout=300, env=None):
    """Runs one mode of this script; returns its arrays or raises."""
    [result] = run_modes([(mode, out, *args)], timeout, env)
    return result


# ------------------------------------------------------------ model and data


def data(count, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, 6, 6, 2)).astype("float32")
    y = rng.integers(0, 3, size=count).astype("int32")
    return x, y


def build_model(seed=0):
    """A tiny conv net without BatchNorm: slices are independent samples."""
    import keras

    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(3, 3, activation="tanh"),
            keras.layers.Flatten(),
            keras.layers.Dense(5, activation="tanh"),
            keras.layers.Dense(3),
        ]
    )
    rng = np.random.default_rng(seed)
    model.set_weights(
        [rng.normal(0, 0.5, w.shape).astype("float32") for w in model.get_weights()]
    )
    return model


def schedule():
    import keras

    return keras.optimizers.schedules.ExponentialDecay(1.0, 1, DECAY)


def make_optimizer(name, steps):
    import keras_clars

    return getattr(keras_clars, name)(
        learning_rate=schedule(), gradient_accumulation_steps=steps, **HYPER
    )


def compile_model(model, name, steps, **kwargs):
    import keras

    model.compile(
        optimizer=make_optimizer(name, steps),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **kwargs,
    )
    return model


def optimizer_state(optimizer):
    """The values of every optimizer variable, in creation order."""
    return [np.array(v.numpy()) for v in optimizer.variables]


# ---------------------------------------------------------------- reference


class Reference:
    """float64 spec of `fit` from per-slice gradients of a single-device copy.

    `micro_step(x, y, replicas)` feeds one global micro-batch split into
    `replicas` contiguous slices; the update happens every k-th call. A
    window whose micro-steps had different replica counts (a restore into
    another strategy mid-window) weights each micro-step equally, as the
    optimizer does: its mean gradient and its mean sample norm.
    """

    def __init__(self, complete, steps, weights):
        import keras

        self.complete, self.steps = complete, steps or 1
        self.model = build_model()
        self.loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.weights = [np.asarray(w, np.float64) for w in weights]
        self.velocities = [np.zeros_like(w) for w in self.weights]
        self.micro_steps = 0
        self.window = []  # per micro-step: list of per-slice gradients

    def slice_gradients(self, x, y):
        import tensorflow as tf

        self.model.set_weights([w.astype("float32") for w in self.weights])
        with tf.GradientTape() as tape:
            loss = self.loss(y, self.model(x))
        grads = tape.gradient(loss, self.model.trainable_variables)
        return [np.asarray(g, np.float64) for g in grads]

    def micro_step(self, x, y, replicas):
        size = len(x) // replicas
        self.window.append(
            [
                self.slice_gradients(x[r * size : (r + 1) * size], y[r * size : (r + 1) * size])
                for r in range(replicas)
            ]
        )
        self.micro_steps += 1
        if self.micro_steps % self.steps == 0:
            self._update()

    def _update(self):
        from numpy_reference import _norm, reference_update

        t = self.micro_steps // self.steps - 1
        if len({len(step) for step in self.window}) == 1:
            samples = [s for step in self.window for s in step]
            norms = None
        else:
            samples = [
                [np.mean(layer, axis=0) for layer in zip(*step)] for step in self.window
            ]
            norms = [
                np.mean([np.mean([_norm(s[l]) for s in step]) for step in self.window])
                for l in range(len(self.weights))
            ] if self.complete else None
        self.weights, self.velocities, _ = reference_update(
            self.weights,
            self.velocities,
            samples,
            learning_rate=DECAY**t,
            complete=self.complete,
            sample_norms=norms,
            **HYPER,
        )
        self.window = []

    def fit(self, x, y, replicas):
        for start in range(0, len(x), BATCH):
            self.micro_step(x[start : start + BATCH], y[start : start + BATCH], replicas)
        return self


# -------------------------------------------------------------------- modes


def mirrored(args):
    """fit under MirroredStrategy on N logical CPUs vs the reference."""
    from recipes import strategies

    strategies.use_logical_cpus(args.devices)
    strategy = strategies.make_strategy("mirrored")
    assert strategy.num_replicas_in_sync == args.devices
    x, y = data(4 * BATCH)
    out = {}
    for name, steps in CONFIGS:
        with strategy.scope():
            model = compile_model(build_model(), name, steps)
        model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
        key = f"{name}_k{steps or 1}"
        out.update(_arrays(key + "/fit", model.get_weights()))
        out[key + "/micro_steps"] = int(model.optimizer._iterations.numpy())
        out[key + "/updates"] = int(model.optimizer.iterations.numpy())
        init = build_model().get_weights()
        for tag, complete in (("ref", name == "CLARS"), ("alt", name != "CLARS")):
            reference = Reference(complete, steps, init)
            for _ in range(2):
                reference.fit(x, y, args.devices)
            out.update(_arrays(f"{key}/{tag}", reference.weights))
    out.update(_noise_scale(strategy, x[:2 * BATCH], y[:2 * BATCH], args.devices))
    return out


def _noise_scale(strategy, x, y, replicas):
    """One update (k = 2) of CLARS with the noise scale under `strategy`: its
    per-layer statistics, and the S = 2R slice gradients it was made of
    (slices of BATCH / R, at the initial weights), for the reference."""
    import keras
    import keras_clars

    from keras_clars import _noise_scale as noise

    size = BATCH // replicas
    with strategy.scope():
        model = build_model()
        model.compile(optimizer=keras_clars.CLARS(
            0.1, noise_scale=True, sample_size=size, gradient_accumulation_steps=2,
            **HYPER), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    stats = model.optimizer.layer_statistics()
    out = {"noise/fit": np.array([[stats[v.path][k] for k in noise.NOISE_STATISTICS[:5]]
                                  for v in model.trainable_variables], np.float64),
           "noise/gradient_norms": np.array([stats[v.path]["gradient_norm"]
                                             for v in model.trainable_variables])}
    reference = Reference(True, 2, build_model().get_weights())
    for i in range(len(x) // size):
        out.update(_arrays(f"noise/sample{i:02d}", reference.slice_gradients(
            x[i * size:(i + 1) * size], y[i * size:(i + 1) * size])))
    return out


def multi_worker(args):
    """fit under MultiWorkerMirroredStrategy; the chief adds the reference."""
    from recipes import strategies

    strategy = strategies.make_strategy("multi_worker")
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    workers = strategy.num_replicas_in_sync
    x, y = data(3 * BATCH)
    out = {"replicas": workers}
    for name, steps in (("CLARS", None), ("CLARS", 2)):
        with strategy.scope():
            model = compile_model(build_model(), name, steps)
            strategies.prepare_multi_worker_fit(model, x[:1], y[:1])
        model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
        key = f"{name}_k{steps or 1}"
        out.update(_arrays(key + "/fit", model.get_weights()))
        out[key + "/micro_steps"] = int(model.optimizer._iterations.numpy())
        if index == 0:
            reference = Reference(True, steps, build_model().get_weights())
            for _ in range(2):
                reference.fit(x, y, workers)
            out.update(_arrays(key + "/ref", reference.weights))
    return out


def checkpoint(args):
    """Save/restore across strategies mid-window, and BackupAndRestore."""
    import keras

    import keras_clars  # noqa: F401  (registers the optimizers)
    from recipes import strategies

    strategies.use_logical_cpus(2)
    strategy = strategies.make_strategy("mirrored")
    work = args.workdir
    x, y = data(8 * BATCH)
    name, steps = "CLARS", 2
    reference = Reference(True, steps, build_model().get_weights())
    out = {}

    # 1. Mirrored (R=2): micro-steps 0-2, stopping mid-window; save .keras.
    with strategy.scope():
        model = compile_model(build_model(), name, steps)
    model.fit(x[:24], y[:24], batch_size=BATCH, shuffle=False, verbose=0)
    reference.fit(x[:24], y[:24], 2)
    saved = optimizer_state(model.optimizer)
    model.save(os.path.join(work, "mirrored.keras"))

    # 2. Restore on one device: same state; micro-steps 3-4; save weights.
    model = keras.models.load_model(os.path.join(work, "mirrored.keras"))
    out.update(_compare_states("to_single", saved, optimizer_state(model.optimizer)))
    out["to_single/updates"] = int(model.optimizer.iterations.numpy())
    out["to_single/micro_steps"] = int(model.optimizer._iterations.numpy())
    model.fit(x[24:40], y[24:40], batch_size=BATCH, shuffle=False, verbose=0)
    reference.fit(x[24:40], y[24:40], 1)
    saved = optimizer_state(model.optimizer)
    model.save_weights(os.path.join(work, "single.weights.h5"))

    # 3. Back under Mirrored: a fresh model loads weights and optimizer state.
    with strategy.scope():
        model = compile_model(build_model(seed=7), name, steps)
        model.optimizer.build(model.trainable_variables)
    model.load_weights(os.path.join(work, "single.weights.h5"))
    out.update(_compare_states("to_mirrored", saved, optimizer_state(model.optimizer)))
    out["to_mirrored/updates"] = int(model.optimizer.iterations.numpy())
    out["to_mirrored/micro_steps"] = int(model.optimizer._iterations.numpy())
    model.fit(x[40:], y[40:], batch_size=BATCH, shuffle=False, verbose=0)
    reference.fit(x[40:], y[40:], 2)
    out.update(_arrays("chain/fit", model.get_weights()))
    out.update(_arrays("chain/ref", reference.weights))
    velocities = [v.numpy() for v in model.optimizer._velocities]
    out.update(_arrays("chain/fit_velocity", velocities))
    out.update(_arrays("chain/ref_velocity", reference.velocities))
    out["chain/micro_steps"] = int(model.optimizer._iterations.numpy())
    out["chain/updates"] = int(model.optimizer.iterations.numpy())

    # 4. Preemption under Mirrored, 3 micro-batches per epoch, k=2, 4 epochs.
    x, y = x[:24], y[:24]

    def train(callbacks=(), seed=0):
        with strategy.scope():
            model = compile_model(build_model(seed), name, steps)
        model.fit(
            x, y, batch_size=BATCH, epochs=4, shuffle=False, verbose=0,
            callbacks=list(callbacks),
        )
        return model

    model = train()
    out.update(_arrays("straight/fit", model.get_weights()))
    out["straight/micro_steps"] = int(model.optimizer._iterations.numpy())
    for save_freq, stop in (("epoch", (1, 2)), (2, (1, 2))):
        tag = f"backup_{save_freq}"
        backup_dir = os.path.join(work, tag)
        backup = lambda: keras.callbacks.BackupAndRestore(backup_dir, save_freq)
        try:
            train([backup(), _Interrupt(*stop)])
            raise AssertionError("the interruption did not happen")
        except _Preempted:
            pass
        with open(os.path.join(backup_dir, "training_metadata.json")) as f:
            meta = json.load(f)
        out[f"{tag}/saved_epoch"] = meta["epoch"]
        out[f"{tag}/saved_batch"] = meta["batch"]
        # A new model from other initial weights: all state comes from the backup.
        model = train([backup()], seed=3)
        out.update(_arrays(f"{tag}/fit", model.get_weights()))
        out[f"{tag}/micro_steps"] = int(model.optimizer._iterations.numpy())
    return out


class _Preempted(Exception):
    pass


def _interrupt_callback():
    import keras

    class Interrupt(keras.callbacks.Callback):
        """Raises before batch `batch` of epoch `epoch`, as a preemption."""

        def __init__(self, epoch, batch):
            super().__init__()
            self.stop, self.epoch = (epoch, batch), None

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_begin(self, batch, logs=None):
            if (self.epoch, batch) == self.stop:
                raise _Preempted(f"preempted at epoch {self.epoch}, batch {batch}")

    return Interrupt


def _Interrupt(epoch, batch):
    return _interrupt_callback()(epoch, batch)


def _arrays(prefix, arrays):
    return {f"{prefix}/{i}": np.asarray(a) for i, a in enumerate(arrays)}


def _compare_states(prefix, before, after):
    """Max |difference| over optimizer variables (paths are renamed on load)."""
    same = len(before) == len(after) and all(
        a.shape == b.shape for a, b in zip(before, after)
    )
    out = {f"{prefix}/same_layout": same, f"{prefix}/variables": len(before)}
    out[f"{prefix}/max_state_diff"] = max(
        float(np.max(np.abs(np.asarray(a, np.float64) - b), initial=0))
        for a, b in zip(before, after)
    ) if same else np.inf
    return out


MODES = {"mirrored": mirrored, "multi_worker": multi_worker, "checkpoint": checkpoint}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=sorted(MODES))
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    import keras

    keras.config.disable_traceback_filtering()  # full tracebacks in the logs
    out = MODES[args.mode](args)
    np.savez(args.out, **out)


if __name__ == "__main__":
    main()
