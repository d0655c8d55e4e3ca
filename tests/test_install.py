"""What a user gets from `pip install ".[cpu,recipes]"`: a fresh venv runs the trainer.

The suite's own venv has every extra installed (test, jax, kerascv, ...), so
it hides a dependency that the `recipes` extra forgets to declare (it hid
tensorboard, which TensorFlow 2.21 no longer installs and which
keras.callbacks.TensorBoard needs). This test installs exactly the extras
the README names into a new venv and trains one short epoch there, with a
--model_dir, so the TensorBoard, CSV and JSON loggers and the checkpointer
all run.

`keras_clars` comes from the installed wheel, not the source tree: the
trainer runs outside the repository, with only `recipes/` on the path.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


def _run(args, timeout, **kwargs):
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, (
        f"{' '.join(args)} exited with {result.returncode}\n"
        f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
    )
    return result


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(FASHION_MNIST), reason="dataset-fashion-mnist missing")
def test_fresh_venv_with_cpu_and_recipes_extras_trains_one_epoch(tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    python = str(venv / "bin" / "python")
    # pip finds its packages as `make setup` does (index, caches, find-links).
    _run([python, "-m", "pip", "install", "-q", f"{ROOT}[cpu,recipes]"], timeout=1200)

    # A user's checkout of recipes/, without the library's sources beside it.
    source = tmp_path / "src"
    source.mkdir()
    os.symlink(os.path.join(ROOT, "recipes"), source / "recipes")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHONPATH=str(source), TF_CPP_MIN_LOG_LEVEL="2")
    found = _run([python, "-c", "import keras_clars; print(keras_clars.__file__)"],
                 timeout=300, cwd=tmp_path, env=env)
    assert found.stdout.strip().startswith(str(venv)), found.stdout

    model_dir = tmp_path / "run"
    _run([python, "-m", "recipes.train", "--steps_per_epoch=1", "--epochs=1",
          "--eval_steps=1", "--width=2", "--batch_size=64", "--verbose=0",
          f"--model_dir={model_dir}"], timeout=600, cwd=tmp_path, env=env)

    with open(model_dir / "metrics.json") as f:
        epochs = json.load(f)
    assert [e["epoch"] for e in epochs] == [0]
    assert {"loss", "val_loss", "accuracy", "val_accuracy", "learning_rate"} <= set(epochs[0])
    assert (model_dir / "metrics.csv").exists()
    events = [name for _, _, names in os.walk(model_dir / "logs") for name in names
              if name.startswith("events.out.tfevents")]
    assert events, "no TensorBoard event file was written"
