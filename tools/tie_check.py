"""Are the tied and decoupled protocols one computation at equal rates?

    .venv/bin/python tools/tie_check.py > docs/results/tie_check.txt

At the excluded rate itself (`--excluded_lr` equal to `--base_lr`) the two
protocols give every variable the same rate, so they should train
bit-identically. This trains 1 epoch of the study's b = 1 and b = 256
settings at lr 4, tied and decoupled, in one process, and prints a sha256
of the weights and optimizer variables and the epoch's loss. Then it starts
the full 12-epoch tied b = 256 run at lr 4 in a fresh process, stops it
after its first epoch, and prints that epoch's loss, to set beside the
records' (docs/results.md, "What the records say").
"""

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.getcwd())

LR = 4.0
CURVES = ("B4096_clars_nowarmup_b1", "B4096_clars_nowarmup_b256")


def digest(model):
    import keras
    import numpy as np

    h = hashlib.sha256()
    for v in model.weights + model.optimizer.variables:
        h.update(np.ascontiguousarray(keras.ops.convert_to_numpy(v.value)).tobytes())
    return h.hexdigest()[:16]


def one_epoch():
    import keras
    from recipes import study, train

    plan = study.Plan()
    for name in CURVES:
        for protocol, excluded in (("tied", None), ("decoupled", LR)):
            keras.backend.clear_session()
            config = plan.config(plan.curve(name), LR, 0)
            config = train.Config(**{**config.__dict__, "epochs": 1, "eval_steps": 1,
                                     "excluded_lr": excluded})
            result = train.run(config)
            print(f"{name} lr {LR:g} {protocol:9s} 1 epoch: sha256 "
                  f"{digest(result['model'])}, loss {result['epochs'][0]['loss']!r}",
                  flush=True)


def first_epoch_of_the_full_run():
    from recipes import study, train

    plan = study.Plan()
    config = plan.config(plan.curve(CURVES[1]), LR, 0)
    with tempfile.TemporaryDirectory() as model_dir:
        config = train.Config(**{**config.__dict__, "model_dir": model_dir})
        code = (f"from recipes import train; train.run(train.Config(**{config.__dict__!r}))")
        process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        metrics = os.path.join(model_dir, "metrics.json")
        try:
            while not os.path.exists(metrics) and process.poll() is None:
                time.sleep(2)
            with open(metrics) as f:
                epoch = json.load(f)[0]
        finally:
            process.kill()
    print(f"{CURVES[1]} lr {LR:g} tied, 12-epoch schedule, fresh process: epoch 1 "
          f"loss {epoch['loss']!r}, validation {epoch['val_accuracy']!r}", flush=True)


if __name__ == "__main__":
    one_epoch()
    first_epoch_of_the_full_run()
