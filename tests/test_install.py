"""What a user gets from `pip install ".[cpu,recipes]"`: a fresh venv runs the trainer.

The suite's own venv has every extra installed (test, jax, kerascv, ...), so
it hides a dependency that the `recipes` extra forgets to declare (it hid
tensorboard, which TensorFlow 2.21 no longer installs and which
keras.callbacks.TensorBoard needs). This test builds a new venv holding
exactly what `pip install ".[cpu,recipes]"` would install, and trains one
short epoch there, with a --model_dir, so the TensorBoard, CSV and JSON
loggers and the checkpointer all run.

The project itself is built and installed by pip (`--no-deps`), from its
wheel. Its dependencies are not unpacked again (that took 70-120 s on a
2-core machine): the closure of the wheel's Requires-Dist with the `cpu` and
`recipes` extras is resolved against the versions installed in the suite's
venv (each must satisfy its specifier, as pip's resolver would demand), and
only those distributions are linked into the new venv's site-packages, each
with its .dist-info. A dependency that no declared requirement reaches is
missing there exactly as after a real install; `pip check` then confirms
that every linked distribution's own requirements are met. (Checked once on
the 2-core dev machine: the closure is the 66 distributions that `pip install
--dry-run --report` resolves for `.[cpu,recipes]`; it takes 0.2 s, the dry
run 27 s.) Dropping tensorboard from the `recipes` extra fails the test with
TensorFlow's TBNotInstalledError, as a real install did.

`keras_clars` comes from the installed wheel, not the source tree: the
trainer runs outside the repository, with only `recipes/` on the path.
"""

import collections
import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys
import sysconfig

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
EXTRAS = ("cpu", "recipes")


def _run(args, timeout, **kwargs):
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, (
        f"{' '.join(args)} exited with {result.returncode}\n"
        f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
    )
    return result


def _suite_distributions():
    """The distributions installed in the suite's venv, by canonical name."""
    paths = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
    installed = {}
    for dist in importlib.metadata.distributions(path=paths):
        installed.setdefault(canonicalize_name(dist.metadata["Name"]), dist)
    return installed


def _closure(project, extras, installed):
    """The names of the distributions that `pip install project[extras]` adds.

    Follows Requires-Dist (with their markers and extras) from `project`
    through the `installed` distributions, each of which must satisfy the
    specifier that reaches it.
    """
    followed = {}  # name: the extras followed
    todo = [(project, set(extras))]
    while todo:
        dist, dist_extras = todo.pop()
        for line in dist.requires or ():
            requirement = Requirement(line)
            if requirement.marker and not any(
                    requirement.marker.evaluate({"extra": extra}) for extra in {"", *dist_extras}):
                continue
            name = canonicalize_name(requirement.name)
            assert name in installed, (
                f"{dist.metadata['Name']} requires {requirement}, not installed in {sys.prefix}")
            found = installed[name]
            assert requirement.specifier.contains(found.version, prereleases=True), (
                f"{dist.metadata['Name']} requires {requirement}; {sys.prefix} has {found.version}")
            if name in followed and set(requirement.extras) <= followed[name]:
                continue
            followed[name] = followed.get(name, set()) | set(requirement.extras)
            todo.append((found, followed[name]))
    return set(followed)


def _link(site, names, installed):
    """Symlinks the named distributions' files (their RECORDs) into `site`: a
    top-level entry whole where no other installed distribution has files
    in it (a namespace package's is shared), else file by file."""
    owners = collections.defaultdict(set)
    for name, dist in installed.items():
        for file in dist.files or ():
            owners[file.parts[0]].add(name)
    for name in sorted(names):
        dist = installed[name]
        assert dist.files is not None, f"{name} has no RECORD in {sys.prefix}"
        for file in dist.files:
            top = file.parts[0]
            if top == "..":  # scripts and data installed outside site-packages
                continue
            entry = pathlib.PurePath(top) if owners[top] == {name} else file
            source, target = pathlib.Path(dist.locate_file(entry)), site / entry
            if target.is_symlink() or target.exists() or not source.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(FASHION_MNIST), reason="dataset-fashion-mnist missing")
def test_fresh_venv_with_cpu_and_recipes_extras_trains_one_epoch(tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=120)
    python = str(venv / "bin" / "python")
    site = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    assert site.is_dir(), site
    pip = [sys.executable, "-m", "pip", "--python", python]
    # pip builds the wheel as `make setup` does (index, caches, find-links).
    _run([*pip, "install", "-q", "--no-deps", ROOT], timeout=600)
    project, = importlib.metadata.distributions(path=[str(site)])
    installed = _suite_distributions()
    names = _closure(project, EXTRAS, installed)
    assert {"keras", "tensorflow-cpu", "absl-py", "tensorflow-datasets"} <= names, names
    _link(site, names, installed)
    # Every linked distribution's own requirements are there too.
    _run([*pip, "check"], timeout=300)

    # A user's checkout of recipes/, without the library's sources beside it.
    source = tmp_path / "src"
    source.mkdir()
    os.symlink(os.path.join(ROOT, "recipes"), source / "recipes")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHONPATH=str(source), TF_CPP_MIN_LOG_LEVEL="2")
    # Where `import keras_clars` loads it from (without importing TensorFlow
    # twice: the trainer below imports it).
    found = _run([python, "-c", "import importlib.util; "
                  "print(importlib.util.find_spec('keras_clars').origin)"],
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
