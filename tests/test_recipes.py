"""recipes.train, its input pipelines and the main job recipes.compare."""

import csv
import dataclasses
import glob
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from keras_clars import schedules
from recipes import fashion_mnist as datasets
from recipes import callbacks, compare, data, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The trainer as a module; the conftest puts ROOT on the subprocesses' path.
TRAIN = ["-m", "recipes.train"]
HAVE_FASHION = os.path.exists(
    os.path.join(datasets.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")
)
needs_fashion = pytest.mark.skipif(not HAVE_FASHION, reason="dataset-fashion-mnist missing")
# Tiny, fast settings shared by the end-to-end runs: ResNet-8 of width 2
# (tracing its update costs a third of ResNet-20's).
TINY = ["--depth=8", "--width=2", "--eval_steps=1", "--verbose=0"]


def _train(args, timeout=300, **kwargs):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, *TRAIN, *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT, **kwargs)


def _read(path):
    with open(path) as f:
        return json.load(f)


def _csv_epochs(path):
    with open(path) as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


# ------------------------------------------------------------------ data


@needs_fashion
def test_fashion_mnist_matches_known_facts():
    for split, count in (("train", 60000), ("test", 10000)):
        images, labels = datasets.load_fashion_mnist(split)
        assert images.shape == (count, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (count,) and labels.dtype == np.uint8
        np.testing.assert_array_equal(np.bincount(labels), [count // 10] * 10)
        assert images.max() == 255 and images.min() == 0


def test_pad_crop_flip_moves_pixels_without_losing_them():
    images = np.zeros((64, 28, 28, 1), np.float32)
    images[:, 12, 13, 0] = 1.0  # far enough from the border to survive a shift
    out = data.pad_crop_flip(tf.constant(images)).numpy()
    assert out.shape == images.shape
    np.testing.assert_allclose(out.sum(axis=(1, 2, 3)), 1.0)
    rows, cols = np.nonzero(out[..., 0].max(axis=0))
    assert len(set(rows)) > 1 and len(set(cols)) > 1  # crops differ by image
    assert set(rows) <= set(range(12 - 4, 12 + 5))  # shifted by at most 4


def test_validation_split_is_fixed_disjoint_and_seed_independent():
    train_idx, held = data.validation_indices(60000, 10848)
    assert len(train_idx) == 49152 and len(held) == 10848
    assert len(np.union1d(train_idx, held)) == 60000  # a partition
    again, held_again = data.validation_indices(60000, 10848)
    np.testing.assert_array_equal(held, held_again)  # no run seed involved
    keras.utils.set_random_seed(7)
    np.testing.assert_array_equal(data.validation_indices(60000, 10848)[1], held)
    with pytest.raises(ValueError, match="--validation_examples must be in"):
        data.validation_indices(100, 100)


def test_small_images_are_average_pooled():
    images = tf.reshape(tf.range(16, dtype=tf.float32), (1, 4, 4, 1))
    pooled = data.resize_or_pool(images, 2, 4).numpy()[0, ..., 0]
    np.testing.assert_allclose(pooled, [[2.5, 4.5], [10.5, 12.5]])
    assert data.resize_or_pool(images, 4, 4) is images
    assert data.resize_or_pool(images, 6, 4).shape == (1, 6, 6, 1)  # resized


def test_imagenet_crops_have_the_model_size():
    image = tf.random.uniform((50, 70, 3), maxval=255)
    assert data.random_resized_crop(image, 32).shape == (32, 32, 3)
    center = data.center_crop(image, 32)
    assert center.shape == (32, 32, 3)


@needs_fashion
def test_fashion_pipeline_batches_standardized_one_hot():
    source = data.load("fashion_mnist", "eval")
    images, labels = next(iter(data.pipeline("fashion_mnist", source, 500, 28, False)))
    assert images.shape == (500, 28, 28, 1) and labels.shape == (500, 10)
    np.testing.assert_array_equal(tf.reduce_sum(labels, 1), 1.0)
    assert abs(float(tf.reduce_mean(images))) < 0.2
    assert 0.7 < float(tf.math.reduce_std(images)) < 1.3
    resized, _ = next(iter(data.pipeline("fashion_mnist", source, 8, 32, True)))
    assert resized.shape == (8, 32, 32, 1)


# ------------------------------------------------------------- the layout


def test_batch_layout():
    assert train.batch_layout(4096, 256, 1) == (256, 16, 16)
    assert train.batch_layout(4096, 0, 2) == (2048, 1, 2)
    assert train.batch_layout(512, 64, 2) == (64, 4, 8)
    with pytest.raises(ValueError, match="--batch_size=1000 is not divisible by "
                       "--micro_batch_size=300 times 1 replicas"):
        train.batch_layout(1000, 300, 1)
    with pytest.raises(ValueError, match="--batch_size=100 .* 3 replicas"):
        train.batch_layout(100, 0, 3)


def test_sgd_is_heavy_ball_momentum_with_coupled_decay():
    """MomentumSGD against NumPy: v <- m v + lr (g + beta w); w <- w - v,
    with no decay on rank-1 variables, and Keras SGD's trajectory without decay."""
    rng = np.random.default_rng(0)
    kernel0 = rng.normal(size=(3, 2)).astype(np.float32)
    bias0 = rng.normal(size=(2,)).astype(np.float32)
    grads = [[rng.normal(size=(3, 2)).astype(np.float32),
              rng.normal(size=(2,)).astype(np.float32)] for _ in range(3)]
    lr, m, beta = 0.1, 0.9, 0.01
    config = train.Config(optimizer="sgd", momentum=m, weight_decay=beta)
    optimizer = train.make_optimizer(config, lr)
    variables = [keras.Variable(kernel0), keras.Variable(bias0)]
    for g in grads:
        optimizer.apply([keras.ops.convert_to_tensor(x) for x in g], variables)
    w = [kernel0.astype(np.float64), bias0.astype(np.float64)]
    v = [np.zeros_like(x) for x in w]
    for g in grads:
        for i, decay in enumerate((beta, 0.0)):
            v[i] = m * v[i] + lr * (g[i] + decay * w[i])
            w[i] = w[i] - v[i]
    for variable, expected in zip(variables, w):
        np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-5, atol=1e-6)

    keras_sgd = keras.optimizers.SGD(lr, momentum=m)
    ours = train.make_optimizer(train.Config(optimizer="sgd", momentum=m), lr)
    pairs = [[keras.Variable(kernel0), keras.Variable(bias0)] for _ in range(2)]
    for g in grads:
        for opt, vs in zip((keras_sgd, ours), pairs):
            opt.apply([keras.ops.convert_to_tensor(x) for x in g], vs)
    for a, b in zip(*pairs):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_sgd_schedule_counts_updates_not_micro_steps():
    schedule = schedules.WarmupDecay(1.0, total_steps=10, warmup_steps=4)
    optimizer = train.make_optimizer(train.Config(optimizer="sgd"), schedule, 4)
    assert optimizer.gradient_accumulation_steps == 4
    optimizer.build([keras.Variable(np.zeros(3, np.float32))])
    for micro_step in (0, 3, 4, 7, 13):
        # `_iterations` counts micro-steps; the schedule sees updates.
        optimizer._iterations.assign(micro_step)
        np.testing.assert_allclose(
            float(optimizer.learning_rate), float(schedule(micro_step // 4)), rtol=1e-6
        )


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "recipes", "configs", "*.cfg"))))
def test_named_configs_parse_and_validate(path):
    config = train.config_from_args([f"--flagfile={path}"])
    train.validate(config)
    name = os.path.basename(path)
    assert config.optimizer == name[:-4].rsplit("_", 1)[1]
    # CLARS never warms up; the baselines do.
    assert (config.warmup_epochs == 0) == (config.optimizer == "clars")


# --------------------------------------------------------------- bad flags


@pytest.mark.parametrize("change, message", [
    (dict(model="vgg16"), "Unknown model 'vgg16'"),
    (dict(dataset="mnist"), "--dataset must be one of .* received 'mnist'"),
    (dict(optimizer="adam"), "--optimizer must be one of .* received 'adam'"),
    (dict(base_lr=-0.1), r"--base_lr must be >= 0; received --base_lr=-0.1"),
    (dict(momentum=1.5), "momentum"),
    (dict(warmup_epochs=3, epochs=2), "--warmup_epochs must be < --epochs=2"),
    (dict(batch_size=1000, micro_batch_size=300), "--batch_size=1000 is not divisible"),
    (dict(optimizer="lars", per_example_norms=True),
     "--per_example_norms needs --optimizer=clars"),
    (dict(dataset="cifar10", validation_examples=100),
     "--validation_examples and --train_examples need --dataset=fashion_mnist"),
    (dict(depth=9), "--depth must be 6n \\+ 2 .* received --depth=9"),
    (dict(excluded_lr=-1.0), "--excluded_lr must be >= 0; received --excluded_lr=-1.0"),
    (dict(optimizer="sgd", excluded_lr=1.0), "--excluded_lr needs --optimizer=clars or lars"),
    (dict(model="resnet50", batch_norm=False), "--nobatch_norm needs --model=resnet20"),
    (dict(noise_scale=True, train_examples=1024, validation_examples=512),
     "--noise_scale needs S >= 2 gradient samples .* received S=1"),
])
def test_bad_flags_fail_fast(change, message):
    with pytest.raises(ValueError, match=message):
        train.run(train.Config(**change))


def test_missing_tfds_dataset_fails_with_instructions(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar10 version .* --download"):
        train.run(train.Config(dataset="cifar10", data_dir=str(tmp_path)))


@pytest.mark.parametrize("command", [TRAIN, [os.path.join("recipes", "train.py")]])
def test_command_line_reports_bad_flags(command):
    # As a module, and as the script path a newcomer types.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH="")
    result = subprocess.run([sys.executable, *command, "--model=vgg16"], capture_output=True,
                            text=True, timeout=120, env=env, cwd=ROOT)
    assert result.returncode != 0
    assert "recipes.train: error: Unknown model 'vgg16'" in result.stderr


def test_each_flag_is_declared_once_with_its_help_and_check():
    flag_values = flags.FlagValues()
    train.define_flags(flag_values)
    for field in dataclasses.fields(train.Config):
        flag = flag_values[field.name]
        assert flag.default == field.default and flag.help.endswith(field.metadata["help"])
        if field.metadata["choices"]:
            assert list(flag.parser.enum_values) == list(field.metadata["choices"])
    # A bound in the field is the check: every bounded flag refuses -1.
    bounded = [f.name for f in dataclasses.fields(train.Config) if f.metadata["low"] is not None]
    assert {"base_lr", "epochs", "checkpoint_steps", "excluded_lr"} <= set(bounded)
    for name in bounded:
        with pytest.raises(ValueError, match=f"--{name} must be >= "):
            train.validate(dataclasses.replace(train.Config(), **{name: -1}))


# --------------------------------------------------------------- end to end


@pytest.mark.parametrize("dataset, classes", [("imagenet2012", 1000), ("cifar10", 10)])
def test_train_runs_on_mock_tfds(dataset, classes, tmp_path):
    import tensorflow_datasets as tfds

    config = train.Config(
        model="resnet20", depth=8, width=2, dataset=dataset, data_dir=str(tmp_path / "tfds"),
        image_size=32, batch_size=8, micro_batch_size=4, steps_per_epoch=2,
        eval_steps=1, epochs=1, model_dir=str(tmp_path / "run"), verbose=0,
        noise_scale=True, optimizer="sgd" if dataset == "cifar10" else "clars",
    )
    with tfds.testing.mock_data(num_examples=12):
        result = train.run(config)
    summary = result["summary"]
    assert (summary["accumulation_k"], summary["samples_S"]) == (2, 2)
    assert summary["final_updates"] == 2
    assert result["model"].output_shape == (None, classes)
    (epoch,) = result["epochs"]
    assert np.isfinite(epoch["loss"]) and 0 <= epoch["val_accuracy"] <= 1
    assert _csv_epochs(tmp_path / "run" / "metrics.csv") == [0]
    assert [e["epoch"] for e in _read(tmp_path / "run" / "metrics.json")] == [0]
    assert glob.glob(str(tmp_path / "run" / "logs" / "train" / "events.*"))
    # --noise_scale (SGD too): B_simple in the JSON records and TensorBoard.
    statistics = _read(tmp_path / "run" / "layer_statistics.json")
    assert [r["update"] for r in statistics["records"]] == [1, 2]
    assert all("b_simple" in r for r in statistics["records"])
    assert statistics["records"][0]["values"]["sample_size"][0] == 4
    assert glob.glob(str(tmp_path / "run" / "logs" / "layers" / "events.*"))


@pytest.mark.slow
@needs_fashion
def test_fashion_mnist_mirrored_on_two_logical_cpus(tmp_path):
    result = _train([*TINY, "--strategy=mirrored", "--logical_cpus=2",
                     "--batch_size=256", "--micro_batch_size=64", "--steps_per_epoch=3",
                     "--epochs=1", f"--model_dir={tmp_path}", "--optimizer=lars",
                     "--noise_scale"])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = _read(tmp_path / "summary.json")
    assert summary["replicas"] == 2
    assert (summary["slice_size_b"], summary["accumulation_k"], summary["samples_S"]) == (64, 2, 4)
    assert summary["final_updates"] == 3
    assert np.isfinite(summary["final"]["loss"])
    assert "S=4 gradient samples per update" in result.stdout
    # LARS's noise scale under the strategy: S = 4 samples of b = 64.
    (first, *_) = _read(tmp_path / "layer_statistics.json")["records"]
    assert set(first["values"]["samples"]) == {4.0}
    assert set(first["values"]["sample_size"]) == {64.0}
    assert "b_simple" in first


@needs_fashion
def test_validation_run_with_per_example_norms_writes_its_record(tmp_path, capsys):
    path = tmp_path / "record.json"
    config = train.Config(
        depth=8, width=2, image_size=14, augment=False, validation_examples=300,
        train_examples=256, batch_size=128, micro_batch_size=64, epochs=2,
        per_example_norms=True, trust_coefficient=0.01, eval_steps=2, verbose=0,
        record_path=str(path),
    )
    # checkpoint_dir: saves to resume from, outside the record's config.
    result = train.run(config, checkpoint_dir=str(tmp_path / "partial"))
    assert "per-example samples: b=1, S=B=128" in capsys.readouterr().out
    record = _read(path)
    assert record == json.loads(json.dumps(result["record"]))
    assert record["config"]["model_dir"] == "" and record["summary"]["resumes"] == []
    assert _read(tmp_path / "partial" / "checkpoints" / "step-8.json")["micro_steps"] == 8
    summary = record["summary"]
    assert (summary["slice_size_b"], summary["samples_S"], summary["accumulation_k"]) == (1, 128, 2)
    assert summary["train_examples"] == 256 and summary["eval_examples"] == 300
    assert summary["eval_split"] == "validation" and summary["image_size"] == 14
    assert summary["final_updates"] == 4
    assert record["config"]["per_example_norms"] is True
    assert record["versions"]["keras"] == keras.__version__
    assert record["git_commit"] is None or len(record["git_commit"]) == 40
    assert [e["epoch"] for e in record["epochs"]] == [0, 1]
    assert record["final_validation_accuracy"] == record["epochs"][-1]["val_accuracy"]
    assert 0 <= record["test_accuracy"] <= 1 and record["wall_seconds"] > 0
    # Per-example samples disagree more than micro-batches: coherence < 1.
    assert 0 < record["first_update_coherence"] < 1
    assert set(summary["first_update_coherence"]["layers"]) == {
        v.path for v in result["model"].trainable_variables if len(v.shape) >= 2}


@pytest.mark.slow
@needs_fashion
def test_compare_writes_table_plot_and_json(tmp_path):
    # Two methods and a tiny setting keep it short; the main job runs three.
    results = compare.compare(
        ["clars", "lars_nowarmup"], chosen_path=str(tmp_path / "none.json"),
        overrides=["width=2", "batch_size=512", "steps_per_epoch=1", "epochs=2",
                   "eval_steps=1", "warmup_epochs=0", "base_lr=3"],
        output_dir=str(tmp_path),
    )
    assert [r["method"] for r in results] == ["clars", "lars_nowarmup"]
    for r in results:
        record = r["record"]
        assert len(record["epochs"]) == 2
        assert record["summary"]["samples_S"] == 2  # 512 / b=256
        assert record["summary"]["final_updates"] == 2
        assert record["summary"]["eval_split"] == "validation"
        assert r["lr_source"].startswith("--override")
        assert record["config"]["base_lr"] == 3.0
    text = compare.table(results)
    assert text.splitlines()[2].startswith("clars")
    assert "--override" in text and "no finals yet" in text
    results[0]["study_finals"] = {"seeds": [1, 2, 3], "best_val": [0.9, 0.0123]}
    assert "90.00 ± 1.23" in compare.table(results).splitlines()[2]
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    assert [r["method"] for r in _read(tmp_path / "results.json")] == ["clars", "lars_nowarmup"]


def test_compare_reads_the_study_choice(tmp_path):
    path = tmp_path / "chosen.json"
    curve = compare.METHODS["lars"]
    finals = {"seeds": [1, 2, 3], "best_val": [0.9, 0.01]}
    path.write_text(json.dumps({curve: {"peak_lr": 2.0, "state": "tuned", "finals": finals}}))
    lr, source, study_finals = compare.learning_rate(curve, str(path))
    assert lr == 2.0 and "chosen on validation" in source and study_finals == finals
    path.write_text(json.dumps({curve: {"peak_lr": 2.0, "state": "incomplete"}}))
    with pytest.raises(ValueError, match=f"not tuned {curve} .*incomplete.*base_lr"):
        compare.learning_rate(curve, str(path))
    with pytest.raises(ValueError, match="absent"):
        compare.learning_rate(curve, str(tmp_path / "none.json"))
    with pytest.raises(ValueError, match="Unknown methods"):
        compare.compare(["adam"])


@pytest.mark.parametrize("path", sorted(glob.glob(
    os.path.join(ROOT, "recipes", "configs", "fashion_mnist_*.cfg"))))
def test_fashion_configs_are_the_study_setting(path):
    from recipes import study

    config = train.config_from_args([f"--flagfile={path}"])
    method = os.path.basename(path)[:-4].rsplit("_", 1)[1]
    curve = study.Plan().curve(compare.METHODS[method])
    expected = study.Plan().config(curve, config.base_lr, config.seed)
    assert config == dataclasses.replace(expected, verbose=config.verbose)
    # The rate is the study's choice on validation.
    with open(os.path.join(ROOT, compare.CHOSEN)) as f:
        chosen = json.load(f).get(curve.name, {})
    assert chosen.get("state") == "tuned"  # the main job refuses an untuned method
    assert config.base_lr == chosen["peak_lr"]


@pytest.mark.slow
def test_two_workers_train_with_multi_worker_strategy():
    # A real MultiWorkerMirroredStrategy cluster of two train.py processes.
    import distributed_worker as worker

    hosts = [f"127.0.0.1:{port}" for port in worker.free_ports(2)]
    command = [sys.executable, *TRAIN, "--strategy=multi_worker", "--depth=8", "--width=2",
               "--batch_size=256", "--micro_batch_size=64", "--steps_per_epoch=2",
               "--epochs=1", "--eval_steps=1", "--verbose=2"]
    envs = [
        dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=json.dumps(
            {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}}
        ))
        for i in range(2)
    ]
    results = worker.launch([command, command], 240, envs)
    finals = []
    for index, (code, output) in enumerate(results):
        assert code == 0, f"worker {index} failed ({code}):\n{output[-3000:]}"
        assert "2 replicas x b=64" in output, output[-3000:]
        finals.append([line for line in output.splitlines() if "val_loss" in line][-1])
    # Both workers report the same all-reduced metrics after 2 updates.
    loss = [line.split(" - loss: ")[1].split(" ")[0] for line in finals]
    assert loss[0] == loss[1]
    assert all("updates: 2.0000" in line for line in finals)


def test_a_save_resumes_only_its_own_run(tmp_path):
    # The save records the flags the result depends on; another run's
    # flags are refused before anything is loaded.
    saved = {"base_lr": 2.0, "seed": 3}
    with open(tmp_path / "step-12.json", "w") as f:
        json.dump({"weights": "step-12.weights.h5", "micro_steps": 12, "run": saved}, f)
    checkpointer = callbacks.Checkpointer(str(tmp_path), 0, 16, dict(saved, base_lr=1.0))
    with pytest.raises(ValueError, match="holds a save of another run: --base_lr=2.0 "
                       "there, --base_lr=1.0 now"):
        checkpointer.restore(model=None)
    assert checkpointer.done == 0
    # What the recipe checks: every flag but where things go and what is logged.
    assert set(train.NOT_STATE) < {f.name for f in dataclasses.fields(train.Config)}
    assert {"base_lr", "seed", "epochs", "batch_size", "dtype"}.isdisjoint(train.NOT_STATE)
