"""Large-batch training with CLARS, LARS or SGD: one trainer, absl flags.

    .venv/bin/python -m recipes.train \\
        --flagfile=recipes/configs/resnet50_imagenet_b16k_clars.cfg \\
        --data_dir=$HOME/tensorflow_datasets --model_dir=runs/resnet50_clars

With no flags it trains a ResNet-20 on Fashion-MNIST (offline). Every flag
and the named configs are described in docs/recipes.md. `run(Config(...))`
is the one training function: the main job (`recipes.compare`) and the
evidence study (`recipes.study`) call it. A run with a model directory
resumes, after a kill, exactly where its newest checkpoint was written.
"""

import dataclasses
import os
import sys
import time

if not __package__:  # `python recipes/train.py`: import as `-m recipes.train` does
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras
import numpy as np
import tensorflow as tf
from absl import app

import keras_clars
from keras_clars import schedules
from keras_clars.callbacks import LayerStatisticsLogger, NonFiniteUpdateMonitor
from keras_clars.layerwise import inner_optimizer
from recipes import callbacks, data, models, records, strategies
from recipes.optimizers import MomentumSGD, make_optimizer  # noqa: F401  (the API too)

from recipes.config import (  # the trainer's API too
    DTYPES, NOT_STATE, OPTIMIZERS, Config, config_from_args, config_from_flags,
    define_flags)

IMAGENET_SIZE = 224


def _require(ok, message):
    if not ok:
        raise ValueError(message)


def validate(config):
    """Raises ValueError, naming the flag and value, for a bad `Config`."""
    models.check_name(config.model)
    for field in dataclasses.fields(Config):
        name, value = field.name, getattr(config, field.name)
        choices, low = field.metadata["choices"], field.metadata["low"]
        _require(not choices or value in choices,
                 f"--{name} must be one of {', '.join(choices or ())}; received {value!r}.")
        _require(low is None or value is None or value >= low,  # None: an unset option
                 f"--{name} must be >= {low}; received --{name}={value}.")
    _require(config.label_smoothing < 1, "--label_smoothing must be < 1; received "
             f"{config.label_smoothing}.")
    _require(config.warmup_epochs < config.epochs, f"--warmup_epochs must be < --epochs="
             f"{config.epochs}; received --warmup_epochs={config.warmup_epochs}.")
    _require(not (config.layer_stats_interval and config.optimizer == "sgd")
             or config.noise_scale, "--layer_stats_interval needs --optimizer=clars "
             "or lars, or --noise_scale; received --optimizer=sgd.")
    _require(config.model != "resnet20" or (
        (config.depth - 2) % 6 == 0 and config.depth >= 8),
             "--depth must be 6n + 2 with n >= 1 (8, 14, 20, ...); received "
             f"--depth={config.depth}.")
    _require(config.batch_norm or config.model == "resnet20", "--nobatch_norm needs "
             f"--model=resnet20; received --model={config.model}.")
    _require(config.excluded_lr is None or config.optimizer != "sgd",
             "--excluded_lr needs --optimizer=clars or lars (SGD has one rate); "
             "received --optimizer=sgd.")
    _require(not config.per_example_norms or config.optimizer == "clars"
             or config.noise_scale, "--per_example_norms needs --optimizer=clars, or "
             "--noise_scale (only CLARS and the noise scale take sample norms); "
             f"received --optimizer={config.optimizer}.")
    _require(not (config.validation_examples or config.train_examples)
             or config.dataset == "fashion_mnist",
             "--validation_examples and --train_examples need --dataset="
             f"fashion_mnist; received --dataset={config.dataset}.")
    # The optimizers check their own hyperparameters (momentum, ...).
    make_optimizer(config, config.base_lr, excluded_learning_rate=config.excluded_lr)


def batch_layout(batch_size, micro_batch_size, replicas):
    """Returns (b, k, S): slice size, micro-steps per update, samples per update.

    Raises:
        ValueError: B is not b * replicas * k for an integer k.
    """
    micro = micro_batch_size or batch_size // replicas
    _require(micro >= 1 and not batch_size % (micro * replicas),
             f"--batch_size={batch_size} is not divisible by --micro_batch_size="
             f"{micro_batch_size or micro} times {replicas} replicas (= {micro * replicas}).")
    k = batch_size // (micro * replicas)
    return micro, k, replicas * k


def image_size(config, source):
    """The model's input side: the flag, or what the dataset and model allow."""
    if config.image_size:
        return config.image_size
    if source.native_size is None:
        return IMAGENET_SIZE
    if config.model != "resnet20":
        return max(source.native_size, models.MIN_APPLICATION_SIZE)
    return source.native_size


def prepare(config, strategy=None):
    """Checks `config`; seeds, determinism and dtype policy; the strategy."""
    if strategy is None:
        if config.logical_cpus:  # before anything initializes TensorFlow's devices
            strategies.use_logical_cpus(config.logical_cpus)
        # Multi-worker and TPU strategies must exist before TensorFlow starts.
        strategy = strategies.make_strategy(config.strategy, config.tpu or None)
    validate(config)
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.config.set_dtype_policy(config.dtype)
    return strategy


def load_sources(config):
    """The `data.Source`s: `train`, `eval` (per epoch) and `test` (the end)."""
    def load(split):
        return data.load(config.dataset, split, config.data_dir or None, config.download,
                         config.validation_examples, config.train_examples)

    sources = {"train": load("train"), "test": load("eval")}
    sources["eval"] = load("validation") if config.validation_examples else sources["test"]
    return sources


def plan(config, sources, replicas):
    """The run's layout and schedule: (summary, schedule, excluded_schedule)."""
    micro, k, samples = batch_layout(config.batch_size, config.micro_batch_size, replicas)
    train_examples = sources["train"].num_examples
    updates = config.steps_per_epoch or (train_examples or 0) // config.batch_size
    _require(updates >= 1, f"No full batch of --batch_size={config.batch_size} in "
             f"{train_examples} training examples; set --steps_per_epoch.")
    total, warmup = updates * config.epochs, round(config.warmup_epochs * updates)

    def schedule(base_lr):
        peak = schedules.scaled_learning_rate(base_lr, config.batch_size, config.lr_scaling)
        return peak, schedules.WarmupDecay(peak, total, warmup, config.schedule,
                                           power=config.poly_power)

    peak, rates = schedule(config.base_lr)
    excluded_peak, excluded_rates = (peak, None) if config.excluded_lr is None \
        else schedule(config.excluded_lr)
    # Per-example norms: every example of the batch is a sample.
    b, S = (1, config.batch_size) if config.per_example_norms else (micro, samples)
    _require(S >= 2 or not config.noise_scale, "--noise_scale needs S >= 2 gradient "
             "samples per update (--per_example_norms, --micro_batch_size < B or "
             f"replicas); received S={S}.")
    summary = {
        "replicas": replicas, "slice_size_b": b, "accumulation_k": k,
        "samples_S": S, "micro_batch": micro, "global_batch_B": config.batch_size,
        "per_example_norms": config.per_example_norms,
        "updates_per_epoch": updates, "micro_steps_per_epoch": updates * k,
        "total_updates": total, "warmup_updates": warmup, "peak_lr": peak,
        "excluded_peak_lr": excluded_peak, "image_size": image_size(config, sources["train"]),
        "train_examples": train_examples,
        "eval_split": "validation" if config.validation_examples else "test",
        "eval_examples": sources["eval"].num_examples,
    }
    samples_text = (f"per-example samples: b=1, S=B={S} gradient samples per update "
                    f"(micro-batches of {micro})" if config.per_example_norms else
                    f"S={S} gradient samples per update")
    print(f"{config.optimizer}: B={config.batch_size} = {replicas} replicas x b={micro} "
          f"(slice size) x k={k} micro-steps; {samples_text}. {updates} updates/epoch "
          f"({updates * k} micro-steps, what the progress bar counts), {total} updates; "
          f"peak lr {peak:g}" + ("" if excluded_rates is None else
                                 f" (biases and BatchNorm: {excluded_peak:g})") + ", "
          f"{warmup} warmup updates, {config.schedule} decay.", flush=True)
    return summary, rates, excluded_rates


def build(config, summary, source, strategy, rates, excluded_rates):
    """The compiled model, its optimizer built, under `strategy`."""
    size, k = summary["image_size"], summary["accumulation_k"]
    with strategy.scope():
        model = models.build_model(
            config.model, (size, size, source.channels), source.num_classes,
            width=config.width, bn_momentum=config.bn_momentum,
            synchronized_bn=config.sync_batchnorm,
            kerascv_config=config.kerascv_config or None, depth=config.depth,
            batch_norm=config.batch_norm,
        )
        if config.per_example_norms:
            model = keras_clars.per_example_norms(model)
        model.compile(
            optimizer=make_optimizer(config, rates, k, excluded_rates, None if
                                     config.per_example_norms else summary["micro_batch"]),
            loss=keras.losses.CategoricalCrossentropy(
                from_logits=True, label_smoothing=config.label_smoothing),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
            jit_compile=config.jit_compile,
        )
        model.optimizer.build(model.trainable_variables)
        batch = (np.zeros((1, size, size, source.channels), "float32"),
                 np.zeros((1, source.num_classes), "float32"))
        if strategies.is_multi_worker(strategy):
            # Works around a Keras 3.15 multi-worker bug (docs/distribution.md).
            strategies.prepare_multi_worker_fit(model, *batch)
        elif tf.distribute.has_strategy():  # where fit would build from the data
            # fit's own build would advance the training shuffle's seeds.
            strategies.build_before_fit(model, *batch)
    return model


def resume(config, model, summary, out, began):
    """Restores the newest checkpoint in `out`; the callbacks that go on from it.

    Returns (start micro-step, callbacks, `EpochLog`, `FirstUpdateCoherence`
    or None). The summary gets `resumed_at` (with `earlier_seconds`: the wall
    seconds of the processes before this one, up to the save it resumed
    from) and `resumes`: every resume of the run so far, with its time and
    step. `began`: when this process's run began (`time.time()`), from which
    each save counts the run's wall seconds.
    """
    steps, k = summary["micro_steps_per_epoch"], summary["accumulation_k"]
    start, logs, saves, earlier = 0, [], [], 0.0
    if out:
        os.makedirs(out, exist_ok=True)
        run = {name: value for name, value in dataclasses.asdict(config).items()
               if name not in NOT_STATE}
        checkpointer = callbacks.Checkpointer(
            os.path.join(out, "checkpoints"), config.checkpoint_steps * k, steps, run,
            began)
        start = checkpointer.restore(model)
        earlier = checkpointer.earlier  # 0 unless a save was restored
        epochs = records.read_json(os.path.join(out, "metrics.json"), []) if start else []
        epoch_log = callbacks.EpochLog(os.path.join(out, "metrics.json"),
                                       [e for e in epochs if e["epoch"] < start // steps])
        csv = os.path.join(out, "metrics.csv")
        callbacks.keep_csv_epochs(csv, start // steps)
        logs = [keras.callbacks.CSVLogger(csv, append=True), keras.callbacks.TensorBoard(
            os.path.join(out, "logs"), write_graph=False)]
        saves = [checkpointer]
    else:
        epoch_log = callbacks.EpochLog()
    resumes = records.read_json(os.path.join(out, "resumes.json"), []) if start else []
    micro_steps, digest = callbacks.optimizer_digest(model.optimizer)
    summary["resumed_at"] = {
        "micro_steps": start, "epoch": start // steps, "step": start % steps,
        "optimizer_micro_steps": micro_steps, "optimizer_digest": digest,
        "earlier_seconds": earlier,
    }
    if start:
        resumes.append({"at": records.utc_now(), "micro_steps": start,
                        "epoch": start // steps, "step": start % steps})
        print(f"Resumed from {out} at epoch {start // steps}, micro-step "
              f"{start % steps} of {steps}.", flush=True)
    summary["resumes"] = resumes
    if out:
        records.write_json(os.path.join(out, "resume.json"), summary["resumed_at"])
        records.write_json(os.path.join(out, "resumes.json"), resumes)
    extra, coherence = [], None
    if config.optimizer != "sgd":
        coherence = callbacks.FirstUpdateCoherence(
            k, start, out and os.path.join(out, "first_update_coherence.json"))
        extra = [NonFiniteUpdateMonitor(), coherence]
    if config.layer_stats_interval or config.noise_scale:
        extra.append(LayerStatisticsLogger(
            interval=config.layer_stats_interval or 10,
            log_dir=os.path.join(out, "logs", "layers") if out else None,
            json_path=config.layer_stats_path or (
                os.path.join(out, "layer_statistics.json") if out else None)))
    # The save comes last: what the other callbacks record at a step (update
    # 1's coherence) is on disk before a save there can be resumed from.
    return start, [epoch_log, *logs, *extra, *saves], epoch_log, coherence


def fit(config, model, sources, summary, start, more_callbacks):
    """Trains from micro-step `start` to the end, on the uninterrupted run's data.

    The training stream is shuffled with the run's seed and, where the
    source is replayable, replayed up to `start` (`data.pipeline(skip=...)`):
    the resumed run trains on the uninterrupted run's batches. An
    interrupted epoch is finished by its own `fit`.
    """
    steps, replicas = summary["micro_steps_per_epoch"], summary["replicas"]
    batch, size = summary["micro_batch"] * replicas, summary["image_size"]
    evaluation = data.pipeline(config.dataset, sources["eval"], batch, size, training=False)
    epoch, step = divmod(start, steps)
    phases = []  # (first epoch, end epoch, micro-steps an epoch, first micro-step)
    if step:  # the rest of the interrupted epoch, on its own
        phases.append((epoch, epoch + 1, steps - step, start))
        epoch += 1
    if epoch < config.epochs:
        phases.append((epoch, config.epochs, steps, epoch * steps))
    replay = sources["train"].replayable
    for begin, end, epoch_steps, first in phases:
        # Replayed where the examples' order is (in memory); otherwise (tfds's
        # unseeded file order) a fresh shuffle from the resume point on.
        train = data.pipeline(config.dataset, sources["train"], batch, size,
                              training=True, augment=config.augment,
                              seed=config.seed * 1_000_003 + (0 if replay else first),
                              skip=first if replay else 0)
        model.fit(train, epochs=end, initial_epoch=begin, steps_per_epoch=epoch_steps,
                  validation_data=evaluation, validation_steps=config.eval_steps or None,
                  callbacks=more_callbacks, verbose=config.verbose,
                  shuffle=False)  # the dataset shuffles


def finish(config, model, sources, summary, epochs, coherence):
    """The final numbers: update count, skipped updates, test evaluation."""
    summary["final_updates"] = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    summary["final"] = epochs[-1] if epochs else {}
    if config.optimizer != "sgd":
        summary["non_finite_updates"] = int(keras.ops.convert_to_numpy(
            inner_optimizer(model.optimizer).non_finite_updates))
    if config.validation_examples:
        # The test split, once, at the end: reported, never used to choose.
        test = data.pipeline(config.dataset, sources["test"],
                             summary["micro_batch"] * summary["replicas"],
                             summary["image_size"], training=False)
        loss, accuracy = model.evaluate(test, steps=config.eval_steps or None, verbose=0)
        summary["test_accuracy"], summary["test_loss"] = accuracy, loss
    elif summary["final"]:
        summary["test_accuracy"] = summary["final"].get("val_accuracy")
        summary["test_loss"] = summary["final"].get("val_loss")
    if coherence is not None and coherence.result is not None:
        summary["first_update_coherence"] = coherence.result


def run(config, strategy=None, checkpoint_dir=None):
    """Trains as `config` says.

    Args:
        config: a `Config`.
        strategy: a `tf.distribute.Strategy` to train under; None: make one
            from `config.strategy` (and `config.logical_cpus`).
        checkpoint_dir: where to checkpoint and resume from when
            `config.model_dir` is empty, without entering the record's
            config: a killed run called again with the same arguments
            resumes from its newest checkpoint there (the study's runs).

    Returns:
        A dict: `epochs` (one dict of metrics per epoch, including those of
        a run that was resumed), `summary` (the layout b, k, S, the
        schedule, wall time, the resumes and the final evaluation),
        `record` (what `--record_path` gets) and `model`.
    """
    began_run = time.time()
    code = records.environment()  # the code as the run starts
    strategy = prepare(config, strategy)
    sources = load_sources(config)
    summary, rates, excluded_rates = plan(config, sources, strategy.num_replicas_in_sync)
    model = build(config, summary, sources["train"], strategy, rates, excluded_rates)
    out = config.model_dir or checkpoint_dir
    first, more_callbacks, epoch_log, coherence = resume(config, model, summary, out,
                                                         began_run)
    began = time.time()
    fit(config, model, sources, summary, first, more_callbacks)
    summary["train_seconds"] = time.time() - began
    finish(config, model, sources, summary, epoch_log.epochs, coherence)
    if out:
        records.write_json(os.path.join(out, "summary.json"), summary)
    # A resumed run's wall time counts the processes before this one too.
    seconds = time.time() - began_run + summary["resumed_at"]["earlier_seconds"]
    record = records.make_record(config, summary, epoch_log.epochs, seconds, code)
    if config.record_path:
        records.write_json(config.record_path, record)
    return {"epochs": epoch_log.epochs, "summary": summary, "record": record,
            "model": model}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        run(config_from_flags())
    except (ValueError, FileNotFoundError, ImportError) as error:
        sys.exit(f"recipes.train: error: {error}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
