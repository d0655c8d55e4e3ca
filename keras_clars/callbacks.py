"""Keras callbacks that report what the layer-wise optimizers did.

`LayerStatisticsLogger` writes the per-layer scalars of `LARS` and `CLARS`
(trust ratio, complete norm, gradient norm, weight norm, coherence) to
TensorBoard and to a JSON file every few updates; `load_layer_statistics`
reads that file back. `NonFiniteUpdateMonitor` warns when an update was
skipped for a non-finite gradient, which the compiled step cannot do itself.

Both count *updates* (`optimizer.iterations`), not batches: with
`gradient_accumulation_steps=k` an update takes k batches. They keep that
count on the host and read the device only when they act, so they add no
synchronization to the other steps.
"""

import json
import os
import re
import tempfile
import warnings

import keras
import numpy as np
from keras import ops

from keras_clars.layerwise import STATISTICS, LayerwiseOptimizer, inner_optimizer

FORMAT = "keras_clars.layer_statistics/1"


def layerwise_optimizer(optimizer):
    """The `LARS` or `CLARS` inside `optimizer` (unwraps LossScaleOptimizer)."""
    inner = inner_optimizer(optimizer)
    if not isinstance(inner, LayerwiseOptimizer):
        raise ValueError(
            "The model's optimizer must be keras_clars.LARS or CLARS (possibly "
            "inside a LossScaleOptimizer): the layer statistics and the "
            "gradient noise scale are theirs. For momentum SGD with them, use "
            "LARS with every variable excluded from layer adaptation "
            "(`exclude_from_layer_adaptation(var_names=['/'])`, as "
            f"recipes.optimizers.MomentumSGD does); received {optimizer!r}."
        )
    return inner


def read_layer_statistics(optimizer):
    """The last update's statistics: one read per statistics variable.

    Args:
        optimizer: a built `LARS` or `CLARS`, or a LossScaleOptimizer
            wrapping one.

    Returns:
        `(update, paths, names, values)`: the update index (`iterations`),
        the variables' paths in model order, the statistics' names
        (`STATISTICS`, and with `noise_scale=True` the noise scale's), and
        a float32 array of shape `(len(paths), len(names))`.
        `optimizer.layer_statistics()` holds the same numbers as a dict.
    """
    optimizer = layerwise_optimizer(optimizer)
    if not optimizer.built:
        raise ValueError("The optimizer is not built yet: no update has run.")
    names, values = optimizer.statistics_table()
    update = int(ops.convert_to_numpy(optimizer.iterations))
    return update, list(optimizer._paths), names, values


def blocks(paths, block_fn=None):
    """{block: [paths]} in model order, by `block_fn` (default `block_of`)."""
    out = {}
    for path in paths:
        out.setdefault((block_fn or block_of)(path), []).append(path)
    return out


def block_of(path):
    """The block a variable belongs to, for grouping tags.

    keras.applications names layers by block (`conv2_block1_1_conv`,
    `block_3_expand`); elsewhere the block is the layer itself.
    """
    match = re.match(r".*?block_?\d+", path)
    return match.group(0) if match else path.rsplit("/", 1)[0]


def tag_of(path, block_fn=block_of):
    """TensorBoard tag prefix `layers/<block>/<rest of the path>`."""
    block = block_fn(path)
    rest = path[len(block):].lstrip("/_") if path.startswith(block) else path
    return f"layers/{block}/{rest or path}"


def _write_json_atomically(path, data, indent=None):
    """Writes JSON so that a reader or an interrupted run sees the old file
    or the new one, never half of one (a sibling temporary, then a rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as f:
            json.dump(data, f, indent=indent,
                      separators=None if indent else (",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _floats(column):
    # Shortest text that reads back as the same float32; JSON has no NaN.
    return [float(str(x)) if np.isfinite(x) else None for x in column]


def load_layer_statistics(path):
    """Reads a `LayerStatisticsLogger` JSON file.

    Returns:
        A dict with `layers` (paths, model order), `statistics` (names),
        `updates` and `epochs` (int arrays, one entry per record) and
        `values`: a dict mapping each statistic to a float array of shape
        `(records, layers)` (NaN where the value was not finite), with the
        noise scale `b_simple` (float array, NaN where it had no value),
        plus the file's other fields.
    """
    with open(path) as f:
        data = json.load(f)
    if data.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a layer statistics file: format="
            f"{data.get('format')!r}, expected {FORMAT!r}."
        )
    records = data.pop("records")
    data["updates"] = np.array([r["update"] for r in records], dtype=int)
    if records and "b_simple" in records[0]:  # the noise scale's
        data["b_simple"] = np.array([np.nan if r["b_simple"] is None else r["b_simple"]
                                     for r in records], dtype="float64")
    data["epochs"] = np.array([r["epoch"] for r in records], dtype=int)
    shape = (len(records), len(data["layers"]))
    data["values"] = {
        stat: np.array(
            [[np.nan if v is None else v for v in r["values"][stat]] for r in records],
            dtype="float64",
        ).reshape(shape)
        for stat in data["statistics"]
    }
    return data


class _EveryUpdates(keras.callbacks.Callback):
    """Calls `_act()` once every `interval` updates, counted on the host.

    The host counts batches (micro-steps); the update index is that count
    divided by the accumulation steps k. Only when an update boundary that is
    due has passed does the callback touch the device; `_act()` then reads
    the true index (a LossScaleOptimizer may have skipped some).
    """

    def __init__(self, interval):
        super().__init__()
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(
                f"interval must be an int >= 1; received interval={interval!r}."
            )
        self.interval = interval

    def on_train_begin(self, logs=None):
        optimizer = layerwise_optimizer(self.model.optimizer)
        self._steps = optimizer.gradient_accumulation_steps or 1
        self._micro_steps = int(ops.convert_to_numpy(optimizer._iterations))
        self._due = (self._micro_steps // self._steps // self.interval + 1)
        self._due *= self.interval
        self._epoch = 0
        self._epoch_start = self._micro_steps

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._epoch_start = self._micro_steps

    def on_train_batch_end(self, batch, logs=None):
        # `batch` is the last batch of the execution (steps_per_execution).
        self._micro_steps = self._epoch_start + batch + 1
        update = self._micro_steps // self._steps
        if update >= self._due:
            self._due = (update // self.interval + 1) * self.interval
            self._act()

    def _optimizer(self):
        # `self.model` also brings the JAX trainer's state back to the model.
        return layerwise_optimizer(self.model.optimizer)

    def _act(self):
        raise NotImplementedError


class LayerStatisticsLogger(_EveryUpdates):
    """Logs the optimizer's per-layer statistics every `interval` updates.

    For each trainable variable ("layer") of a `LARS` or `CLARS` model it
    records the last update's trust ratio, complete norm N_l, mean-gradient
    norm ||g_l||, weight norm ||w_l|| and coherence ||g_l|| / N_l, at the
    first update of the run and then every `interval` updates, and at the
    end of training.

    With `noise_scale=True` on the optimizer it also logs the gradient
    noise scale (docs/noise_scale.md): per layer, the statistics of
    `layer_statistics()` (`mean_squared_sample_norm`, ...), and B_simple for
    the model and per block.

    TensorBoard (`log_dir`; needs TensorFlow, on any Keras backend), at step
    = the update index:
        - `layers/<block>/<variable>/<statistic>`: one scalar per layer;
        - `histograms/<statistic>`: each of `STATISTICS` across layers;
        - `coherence/mean` and `coherence/min`: across layers;
        - `noise_scale/b_simple` and `noise_scale/blocks/<block>`: B_simple,
          when it has a value (never a stand-in for a missing one).

    JSON (`json_path`): the records, rewritten atomically at each epoch's end
    and at the end of training; read it with `load_layer_statistics`. With
    the noise scale each record carries `b_simple` (the model's, or None)
    and `b_simple_blocks` ({block: value or None}).

    The reading is one device-to-host transfer per record. Works when the
    optimizer is wrapped in a LossScaleOptimizer (mixed precision).

    Args:
        interval: log every this many updates (optimizer updates, not
            batches: k batches each with gradient accumulation).
        log_dir: directory for TensorBoard event files, or None.
        json_path: the JSON file to write, or None.
        block_fn: maps a variable path to its block name for the tags;
            default `block_of`.

    Attributes:
        records: the records so far, as they go to the JSON file.
    """

    def __init__(self, interval=50, log_dir=None, json_path=None, block_fn=block_of):
        super().__init__(interval)
        self.log_dir = log_dir
        self.json_path = json_path
        self.block_fn = block_fn
        self.records = []
        self._writer = None
        self._last_update = None
        if log_dir is not None:
            try:
                import tensorflow  # noqa: F401
            except ImportError as error:
                raise ImportError(
                    f"log_dir={log_dir!r} needs TensorFlow for tf.summary; "
                    "install it, or pass log_dir=None and use json_path."
                ) from error

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        optimizer = self._optimizer()
        self._header = {
            "format": FORMAT,
            "optimizer": type(optimizer).__name__,
            "gradient_accumulation_steps": self._steps,
            "interval": self.interval,
            "statistics": optimizer.statistics_table()[0] if optimizer.built
            else list(STATISTICS),
            "layers": None,
            "adapted": None,
        }
        update = self._micro_steps // self._steps
        if not self.records and update and self.json_path and os.path.exists(
            self.json_path
        ):
            # A resumed run: keep the records up to the restored update.
            with open(self.json_path) as f:
                previous = json.load(f)
            if previous.get("format") == FORMAT:
                self.records = [r for r in previous["records"] if r["update"] <= update]
        if not self.records:
            # Log the first update too: the warmup question lives there.
            self._due = min(self._due, update + 1)

    def _act(self):
        optimizer = self._optimizer()
        if not optimizer.built:  # `fit` ran no step
            return
        update, paths, names, values = read_layer_statistics(optimizer)
        if update == self._last_update or update == 0:
            return
        self._last_update = update
        self._header.update(layers=paths, statistics=names,
                            adapted=[bool(a) for a in optimizer._adapted])
        record = {
            "update": update,
            "epoch": self._epoch,
            "values": {s: _floats(values[:, i]) for i, s in enumerate(names)},
        }
        noise = None
        if optimizer.noise_scale:
            noise = optimizer.gradient_noise_scale(blocks(paths, self.block_fn))
            record.update(b_simple=noise["b_simple"], b_simple_blocks=noise["blocks"])
        self.records.append(record)
        if self.log_dir is not None:
            self._summarize(update, paths, names, values, noise)

    def _summarize(self, update, paths, names, values, noise):
        import tensorflow as tf
        from tensorboard.plugins.scalar import metadata

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
            tags = tf.constant(
                [f"{tag_of(p, self.block_fn)}/{s}" for p in paths for s in names]
            )
            scalar = metadata.create_summary_metadata(display_name=None, description=None)
            coherence = names.index("coherence")

            # A graph with one summary op in a loop: an eager loop over the
            # tags, or an unrolled graph, costs far more per record or to
            # trace when there are hundreds of layers.
            @tf.function(autograph=False)
            def write(values, step):
                flat = tf.reshape(values, [-1])
                with self._writer.as_default(step=step):

                    def write_one(i):
                        tf.summary.write(tags[i], flat[i], metadata=scalar)
                        return (i + 1,)

                    tf.while_loop(lambda i: i < tf.size(tags), write_one, (0,))
                    for j, stat in enumerate(names[:len(STATISTICS)]):
                        tf.summary.histogram(f"histograms/{stat}", values[:, j])
                    tf.summary.scalar(
                        "coherence/mean", tf.reduce_mean(values[:, coherence])
                    )
                    tf.summary.scalar(
                        "coherence/min", tf.reduce_min(values[:, coherence])
                    )

            self._write = write
        self._write(tf.constant(values), tf.constant(update, tf.int64))
        if noise is not None:
            with self._writer.as_default(step=update):
                if noise["b_simple"] is not None:
                    tf.summary.scalar("noise_scale/b_simple", noise["b_simple"])
                for block, value in noise["blocks"].items():
                    if value is not None:
                        tf.summary.scalar(f"noise_scale/blocks/{block}", value)

    def _save(self):
        if self._writer is not None:
            self._writer.flush()
        if self.json_path is not None and self.records:
            _write_json_atomically(
                self.json_path, dict(self._header, records=self.records)
            )

    def on_epoch_end(self, epoch, logs=None):
        self._save()

    def on_train_end(self, logs=None):
        self._act()
        self._save()


class NonFiniteUpdateMonitor(_EveryUpdates):
    """Warns when updates were skipped because a gradient was not finite.

    `LARS` and `CLARS` skip an update whose gradient holds inf or NaN and
    count it in `optimizer.non_finite_updates`; a compiled step cannot warn,
    so this callback checks that counter every `interval` updates and at
    each epoch's end.

    With a LossScaleOptimizer (mixed_float16) non-finite float16 gradients
    are expected now and then: the loss scaling skips those steps itself
    and they never reach the counter.

    Args:
        interval: check every this many updates. 1 reacts at once but reads
            the device after every update.
        stop_training: also stop `fit` when a skip is seen.
    """

    def __init__(self, interval=50, stop_training=False):
        super().__init__(interval)
        self.stop_training = stop_training

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        # The TensorFlow trainer builds the optimizer in the first step.
        optimizer = self._optimizer()
        self._seen = (
            int(ops.convert_to_numpy(optimizer.non_finite_updates))
            if optimizer.built
            else 0
        )

    def _act(self):
        optimizer = self._optimizer()
        if not optimizer.built:
            return
        total = int(ops.convert_to_numpy(optimizer.non_finite_updates))
        if total <= self._seen:
            return
        new, self._seen = total - self._seen, total
        update = int(ops.convert_to_numpy(optimizer.iterations))
        warnings.warn(
            f"{new} update(s) skipped for a non-finite (inf or NaN) gradient "
            f"since the last check (at or before update {update}; "
            f"{total} in all). The weights were left unchanged."
            + (" Stopping training." if self.stop_training else ""),
            RuntimeWarning,
            stacklevel=2,
        )
        if self.stop_training:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        self._act()
