"""LayerStatisticsLogger, NonFiniteUpdateMonitor and the heatmap script.

A small real run (a tiny conv net on 512 Fashion-MNIST images, CLARS with
k = 2) is logged; its JSON, its TensorBoard event files and its heatmap are
checked against `optimizer.layer_statistics()` read after every update.
The JAX backend runs in a subprocess (the backend is fixed at import).
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import layers

from keras_clars import CLARS
from keras_clars.callbacks import (
    LayerStatisticsLogger,
    NonFiniteUpdateMonitor,
    load_layer_statistics,
)
from recipes.fashion_mnist import load_fashion_mnist
from keras_clars.layerwise import STATISTICS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K, BATCH, EXAMPLES, INTERVAL = 2, 32, 512, 3
UPDATES_PER_EPOCH = EXAMPLES // BATCH // K  # 8
# The first update, every 3rd, and the last one; epochs of 8 updates.
EXPECTED_UPDATES = [1, 3, 6, 9, 12, 15, 16]
EXPECTED_EPOCHS = [0, 0, 0, 1, 1, 1, 1]


def fashion(count=EXAMPLES):
    x, y = load_fashion_mnist("train")
    return (x[:count, ..., None] / 255.0).astype("float32"), y[:count].astype("int32")


def small_model():
    # Functional, as the recipes' models: variable paths are `layer/name`.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((28, 28, 1))
    x = layers.Conv2D(4, 3, strides=2, name="block1_conv")(inputs)
    x = layers.ReLU()(layers.BatchNormalization(name="block1_bn")(x))
    outputs = layers.Dense(10, name="head")(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs)


def compile_clars(model, **kwargs):
    model.compile(
        optimizer=CLARS(learning_rate=0.5, trust_coefficient=0.02, **kwargs),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


class Recorder(keras.callbacks.Callback):
    """`layer_statistics()` after every update, the slow obvious way."""

    def __init__(self):
        super().__init__()
        self.by_update = {}

    def on_train_batch_end(self, batch, logs=None):
        optimizer = self.model.optimizer
        self.by_update[int(optimizer.iterations.numpy())] = optimizer.layer_statistics()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("layer_statistics")
    x, y = fashion()
    model = compile_clars(small_model(), gradient_accumulation_steps=K)
    logger = LayerStatisticsLogger(
        interval=INTERVAL, log_dir=str(out / "tb"), json_path=str(out / "stats.json")
    )
    recorder = Recorder()
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0,
              callbacks=[logger, recorder])
    return dict(out=out, model=model, logger=logger, recorder=recorder, x=x, y=y)


def test_json_holds_the_expected_updates_and_values(run):
    data = load_layer_statistics(run["out"] / "stats.json")
    paths = [v.path for v in run["model"].trainable_variables]
    assert data["layers"] == paths
    assert data["adapted"] == [len(v.shape) > 1 for v in run["model"].trainable_variables]
    assert data["statistics"] == list(STATISTICS)
    assert data["optimizer"] == "CLARS" and data["gradient_accumulation_steps"] == K
    assert data["updates"].tolist() == EXPECTED_UPDATES
    assert data["epochs"].tolist() == EXPECTED_EPOCHS
    for row, update in enumerate(EXPECTED_UPDATES):
        expected = run["recorder"].by_update[update]
        for stat in STATISTICS:
            np.testing.assert_array_equal(
                data["values"][stat][row].astype("float32"),
                np.float32([expected[p][stat] for p in paths]),
                err_msg=f"{stat} at update {update}",
            )
    coherence = data["values"]["coherence"]
    # k = 2 differing micro-batches: the samples never agree exactly.
    assert np.all((coherence > 0) & (coherence < 1))
    assert run["logger"].records[-1]["update"] == 16


def test_tensorboard_events_hold_the_expected_tags_and_values(run):
    from tensorboard.backend.event_processing import event_accumulator
    import tensorflow as tf

    events = event_accumulator.EventAccumulator(
        str(run["out"] / "tb"), size_guidance={event_accumulator.TENSORS: 0}
    )
    events.Reload()
    tags = set(events.Tags()["tensors"])
    prefixes = {
        "block1_conv/kernel": "layers/block1/conv/kernel",
        "block1_conv/bias": "layers/block1/conv/bias",
        "block1_bn/gamma": "layers/block1/bn/gamma",
        "block1_bn/beta": "layers/block1/bn/beta",
        "head/kernel": "layers/head/kernel",
        "head/bias": "layers/head/bias",
    }
    assert set(prefixes) == {v.path for v in run["model"].trainable_variables}
    expected_tags = {f"{t}/{s}" for t in prefixes.values() for s in STATISTICS}
    expected_tags |= {f"histograms/{s}" for s in STATISTICS}
    expected_tags |= {"coherence/mean", "coherence/min"}
    assert tags == expected_tags

    def series(tag):
        return {e.step: tf.make_ndarray(e.tensor_proto) for e in events.Tensors(tag)}

    recorded = run["recorder"].by_update
    for path, prefix in prefixes.items():
        for stat in STATISTICS:
            values = series(f"{prefix}/{stat}")
            assert sorted(values) == EXPECTED_UPDATES, f"{prefix}/{stat}"
            for update, value in values.items():
                assert value == np.float32(recorded[update][path][stat]), (
                    f"{prefix}/{stat} at update {update}")
    for update, value in series("coherence/min").items():
        coherence = [s["coherence"] for s in recorded[update].values()]
        np.testing.assert_allclose(value, min(coherence), rtol=1e-6)
        np.testing.assert_allclose(
            series("coherence/mean")[update], np.mean(coherence), rtol=1e-6
        )
    # A histogram over the 5 variables at each logged update.
    histograms = series("histograms/trust_ratio")
    assert sorted(histograms) == EXPECTED_UPDATES
    assert histograms[16][:, 2].sum() == len(prefixes)  # (left, right, count) rows


def test_plot_script_draws_a_png(run, tmp_path):
    from recipes import plots as plot

    png = tmp_path / "img" / "layers.png"
    assert plot.run_args(["layers", str(run["out"] / "stats.json"), "-o", str(png)]) == str(png)
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width = matplotlib.image.imread(png).shape[:2]
    assert width > 800 and height > 150
    with pytest.raises(ValueError, match="Unknown statistics"):
        plot.plot_layer_statistics(str(run["out"] / "stats.json"), str(png), ["lr"])


def test_a_resumed_run_keeps_the_earlier_records(run):
    """A new logger on the same file (a restart) appends after the restore."""
    logger = LayerStatisticsLogger(interval=INTERVAL, json_path=run["logger"].json_path)
    run["model"].fit(run["x"], run["y"], batch_size=BATCH, epochs=3, initial_epoch=2,
                     shuffle=False, verbose=0, callbacks=[logger])
    data = load_layer_statistics(logger.json_path)
    assert data["updates"].tolist() == EXPECTED_UPDATES + [18, 21, 24]
    assert data["epochs"].tolist()[-3:] == [2, 2, 2]


def test_mixed_float16_loss_scale_optimizer(tmp_path):
    x, y = fashion(4 * BATCH)
    try:
        keras.mixed_precision.set_dtype_policy("mixed_float16")
        model = compile_clars(small_model())
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    logger = LayerStatisticsLogger(interval=2, json_path=str(tmp_path / "s.json"))
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[logger])
    data = load_layer_statistics(tmp_path / "s.json")
    updates = int(model.optimizer.iterations.numpy())
    # 4 batches, k = 1, and no step skipped: the initial loss scale does not
    # overflow this model's float16 gradients.
    inner = model.optimizer.inner_optimizer
    assert int(inner.non_finite_updates.numpy()) == 0
    assert updates == int(inner.iterations.numpy()) == 4
    assert data["updates"].tolist() == [1, 2, 4]  # first, every 2nd, last
    assert all(np.all(np.isfinite(v)) for v in data["values"].values())


def test_non_finite_update_monitor_warns_and_stops(tmp_path):
    x, y = fashion(4 * BATCH)
    x[BATCH + 3, 5, 5, 0] = np.nan  # the 2nd batch's gradient is NaN
    model = compile_clars(small_model())
    monitor = NonFiniteUpdateMonitor(interval=1, stop_training=True)
    with pytest.warns(RuntimeWarning, match="1 update\\(s\\) skipped"):
        model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0,
                  callbacks=[monitor])
    optimizer = model.optimizer
    assert int(optimizer.non_finite_updates.numpy()) == 1
    assert int(optimizer.iterations.numpy()) == 2  # stopped after the 2nd batch
    # The trainable weights did not move; BatchNorm's moving statistics,
    # which no optimizer updates, did take the NaN.
    assert all(np.all(np.isfinite(w)) for w in model.trainable_variables)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="interval=0"):
        LayerStatisticsLogger(interval=0)
    with pytest.raises(ValueError, match="interval=2.5"):
        NonFiniteUpdateMonitor(interval=2.5)
    model = small_model()
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="SGD"):
        model.fit(np.zeros((2, 28, 28, 1)), np.zeros((2, 10)), verbose=0,
                  callbacks=[LayerStatisticsLogger()])


JAX_RUN = r"""
import json, os, sys, warnings
import numpy as np
import keras
from test_callbacks import compile_clars, fashion, small_model
from keras_clars.callbacks import LayerStatisticsLogger, NonFiniteUpdateMonitor
x, y = fashion(8 * 32)
x[3 * 32, 0, 0, 0] = np.inf
model = compile_clars(small_model(), gradient_accumulation_steps=2)
out = sys.argv[2]
logger = LayerStatisticsLogger(interval=2, log_dir=os.path.join(out, "tb"),
                               json_path=os.path.join(out, "stats.json"))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0,
              callbacks=[logger, NonFiniteUpdateMonitor(interval=1)])
print("RESULT " + json.dumps({
    "backend": keras.backend.backend(),
    "statistics": model.optimizer.layer_statistics(),
    "updates": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
    "warnings": [str(w.message) for w in caught if w.category is RuntimeWarning],
}))
"""


@pytest.mark.slow
def test_jax_backend(tmp_path):
    pytest.importorskip("jax")
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
               TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(
        [sys.executable, "-c", JAX_RUN, os.path.abspath(__file__), str(tmp_path)],
        capture_output=True, text=True, timeout=240, env=env,
    )
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads(lines[0][len("RESULT "):])
    assert result["backend"] == "jax" and result["updates"] == 4
    # The 4th micro-batch held inf: update 2 was skipped and reported.
    assert len(result["warnings"]) == 1 and "1 update(s) skipped" in result["warnings"][0]
    data = load_layer_statistics(tmp_path / "stats.json")
    assert data["updates"].tolist() == [1, 2, 4]
    last = result["statistics"]
    for stat in STATISTICS:
        np.testing.assert_array_equal(
            data["values"][stat][-1].astype("float32"),
            np.float32([last[p][stat] for p in data["layers"]]),
        )
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb"))
