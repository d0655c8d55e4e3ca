"""MultiWorkerMirroredStrategy for real: two worker processes on 127.0.0.1."""

import json
import os
import sys

import numpy as np
import pytest

import distributed_worker as worker

TIMEOUT = 150  # seconds for the whole cluster; the workers are killed after it


def run_cluster(tmp_path, workers=2):
    """Starts `workers` processes with their own TF_CONFIG; returns their arrays."""
    hosts = [f"127.0.0.1:{port}" for port in worker.free_ports(workers)]
    commands, envs, outs = [], [], []
    for index in range(workers):
        outs.append(tmp_path / f"worker{index}.npz")
        commands.append(
            [sys.executable, worker.__file__, "multi_worker", str(outs[-1])]
        )
        tf_config = {
            "cluster": {"worker": hosts},
            "task": {"type": "worker", "index": index},
        }
        envs.append(
            dict(os.environ, TF_CONFIG=json.dumps(tf_config), TF_CPP_MIN_LOG_LEVEL="2")
        )
    results = worker.launch(commands, TIMEOUT, envs)
    for index, (code, output) in enumerate(results):
        assert code == 0, f"worker {index} failed ({code}):\n{output[-4000:]}"
    return [dict(np.load(out)) for out in outs]


@pytest.mark.slow
def test_two_workers_match_each_other_and_the_reference(tmp_path):
    chief, other = run_cluster(tmp_path)
    assert int(chief["replicas"]) == 2
    for key in ("CLARS_k1", "CLARS_k2"):
        layers = sorted(k for k in chief if k.startswith(key + "/fit/"))
        assert layers and int(chief[key + "/micro_steps"]) == 6
        assert int(other[key + "/micro_steps"]) == 6
        for name in layers:
            # The all-reduced result is the same on every worker: no drift.
            np.testing.assert_array_equal(chief[name], other[name], err_msg=name)
            np.testing.assert_allclose(
                chief[name],
                chief[name.replace("/fit/", "/ref/")],
                rtol=1e-5,
                atol=2e-6,
                err_msg=name,
            )
        # The two runs differ (k changes the samples): the check has teeth.
    assert not np.allclose(chief["CLARS_k1/fit/0"], chief["CLARS_k2/fit/0"])
