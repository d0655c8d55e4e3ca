"""The trainer's configuration: `Config`, whose fields are its flags.

Each flag is declared once, as a `Config` field made by `flag`: its default,
its help text and its check (a lower bound or a set of choices), from which
`define_flags` makes the absl flags and `recipes.train.validate` checks a
`Config`.
"""

import dataclasses

from absl import flags

from keras_clars import schedules
from recipes import data, models, strategies

OPTIMIZERS = ("clars", "lars", "sgd")
DTYPES = ("float32", "mixed_float16", "mixed_bfloat16")
# The flags a run's result does not depend on: where things are, what is
# logged and when it saves. A checkpoint resumes only the run whose other
# flags are all the same.
NOT_STATE = ("data_dir", "download", "tpu", "model_dir", "checkpoint_steps",
             "layer_stats_interval", "layer_stats_path", "record_path", "verbose")


def flag(default, help, low=None, choices=None):
    """A `Config` field that is a flag: default, help and check in one place."""
    return dataclasses.field(default=default, metadata={
        "help": help, "low": low, "choices": choices})


@dataclasses.dataclass
class Config:
    """Everything a run needs; the fields are the flags of this script."""

    model: str = flag("resnet20", f"One of {', '.join(models.MODELS)}, or "
                      "kerascv:<BackboneClass>.")
    width: int = flag(16, "ResNet-20's first-stage channels (16 in He et al.).")
    depth: int = flag(20, "Depth 6n+2 of --model=resnet20 (the CIFAR-style ResNet of "
                      "He et al.): 20 (n=3), or 8 for ResNet-8 (one block a stage).")
    kerascv_config: str = flag("", "JSON config of a kerascv: backbone (input_shape is set).")
    dataset: str = flag("fashion_mnist", "Dataset; fashion_mnist is read offline from "
                        "the Debian package.", choices=data.DATASETS)
    data_dir: str = flag("", "tensorflow-datasets data_dir (or the Fashion-MNIST folder).")
    download: bool = flag(False, "Let tensorflow-datasets download and prepare the dataset.")
    image_size: int = flag(0, "Model input side; 0: the dataset's (224 for ImageNet; at "
                           "least 32 for keras.applications models). A side that divides a "
                           "small dataset's native one average-pools (Fashion-MNIST 14: 2x2 "
                           "pooling).", low=0)
    augment: bool = flag(True, "Augment the training images (pad-crop-flip; ImageNet: "
                         "random resized crop); --noaugment: the evaluation preprocessing.")
    validation_examples: int = flag(
        0, "Hold out N training examples (a fixed permutation, independent of --seed; "
        "Fashion-MNIST only) for the per-epoch evaluation; the test split is then "
        "evaluated once, at the end (test_accuracy). 0: evaluate on the test split "
        "every epoch.", low=0)
    train_examples: int = flag(0, "Train on only the first N remaining training examples "
                               "(tiny test runs); 0: all.", low=0)
    optimizer: str = flag("clars", "clars, lars or sgd (heavy-ball momentum SGD, "
                          "MomentumSGD).", choices=OPTIMIZERS)
    per_example_norms: bool = flag(
        False, "Exact per-example gradient norms as CLARS's samples "
        "(keras_clars.per_example_norms; b=1, S=B): clars, or any optimizer with "
        "--noise_scale (lars and sgd take no sample norms otherwise).")
    noise_scale: bool = flag(
        False, "Estimate the gradient noise scale B_simple from the update's S >= 2 "
        "samples (docs/noise_scale.md), logged with the layer statistics (every "
        "--layer_stats_interval updates, else 10) to JSON and TensorBoard "
        "noise_scale/b_simple; clars, lars and sgd.")
    batch_size: int = flag(1024, "Global batch B: examples per update, over all "
                           "replicas.", low=1)
    micro_batch_size: int = flag(
        0, "Examples per replica per micro-step (the slice size b of CLARS); 0: B / "
        "replicas. k = B / (b * replicas) micro-steps are accumulated per update, so "
        "S = replicas * k gradient samples.", low=0)
    base_lr: float = flag(1.0, "Learning rate (before --lr_scaling); the peak of the "
                          "schedule.", low=0)
    lr_scaling: str = flag("none", "linear: peak = base_lr * B / 256 (Goyal et al.); "
                           "none: base_lr.", choices=("linear", "none"))
    warmup_epochs: float = flag(0.0, "Epochs of linear warmup (may be fractional).", low=0)
    schedule: str = flag("poly", f"Decay after warmup: {', '.join(schedules.DECAYS)}.",
                         choices=schedules.DECAYS)
    poly_power: float = flag(2.0, "Exponent of the poly decay.")
    momentum: float = flag(0.9, "Heavy-ball momentum.")
    nesterov: bool = flag(False, "Nesterov momentum.")
    weight_decay: float = flag(0.0, "Weight decay, coupled (inside the update) for every "
                               "optimizer. Never on biases and BatchNorm parameters.", low=0)
    trust_coefficient: float = flag(0.001, "eta of LARS and CLARS.")
    excluded_lr: float = flag(
        None, "clars/lars: the peak rate (before --lr_scaling, same warmup and decay) of "
        "the variables without a trust ratio (biases, BatchNorm), set apart from "
        "--base_lr, which then sets only the adapted layers' step base_lr * eta * ||w|| "
        "/ N; unset: tied to --base_lr.", low=0)
    label_smoothing: float = flag(0.0, "Label smoothing of the cross-entropy.", low=0)
    epochs: int = flag(10, "Training epochs.", low=1)
    steps_per_epoch: int = flag(0, "Updates per epoch; 0: the training split / B.", low=0)
    eval_steps: int = flag(0, "Evaluation batches per epoch (and of the final test "
                           "evaluation); 0: the whole split.", low=0)
    strategy: str = flag("default", "tf.distribute strategy: "
                         f"{', '.join(strategies.STRATEGIES)}.", choices=strategies.STRATEGIES)
    tpu: str = flag("", "TPU name or address for --strategy=tpu.")
    logical_cpus: int = flag(0, "Split the CPU into N logical devices first (testing).", low=0)
    dtype: str = flag("float32", f"Keras dtype policy: {', '.join(DTYPES)}.", choices=DTYPES)
    jit_compile: bool = flag(False, "XLA-compile the train step.")
    model_dir: str = flag("", "Checkpoints (a rerun of the same command resumes from the "
                          "newest: docs/recipes.md), TensorBoard logs, metrics.csv and "
                          "metrics.json; empty: keep nothing.")
    checkpoint_steps: int = flag(0, "Also checkpoint every N updates (0: epoch ends "
                                 "only).", low=0)
    seed: int = flag(0, "Random seed (weights, shuffling, augmentation).")
    deterministic: bool = flag(False, "Deterministic TensorFlow ops (slower; needed for "
                               "bit-identical reruns and resumes).")
    sync_batchnorm: bool = flag(False, "Synchronized (cross-replica) BatchNorm.")
    bn_momentum: float = flag(0.9, "BatchNorm momentum (Keras: 0.99); 0.9 keeps the "
                              "statistics current when large batches make epochs only a "
                              "few updates long.")
    batch_norm: bool = flag(True, "--model=resnet20's BatchNorm layers; --nobatch_norm: "
                            "none, and biases on the convolutions instead.")
    layer_stats_interval: int = flag(
        0, "clars/lars: log per-layer trust ratios and coherence every N updates to "
        "<model_dir>/layer_statistics.json and TensorBoard <model_dir>/logs/layers (0: "
        "off; docs/diagnostics.md).", low=0)
    layer_stats_path: str = flag("", "The JSON file of --layer_stats_interval; empty: "
                                 "<model_dir>/layer_statistics.json.")
    record_path: str = flag("", "Write the run's JSON record here (config, commit, package "
                            "versions, wall time, per-epoch metrics, final validation and "
                            "test accuracy); empty: none.")
    verbose: int = flag(1, "Keras progress output: 0 silent, 1 progress bar, 2 one line.")


def define_flags(flag_values=flags.FLAGS):
    """Defines one flag per `Config` field, with its default."""
    definers = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer,
                float: flags.DEFINE_float, str: flags.DEFINE_string}
    for field in dataclasses.fields(Config):
        help, choices = field.metadata["help"], field.metadata["choices"]
        if choices:
            flags.DEFINE_enum(field.name, field.default, choices, help,
                              flag_values=flag_values)
        else:
            definers[field.type](field.name, field.default, help, flag_values=flag_values)


def config_from_flags(flag_values=flags.FLAGS):
    return Config(**{f.name: flag_values[f.name].value for f in dataclasses.fields(Config)})


def config_from_args(args):
    """A `Config` from command-line arguments, e.g. `["--flagfile=x.cfg"]`."""
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    flag_values(["train.py", *args])
    return config_from_flags(flag_values)
