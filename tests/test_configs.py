"""Every shipped config in recipes/configs/ trains under MirroredStrategy.

Each flagfile runs for one update on 2 logical CPUs: ImageNet configs on
`tfds.testing.mock_data` at 32 px, Fashion-MNIST configs on the real data
(Debian's package). The config's dataset pipeline, optimizer, schedule and
hyperparameters are kept; only the size of the run shrinks:

- the model is ResNet-8 (--model=resnet20 --depth=8) of width 2. Building, tracing and stepping
  ResNet-50, DenseNet-121 and MobileNet under MirroredStrategy takes about a
  minute of CPU each, twelve minutes for the nine ImageNet configs; every
  model already takes a step with every optimizer in tests/test_models.py.
  KERAS_CLARS_CONFIG_MODELS=1 keeps the configs' own models;
- one epoch of one update, and the warmup scaled with the epochs (5 of 90
  epochs stays 1/18 of the run);
- slices of b=2 examples where the config fixes --micro_batch_size, and
  B / replicas (k=1) where it leaves it unset, so a config that needs
  accumulation on 2 replicas (k > 1) still accumulates (k=2) and one that
  does not, does not.

The configs run in TWO subprocesses at once, six each, each with ONE
MirroredStrategy, through `recipes.train.run(config, strategy=...)`:
TensorFlow's collectives abort a process that makes a second
MirroredStrategy with differently sized all-reduces, and two TensorFlow
start-ups are cheaper than twelve. A worker's tracing is mostly one
thread's work: two of them keep a 2-core machine busy.
"""

import glob
import json
import os
import sys

import numpy as np
import pytest

import distributed_worker as worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "recipes", "configs", "*.cfg")))
REPLICAS = 2
FASHION_MNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
OWN_MODELS = os.environ.get("KERAS_CLARS_CONFIG_MODELS") == "1"
# Configs known not to run on 2 replicas, each with its reason. strict: once
# fixed, the test fails until the entry is removed.
KNOWN_FAILURES = {}

WORKERS = 2
# Runs in each subprocess: argv[1] is a JSON list of [name, args], argv[2]
# the JSON file of results (name -> summary, or name -> {"error": ...}).
WORKER = r"""
import json, sys, time, traceback
import keras
import tensorflow_datasets as tfds
from recipes import strategies, train

strategies.use_logical_cpus(%(replicas)d)
strategy = strategies.make_strategy("mirrored")
results = {}
for name, args in json.loads(sys.argv[1]):
    keras.backend.clear_session()
    began = time.time()
    try:
        config = train.config_from_args(args)
        with tfds.testing.mock_data(num_examples=8):
            result = train.run(config, strategy=strategy)
        summary = result["summary"]
        results[name] = {
            "replicas": summary["replicas"],
            "accumulation_k": summary["accumulation_k"],
            "slice_size_b": summary["slice_size_b"],
            "final_updates": summary["final_updates"],
            "loss": summary["final"].get("loss"),
            "optimizer": type(result["model"].optimizer).__name__,
            "seconds": time.time() - began,
        }
    except Exception as error:
        results[name] = {"error": "".join(traceback.format_exception(error))[-3000:]}
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)
""" % {"replicas": REPLICAS}


def _name(path):
    return os.path.basename(path)[:-4]


def _plan(path, tmp_path):
    """The flags of one tiny run of `path`, and the layout it must have."""
    from recipes import train

    config = train.config_from_args([f"--flagfile={path}"])
    # The config's own layout on 2 replicas: k micro-steps per update. This
    # raises if B does not split over 2 replicas, failing the test.
    _, k, _ = train.batch_layout(config.batch_size, config.micro_batch_size, REPLICAS)
    b = 2
    k = min(k, 2)
    args = [
        f"--flagfile={path}",
        "--epochs=1",
        f"--warmup_epochs={config.warmup_epochs / config.epochs!r}",
        "--steps_per_epoch=1",
        "--eval_steps=1",
        f"--batch_size={b * REPLICAS * k}",
        "--verbose=0",
        "--model_dir=",
    ]
    if config.micro_batch_size:
        args.append(f"--micro_batch_size={b}")
    if not OWN_MODELS:
        args += ["--model=resnet20", "--depth=8", "--width=2"]
    if config.dataset != "fashion_mnist":
        args += ["--image_size=32", f"--data_dir={tmp_path / 'tfds'}"]
    expected = dict(replicas=REPLICAS, accumulation_k=k, slice_size_b=b, final_updates=1,
                    optimizer={"clars": "CLARS", "lars": "LARS", "sgd": "MomentumSGD"}[config.optimizer])
    return args, expected


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("configs")
    plans = {_name(p): _plan(p, tmp_path) for p in CONFIGS}
    job = [[name, args] for name, (args, _) in plans.items()]
    # Every other config: each worker gets each model's and dataset's configs.
    jobs = [job[i::WORKERS] for i in range(WORKERS)]
    outs = [tmp_path / f"results{i}.json" for i in range(WORKERS)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    timeout = 3600 if OWN_MODELS else 900
    finished = worker.launch(
        [[sys.executable, "-c", WORKER, json.dumps(part), str(out)]
         for part, out in zip(jobs, outs)], timeout, [env] * WORKERS)
    found = {}
    for part, out, (code, output) in zip(jobs, outs, finished):
        done = {}
        if out.exists():
            with open(out) as f:
                done = json.load(f)
        if code is None:
            pytest.fail(f"a config worker ran past {timeout} s after {sorted(done)}")
        if code and len(done) < len(part):
            pytest.fail(f"a config worker exited with {code} after "
                        f"{sorted(done)}:\n{output[-4000:]}")
        found.update(done)
    return plans, found


# The shipped set: each model and dataset with CLARS, LARS and SGD.
SHIPPED = {f"{setting}_{optimizer}"
           for setting in ("densenet121_imagenet_b16k", "fashion_mnist_b4096",
                           "mobilenet_imagenet_b16k", "resnet50_imagenet_b16k")
           for optimizer in ("clars", "lars", "sgd")}


def test_the_configs_are_the_shipped_set():
    assert {_name(p) for p in CONFIGS} == SHIPPED


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(FASHION_MNIST), reason="dataset-fashion-mnist missing")
@pytest.mark.parametrize("path", [
    pytest.param(p, marks=pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[_name(p)]))
    if _name(p) in KNOWN_FAILURES else p
    for p in CONFIGS
], ids=_name)
def test_config_trains_one_update_on_two_replicas(path, results):
    plans, found = results
    name = _name(path)
    _, expected = plans[name]
    result = found[name]
    assert "error" not in result, f"{name}:\n{result['error']}"
    got = {key: result[key] for key in expected}
    assert got == expected
    assert result["loss"] is not None and np.isfinite(result["loss"])
