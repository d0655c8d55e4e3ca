"""Large-batch training with CLARS, LARS or SGD: one trainer, absl flags.

    .venv/bin/python -m recipes.train \\
        --flagfile=recipes/configs/resnet50_imagenet_b16k_clars.cfg \\
        --data_dir=$HOME/tensorflow_datasets --model_dir=runs/resnet50_clars

With no flags it trains a ResNet-20 on Fashion-MNIST (offline). Every flag
and the named configs are described in docs/recipes.md. `run(Config(...))`
is the one training function: the main job (`recipes.compare`) and the
evidence study (`recipes.study`) call it.
"""

import dataclasses
import glob
import json
import os
import platform
import re
import subprocess
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

import keras_clars
from keras_clars import schedules
from keras_clars.callbacks import (
    LayerStatisticsLogger,
    NonFiniteUpdateMonitor,
)
# The one atomic JSON writer, shared with the library's statistics logger.
from keras_clars.callbacks import _write_json_atomically
from recipes import data, models, strategies

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD_FORMAT = "keras-clars-run/1"
OPTIMIZERS = ("clars", "lars", "sgd")
DTYPES = ("float32", "mixed_float16", "mixed_bfloat16")
LR_SCALINGS = ("linear", "none")
IMAGENET_SIZE = 224


@dataclasses.dataclass
class Config:
    """Everything a run needs; the fields are the flags of this script."""

    model: str = "resnet20"
    width: int = 16
    depth: int = 20
    kerascv_config: str = ""
    dataset: str = "fashion_mnist"
    data_dir: str = ""
    download: bool = False
    image_size: int = 0
    augment: bool = True
    validation_examples: int = 0
    train_examples: int = 0
    optimizer: str = "clars"
    per_example_norms: bool = False
    batch_size: int = 1024
    micro_batch_size: int = 0
    base_lr: float = 1.0
    lr_scaling: str = "none"
    warmup_epochs: float = 0.0
    schedule: str = "poly"
    poly_power: float = 2.0
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    trust_coefficient: float = 0.001
    excluded_lr: float = None
    label_smoothing: float = 0.0
    epochs: int = 10
    steps_per_epoch: int = 0
    eval_steps: int = 0
    strategy: str = "default"
    tpu: str = ""
    logical_cpus: int = 0
    dtype: str = "float32"
    jit_compile: bool = False
    model_dir: str = ""
    checkpoint_steps: int = 0
    seed: int = 0
    deterministic: bool = False
    sync_batchnorm: bool = False
    bn_momentum: float = 0.9
    layer_stats_interval: int = 0
    layer_stats_path: str = ""
    record_path: str = ""
    verbose: int = 1


HELP = {
    "model": f"One of {', '.join(models.MODELS)}, or kerascv:<BackboneClass>.",
    "width": "ResNet-20's first-stage channels (16 in He et al.).",
    "depth": "Depth 6n+2 of --model=resnet20 (the CIFAR-style ResNet of He et "
    "al.): 20 (n=3), or 8 for ResNet-8 (one block a stage).",
    "kerascv_config": "JSON config of a kerascv: backbone (input_shape is set).",
    "dataset": "Dataset; fashion_mnist is read offline from the Debian package.",
    "data_dir": "tensorflow-datasets data_dir (or the Fashion-MNIST folder).",
    "download": "Let tensorflow-datasets download and prepare the dataset.",
    "image_size": "Model input side; 0: the dataset's (224 for ImageNet; "
    "at least 32 for keras.applications models). A side that divides a small "
    "dataset's native one average-pools (Fashion-MNIST 14: 2x2 pooling).",
    "augment": "Augment the training images (pad-crop-flip; ImageNet: random "
    "resized crop); --noaugment: the evaluation preprocessing.",
    "validation_examples": "Hold out N training examples (a fixed permutation, "
    "independent of --seed; Fashion-MNIST only) for the per-epoch evaluation; "
    "the test split is then evaluated once, at the end (test_accuracy). 0: "
    "evaluate on the test split every epoch.",
    "train_examples": "Train on only the first N remaining training examples "
    "(tiny test runs); 0: all.",
    "optimizer": "clars, lars or sgd (heavy-ball momentum SGD, MomentumSGD).",
    "per_example_norms": "clars only: exact per-example gradient norms as "
    "CLARS's samples (keras_clars.per_example_norms; b=1, S=B). Refused for "
    "lars and sgd, which take no sample norms.",
    "batch_size": "Global batch B: examples per update, over all replicas.",
    "micro_batch_size": "Examples per replica per micro-step (the slice size b "
    "of CLARS); 0: B / replicas. k = B / (b * replicas) micro-steps are "
    "accumulated per update, so S = replicas * k gradient samples.",
    "base_lr": "Learning rate (before --lr_scaling); the peak of the schedule.",
    "lr_scaling": "linear: peak = base_lr * B / 256 (Goyal et al.); none: base_lr.",
    "warmup_epochs": "Epochs of linear warmup (may be fractional).",
    "schedule": f"Decay after warmup: {', '.join(schedules.DECAYS)}.",
    "poly_power": "Exponent of the poly decay.",
    "momentum": "Heavy-ball momentum.",
    "nesterov": "Nesterov momentum.",
    "weight_decay": "Weight decay, coupled (inside the update) for every "
    "optimizer. Never on biases and BatchNorm parameters.",
    "trust_coefficient": "eta of LARS and CLARS.",
    "excluded_lr": "clars/lars: the peak rate (before --lr_scaling, same "
    "warmup and decay) of the variables without a trust ratio (biases, "
    "BatchNorm), set apart from --base_lr, which then sets only the adapted "
    "layers' step base_lr * eta * ||w|| / N; unset: tied to --base_lr.",
    "label_smoothing": "Label smoothing of the cross-entropy.",
    "epochs": "Training epochs.",
    "steps_per_epoch": "Updates per epoch; 0: the training split / B.",
    "eval_steps": "Evaluation batches per epoch (and of the final test "
    "evaluation); 0: the whole split.",
    "strategy": f"tf.distribute strategy: {', '.join(strategies.STRATEGIES)}.",
    "tpu": "TPU name or address for --strategy=tpu.",
    "logical_cpus": "Split the CPU into N logical devices first (testing).",
    "dtype": f"Keras dtype policy: {', '.join(DTYPES)}.",
    "jit_compile": "XLA-compile the train step.",
    "model_dir": "Checkpoints (resumed after an interruption), TensorBoard "
    "logs, metrics.csv and metrics.json; empty: keep nothing.",
    "checkpoint_steps": "Also checkpoint every N updates (0: epoch ends only).",
    "seed": "Random seed (weights, shuffling, augmentation).",
    "deterministic": "Deterministic TensorFlow ops (slower).",
    "sync_batchnorm": "Synchronized (cross-replica) BatchNorm.",
    "bn_momentum": "BatchNorm momentum (Keras: 0.99); 0.9 keeps the statistics "
    "current when large batches make epochs only a few updates long.",
    "layer_stats_interval": "clars/lars: log per-layer trust ratios and "
    "coherence every N updates to <model_dir>/layer_statistics.json and "
    "TensorBoard <model_dir>/logs/layers (0: off; docs/diagnostics.md).",
    "layer_stats_path": "The JSON file of --layer_stats_interval; empty: "
    "<model_dir>/layer_statistics.json.",
    "record_path": "Write the run's JSON record here (config, commit, package "
    "versions, wall time, per-epoch metrics, final validation and test "
    "accuracy); empty: none.",
    "verbose": "Keras progress output: 0 silent, 1 progress bar, 2 one line.",
}
ENUMS = {
    "dataset": data.DATASETS,
    "optimizer": OPTIMIZERS,
    "lr_scaling": LR_SCALINGS,
    "schedule": schedules.DECAYS,
    "strategy": strategies.STRATEGIES,
    "dtype": DTYPES,
}


def define_flags(flag_values=flags.FLAGS):
    """Defines one flag per `Config` field, with its default."""
    definers = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer,
                float: flags.DEFINE_float, str: flags.DEFINE_string}
    for field in dataclasses.fields(Config):
        if field.name in ENUMS:
            flags.DEFINE_enum(field.name, field.default, ENUMS[field.name],
                              HELP[field.name], flag_values=flag_values)
        else:
            definers[field.type](
                field.name, field.default, HELP[field.name], flag_values=flag_values
            )


def config_from_flags(flag_values=flags.FLAGS):
    return Config(**{f.name: flag_values[f.name].value for f in dataclasses.fields(Config)})


def config_from_args(args):
    """A `Config` from command-line arguments, e.g. `["--flagfile=x.cfg"]`."""
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    flag_values(["train.py", *args])
    return config_from_flags(flag_values)


def validate(config):
    """Raises ValueError, naming the flag and value, for a bad `Config`."""
    models.check_name(config.model)
    for name, choices in ENUMS.items():
        value = getattr(config, name)
        if value not in choices:
            raise ValueError(
                f"--{name} must be one of {', '.join(choices)}; received {value!r}."
            )
    for name, low in [("base_lr", 0), ("warmup_epochs", 0), ("weight_decay", 0),
                      ("label_smoothing", 0), ("micro_batch_size", 0),
                      ("steps_per_epoch", 0), ("eval_steps", 0),
                      ("checkpoint_steps", 0), ("logical_cpus", 0),
                      ("image_size", 0), ("batch_size", 1), ("epochs", 1),
                      ("layer_stats_interval", 0), ("validation_examples", 0),
                      ("train_examples", 0), ("excluded_lr", 0)]:
        value = getattr(config, name)
        if value is None:  # an optional flag left unset
            continue
        if not value >= low:
            raise ValueError(f"--{name} must be >= {low}; received --{name}={value}.")
    if not config.label_smoothing < 1:
        raise ValueError(
            f"--label_smoothing must be < 1; received {config.label_smoothing}."
        )
    if not config.warmup_epochs < config.epochs:
        raise ValueError(
            f"--warmup_epochs must be < --epochs={config.epochs}; received "
            f"--warmup_epochs={config.warmup_epochs}."
        )
    if config.layer_stats_interval and config.optimizer == "sgd":
        raise ValueError(
            "--layer_stats_interval needs --optimizer=clars or lars; received "
            "--optimizer=sgd."
        )
    if config.model == "resnet20" and ((config.depth - 2) % 6 or config.depth < 8):
        raise ValueError(
            f"--depth must be 6n + 2 with n >= 1 (8, 14, 20, ...); received "
            f"--depth={config.depth}."
        )
    if config.excluded_lr is not None and config.optimizer == "sgd":
        raise ValueError(
            "--excluded_lr needs --optimizer=clars or lars (SGD has one rate); "
            "received --optimizer=sgd."
        )
    if config.per_example_norms and config.optimizer != "clars":
        raise ValueError(
            "--per_example_norms needs --optimizer=clars (only CLARS takes sample "
            f"norms); received --optimizer={config.optimizer}."
        )
    if (config.validation_examples or config.train_examples) and \
            config.dataset != "fashion_mnist":
        raise ValueError(
            "--validation_examples and --train_examples need --dataset="
            f"fashion_mnist; received --dataset={config.dataset}."
        )
    # The optimizers check their own hyperparameters (momentum, ...).
    make_optimizer(config, config.base_lr, excluded_learning_rate=config.excluded_lr)


def batch_layout(batch_size, micro_batch_size, replicas):
    """Returns (b, k, S): slice size, micro-steps per update, samples per update.

    Raises:
        ValueError: B is not b * replicas * k for an integer k.
    """
    micro = micro_batch_size or batch_size // replicas
    if micro < 1 or batch_size % (micro * replicas):
        raise ValueError(
            f"--batch_size={batch_size} is not divisible by --micro_batch_size="
            f"{micro_batch_size or micro} times {replicas} replicas "
            f"(= {micro * replicas})."
        )
    k = batch_size // (micro * replicas)
    return micro, k, replicas * k


@keras.saving.register_keras_serializable(package="keras_clars_recipes")
class MomentumSGD(keras_clars.LARS):
    """SGD with heavy-ball momentum and coupled weight decay (Goyal et al. 2017).

    LARS with every trust ratio 1:

        v <- m * v + lr * (g + beta * w);   w <- w - v

    which is Keras SGD's update (v <- m * v - lr * g; w <- w + v) with the
    weight decay inside the step, as Goyal et al. apply it. It is the
    recipes' SGD baseline because it shares LARS's machinery: it accumulates
    micro-steps under every tf.distribute strategy (Keras SGD's own
    accumulation fails there) and evaluates its schedule at the update index.
    `trust_coefficient` is unused.
    """

    def _is_layer_adapted(self, variable):
        return False


def make_optimizer(config, learning_rate, accumulation_steps=1,
                   excluded_learning_rate=None):
    """The optimizer of `config`: CLARS, LARS or `MomentumSGD`.

    All three take weight decay coupled, in their update, and none decays
    variables of rank <= 1. `excluded_learning_rate` (LARS, CLARS) sets the
    rate of the variables without a trust ratio apart from `learning_rate`.
    """
    k = accumulation_steps if accumulation_steps > 1 else None
    decay = config.weight_decay or None
    cls = {"clars": keras_clars.CLARS, "lars": keras_clars.LARS,
           "sgd": MomentumSGD}[config.optimizer]
    return cls(
        learning_rate, momentum=config.momentum,
        trust_coefficient=config.trust_coefficient, weight_decay=decay,
        nesterov=config.nesterov, gradient_accumulation_steps=k,
        **({} if excluded_learning_rate is None
           else {"excluded_learning_rate": excluded_learning_rate}),
    )


def image_size(config, source):
    """The model's input side: the flag, or what the dataset and model allow."""
    if config.image_size:
        return config.image_size
    if source.native_size is None:
        return IMAGENET_SIZE
    if config.model != "resnet20":
        return max(source.native_size, models.MIN_APPLICATION_SIZE)
    return source.native_size


def _inner(optimizer):
    return getattr(optimizer, "inner_optimizer", optimizer)


def optimizer_digest(optimizer):
    """A fingerprint of the optimizer's state: (micro-steps, sum of |values|)."""
    total = sum(
        float(np.abs(keras.ops.convert_to_numpy(v.value)).astype(np.float64).sum())
        for v in optimizer.variables
    )
    return int(keras.ops.convert_to_numpy(_inner(optimizer)._iterations)), total


def _write_json(path, value):
    _write_json_atomically(path, value, indent=1)


class Checkpointer(keras.callbacks.Callback):
    """Saves weights and optimizer state; the newest complete save resumes.

    A save is `step-N.weights.h5` (N micro-steps done) and then `step-N.json`,
    written last: a save without its JSON (a process killed while writing)
    is ignored. Keras's BackupAndRestore is not used because it restarts an
    interrupted epoch from its first batch.

    Args:
        directory: where the saves go.
        every: micro-steps between saves (0: only at epoch ends).
        steps_per_epoch: micro-steps per epoch.
    """

    def __init__(self, directory, every, steps_per_epoch):
        super().__init__()
        self.directory = directory
        self.every = every
        self.steps_per_epoch = steps_per_epoch
        self.done = 0
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
        model.optimizer.build(model.trainable_variables)
        model.load_weights(os.path.join(self.directory, state["weights"]))
        self.done = state["micro_steps"]
        return self.done

    def on_train_batch_end(self, batch, logs=None):
        self.done += 1
        if self.every and self.done % self.every == 0 and self.done % self.steps_per_epoch:
            self.save()

    def on_epoch_end(self, epoch, logs=None):
        self.save()

    def save(self):
        name = f"step-{self.done}"
        weights = name + ".weights.h5"
        self.model.save_weights(os.path.join(self.directory, weights), overwrite=True)
        iterations, digest = optimizer_digest(self.model.optimizer)
        epoch, step = divmod(self.done, self.steps_per_epoch)
        _write_json(os.path.join(self.directory, name + ".json"), {
            "weights": weights, "micro_steps": self.done, "epoch": epoch,
            "step": step, "optimizer_micro_steps": iterations,
            "optimizer_digest": digest,
        })
        for old in glob.glob(os.path.join(self.directory, "step-*")):
            if not os.path.basename(old).startswith(name + "."):
                os.remove(old)


class EpochLog(keras.callbacks.Callback):
    """The recipes' one epoch-history logger.

    Adds the learning rate, epoch time and update count to the logs (it runs
    before the CSV and TensorBoard loggers, so they see them) and keeps every
    epoch. With a `path`, rewrites the JSON list of epochs after each one.
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
            _write_json(self.path, self.epochs)


class FirstUpdateCoherence(keras.callbacks.Callback):
    """Reads CLARS/LARS's per-layer coherence ||g_l|| / N_l after update 1.

    One device read, after the k-th micro-step of a run that starts at 0.
    `result` is None until then, or a dict: `mean` and `min` over the
    layer-adapted variables (rank >= 2: kernels) and `layers` (path ->
    coherence). LARS's is 1 by definition.
    """

    def __init__(self, accumulation_steps):
        super().__init__()
        self.k = accumulation_steps
        self.result = None
        self._seen = 0

    def on_train_batch_end(self, batch, logs=None):
        self._seen += 1
        if self.result is not None or self._seen != self.k:
            return
        optimizer = self.model.optimizer
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)
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


def run(config, strategy=None):
    """Trains as `config` says.

    Args:
        config: a `Config`.
        strategy: a `tf.distribute.Strategy` to train under; None: make one
            from `config.strategy` (and `config.logical_cpus`).

    Returns:
        A dict: `epochs` (one dict of metrics per epoch, including those of
        a run that was resumed), `summary` (the layout b, k, S, the
        schedule, wall time, the resume point and the final evaluation),
        `record` (what `--record_path` gets) and `model`.
    """
    began_run = time.time()
    code = environment()  # the code as the run starts
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
    replicas = strategy.num_replicas_in_sync
    micro, k, samples = batch_layout(config.batch_size, config.micro_batch_size, replicas)

    def load(split):
        return data.load(config.dataset, split, config.data_dir or None, config.download,
                         config.validation_examples, config.train_examples)

    train_source = load("train")
    test_source = load("eval")
    eval_source = load("validation") if config.validation_examples else test_source
    updates = config.steps_per_epoch or (train_source.num_examples or 0) // config.batch_size
    if updates < 1:
        raise ValueError(
            f"No full batch of --batch_size={config.batch_size} in "
            f"{train_source.num_examples} training examples; set --steps_per_epoch."
        )
    steps = updates * k  # micro-steps per epoch: what model.fit counts
    total = updates * config.epochs
    warmup = round(config.warmup_epochs * updates)
    peak = schedules.scaled_learning_rate(config.base_lr, config.batch_size, config.lr_scaling)
    schedule = schedules.WarmupDecay(
        peak, total, warmup, config.schedule, power=config.poly_power
    )
    excluded_peak = excluded_schedule = None
    if config.excluded_lr is not None:
        excluded_peak = schedules.scaled_learning_rate(
            config.excluded_lr, config.batch_size, config.lr_scaling)
        excluded_schedule = schedules.WarmupDecay(
            excluded_peak, total, warmup, config.schedule, power=config.poly_power)
    size = image_size(config, train_source)
    # Per-example norms: every example of the batch is a sample.
    b, S = (1, config.batch_size) if config.per_example_norms else (micro, samples)
    summary = {
        "replicas": replicas, "slice_size_b": b, "accumulation_k": k,
        "samples_S": S, "micro_batch": micro, "global_batch_B": config.batch_size,
        "per_example_norms": config.per_example_norms,
        "updates_per_epoch": updates, "micro_steps_per_epoch": steps,
        "total_updates": total, "warmup_updates": warmup, "peak_lr": peak,
        "excluded_peak_lr": peak if excluded_peak is None else excluded_peak,
        "image_size": size, "train_examples": train_source.num_examples,
        "eval_split": "validation" if config.validation_examples else "test",
        "eval_examples": eval_source.num_examples,
    }
    samples_text = (
        f"per-example samples: b=1, S=B={S} gradient samples per update "
        f"(micro-batches of {micro})" if config.per_example_norms else
        f"S={S} gradient samples per update"
    )
    print(
        f"{config.optimizer}: B={config.batch_size} = {replicas} replicas x "
        f"b={micro} (slice size) x k={k} micro-steps; {samples_text}. "
        f"{updates} updates/epoch ({steps} micro-steps, "
        f"what the progress bar counts), {total} updates; peak lr {peak:g}"
        + ("" if excluded_peak is None else
           f" (biases and BatchNorm: {excluded_peak:g})") + ", "
        f"{warmup} warmup updates, {config.schedule} decay.", flush=True,
    )

    with strategy.scope():
        model = models.build_model(
            config.model, (size, size, train_source.channels),
            train_source.num_classes, width=config.width,
            bn_momentum=config.bn_momentum, synchronized_bn=config.sync_batchnorm,
            kerascv_config=config.kerascv_config or None, depth=config.depth,
        )
        if config.per_example_norms:
            model = keras_clars.per_example_norms(model)
        model.compile(
            optimizer=make_optimizer(config, schedule, k, excluded_schedule),
            loss=keras.losses.CategoricalCrossentropy(
                from_logits=True, label_smoothing=config.label_smoothing
            ),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
            jit_compile=config.jit_compile,
        )
        model.optimizer.build(model.trainable_variables)
        if strategies.is_multi_worker(strategy):
            # Works around a Keras 3.15 multi-worker bug (docs/distribution.md).
            strategies.prepare_multi_worker_fit(
                model,
                np.zeros((1, size, size, train_source.channels), "float32"),
                np.zeros((1, train_source.num_classes), "float32"),
            )

    checkpointer, previous = None, []
    callbacks = []
    if config.model_dir:
        os.makedirs(config.model_dir, exist_ok=True)
        checkpointer = Checkpointer(
            os.path.join(config.model_dir, "checkpoints"),
            config.checkpoint_steps * k, steps,
        )
        start = checkpointer.restore(model)
        metrics_path = os.path.join(config.model_dir, "metrics.json")
        if start and os.path.exists(metrics_path):
            with open(metrics_path) as f:
                previous = [e for e in json.load(f) if e["epoch"] < start // steps]
        epoch_log = EpochLog(metrics_path, previous)
        csv = keras.callbacks.CSVLogger(
            os.path.join(config.model_dir, "metrics.csv"), append=bool(start)
        )
        callbacks = [epoch_log, csv, keras.callbacks.TensorBoard(
            os.path.join(config.model_dir, "logs"), write_graph=False
        ), checkpointer]
    else:
        start, epoch_log = 0, EpochLog()
        callbacks = [epoch_log]
    coherence = None
    if config.optimizer != "sgd":
        callbacks.append(NonFiniteUpdateMonitor())
        if not start:
            coherence = FirstUpdateCoherence(k)
            callbacks.append(coherence)
        if config.layer_stats_interval:
            out = config.model_dir
            json_path = config.layer_stats_path or (
                os.path.join(out, "layer_statistics.json") if out else None)
            callbacks.append(LayerStatisticsLogger(
                interval=config.layer_stats_interval,
                log_dir=os.path.join(out, "logs", "layers") if out else None,
                json_path=json_path,
            ))
    micro_steps, digest = optimizer_digest(model.optimizer)
    summary["resumed_at"] = {
        "micro_steps": start, "epoch": start // steps, "step": start % steps,
        "optimizer_micro_steps": micro_steps, "optimizer_digest": digest,
    }
    if config.model_dir:
        _write_json(os.path.join(config.model_dir, "resume.json"), summary["resumed_at"])
    if start:
        print(f"Resumed from {config.model_dir} at epoch {start // steps}, "
              f"micro-step {start % steps} of {steps}.", flush=True)

    # A fresh shuffle after a restart: the data order is not replayed.
    train = data.pipeline(config.dataset, train_source, micro * replicas, size,
                          training=True, seed=config.seed * 1_000_003 + start,
                          augment=config.augment)
    evaluation = data.pipeline(config.dataset, eval_source, micro * replicas, size,
                               training=False)
    epoch, step = divmod(start, steps)
    phases = []  # (first epoch, end epoch, micro-steps per epoch) of each fit
    if step:  # finish the interrupted epoch, then the rest
        phases.append((epoch, epoch + 1, steps - step))
        epoch += 1
    if epoch < config.epochs:
        phases.append((epoch, config.epochs, steps))
    began = time.time()
    for begin, end, epoch_steps in phases:
        model.fit(
            train, epochs=end, initial_epoch=begin, steps_per_epoch=epoch_steps,
            validation_data=evaluation, validation_steps=config.eval_steps or None,
            callbacks=callbacks, verbose=config.verbose,
            shuffle=False,  # the dataset shuffles
        )
        if config.model_dir:
            csv.append = True
    summary["train_seconds"] = time.time() - began
    summary["final_updates"] = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    summary["final"] = epoch_log.epochs[-1] if epoch_log.epochs else {}
    if config.optimizer != "sgd":
        inner = getattr(model.optimizer, "inner_optimizer", model.optimizer)
        summary["non_finite_updates"] = int(
            keras.ops.convert_to_numpy(inner.non_finite_updates))
    if config.validation_examples:
        # The test split, once, at the end: reported, never used to choose.
        test = data.pipeline(config.dataset, test_source, micro * replicas, size,
                             training=False)
        test_loss, test_accuracy = model.evaluate(
            test, steps=config.eval_steps or None, verbose=0)
        summary["test_accuracy"], summary["test_loss"] = test_accuracy, test_loss
    elif summary["final"]:
        summary["test_accuracy"] = summary["final"].get("val_accuracy")
        summary["test_loss"] = summary["final"].get("val_loss")
    if coherence is not None and coherence.result is not None:
        summary["first_update_coherence"] = coherence.result
    if config.model_dir:
        _write_json(os.path.join(config.model_dir, "summary.json"), summary)
    record = make_record(config, summary, epoch_log.epochs, time.time() - began_run, code)
    if config.record_path:
        _write_json(config.record_path, record)
    return {"epochs": epoch_log.epochs, "summary": summary, "record": record,
            "model": model}


def make_record(config, summary, epochs, wall_seconds, code=None):
    """A run's JSON record: what it was, what it gave, what it ran on.

    `code`: `environment()` as the run started (default: now).
    """
    validation = [e.get("val_accuracy") for e in epochs] if summary[
        "eval_split"] == "validation" else []
    finite = [v for v in validation if v is not None and np.isfinite(v)]
    return {
        "format": RECORD_FORMAT,
        "config": dataclasses.asdict(config),
        **(code or environment()),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_seconds": wall_seconds,
        "summary": {k: v for k, v in summary.items() if k != "final"},
        "epochs": epochs,
        "final_validation_accuracy": validation[-1] if validation else None,
        "best_validation_accuracy": max(finite) if finite else None,
        "test_accuracy": summary.get("test_accuracy"),
        "first_update_coherence": (summary.get("first_update_coherence") or {}).get("mean"),
    }


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
