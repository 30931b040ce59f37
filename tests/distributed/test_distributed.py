"""DMLModel under MirroredStrategy (2 logical CPUs) and multi-worker.

Each configuration trains the same tiny model (4 steps, global batch 16,
memory of 24 slots, SGD with momentum) in a subprocess (logical devices
must be set before TensorFlow starts) and must end with the same weights
and the same memory as one device on the concatenated batch.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SCRIPT = os.path.join(os.path.dirname(__file__), "dist_train.py")
GLOBAL_BATCH, STEPS, MEMORY = 16, 4, 24


def launch(mode, out, env=None):
    return subprocess.Popen(
        [sys.executable, SCRIPT, mode, str(out)],
        env=dict(os.environ, **(env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc, timeout=600):
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        raise AssertionError(f"timed out:\n{output[-3000:]}") from None
    assert proc.returncode == 0, output[-3000:]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs single, mirrored and two multi-worker processes concurrently."""
    tmp = tmp_path_factory.mktemp("dist")
    ports = [free_port(), free_port()]
    workers = [f"127.0.0.1:{p}" for p in ports]
    procs = {
        "single": launch("single", tmp / "single.npz"),
        "mirrored": launch("mirrored", tmp / "mirrored.npz"),
    }
    for i in range(2):
        tf_config = {
            "cluster": {"worker": workers},
            "task": {"type": "worker", "index": i},
        }
        procs[f"worker{i}"] = launch(
            "worker",
            tmp / f"worker{i}.npz",
            env={"TF_CONFIG": json.dumps(tf_config)},
        )
    for proc in procs.values():
        finish(proc)
    return {name: dict(np.load(tmp / f"{name}.npz")) for name in procs}


def weight_keys(run):
    return sorted(k for k in run if k.startswith("w"))


def expected_memory_labels():
    y = np.arange(GLOBAL_BATCH * STEPS) // 2 % 8
    ring = [-1] * MEMORY
    for pos, label in enumerate(y):
        ring[pos % MEMORY] = label
    return np.array(ring)


def assert_same_training(run, single):
    assert not run["jit"]  # requested, turned off under the strategy
    assert weight_keys(run) == weight_keys(single)
    for key in weight_keys(single):
        np.testing.assert_allclose(run[key], single[key], atol=1e-5)
    np.testing.assert_allclose(run["loss"], single["loss"], rtol=1e-5)
    np.testing.assert_allclose(
        run["mem_embeddings"], single["mem_embeddings"], atol=1e-5
    )
    np.testing.assert_array_equal(run["mem_labels"], single["mem_labels"])
    np.testing.assert_array_equal(run["mem_ids"], single["mem_ids"])
    assert run["pointer"] == single["pointer"]


def test_single_device_reference_is_meaningful(runs):
    single = runs["single"]
    assert single["replicas"] == 1
    moved = max(
        np.abs(single[f"w{i}"] - single[f"init{i}"]).max()
        for i in range(len(weight_keys(single)))
    )
    assert moved > 1e-3  # training changed the weights
    assert single["pointer"] == (STEPS * GLOBAL_BATCH) % MEMORY
    assert single["filled"] == MEMORY
    np.testing.assert_array_equal(
        single["mem_labels"], expected_memory_labels()
    )
    np.testing.assert_array_equal(
        np.sort(single["mem_ids"]),
        np.arange(STEPS * GLOBAL_BATCH - MEMORY, STEPS * GLOBAL_BATCH),
    )


def test_mirrored_two_replicas_equal_single_device(runs):
    run = runs["mirrored"]
    assert run["replicas"] == 2
    assert_same_training(run, runs["single"])
    # Both replicas hold the same memory, filled in global batch order.
    for name in ("embeddings", "labels", "ids", "pointer"):
        copies = run[f"replica_{name}"]
        np.testing.assert_array_equal(copies[0], copies[1])
    np.testing.assert_array_equal(
        run["replica_labels"][1], expected_memory_labels()
    )


def test_multi_worker_two_processes_equal_one_process(runs):
    for name in ("worker0", "worker1"):
        run = runs[name]
        assert run["replicas"] == 2
        assert_same_training(run, runs["single"])
    for key in weight_keys(runs["worker0"]):
        np.testing.assert_array_equal(
            runs["worker0"][key], runs["worker1"][key]
        )
