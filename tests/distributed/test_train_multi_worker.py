"""``train.py`` with ``train.strategy=multi_worker``: two local workers.

Two worker processes on 127.0.0.1 (free ports, one ``TF_CONFIG`` each, no
GPU) run the smoke config for 2 epochs of 2 steps (16 x 16 images, global
batch P x K = 4 x 4) and are compared with one process (no strategy) on the
same global batches:

1. Phase 1: both workers run with a NaN injected at the first step of
   epoch 2, so both stop with exit status 3 after checkpointing epoch 1.
   Worker 1 is given its own ``train.run_dir`` and ``TMPDIR``: it must
   write nothing there and leave no temporary checkpoint directory.
2. Phase 2: the same command on both workers (the chief's run folder, no
   NaN) resumes at epoch 1; every worker restores the chief's checkpoint.
   The chief's run folder then holds every artefact, and its final
   checkpoint (all weights and optimizer slots) and training losses equal
   those of the single process.

Exact equality holds because every worker builds the same global batches,
``tf.distribute`` gives each worker its half (auto-shard ``DATA``) and
``DMLModel`` all-gathers the embeddings, so the loss sees the whole global
batch. BatchNormalization would normalise each half with its own
statistics, hence ``model.freeze_batchnorm=true`` in both runs.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
BUDGET_S = 300  # whole module; generous for a loaded 2-core CI machine
COMMON = [
    "--config",
    os.path.join(ROOT, "configs", "smoke.yaml"),
    "--set",
    "train.epochs=2",
    "--set",
    "train.steps_per_epoch=2",
    "--set",
    "model.freeze_batchnorm=true",
    "--set",
    "eval.plots=false",
    "--set",
    "train.verbose=2",
]
ARTEFACTS = [
    "config.yaml",
    "history.csv",
    "tb",
    "checkpoints/state.json",
    "checkpoints/epoch-00002.index",
    "best_encoder.keras",
    "final_encoder.keras",
    "eval_test.json",
]


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def launch(args, env_extra=None):
    base = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env = dict(base, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    env.update(env_extra or {})
    return subprocess.Popen(
        [sys.executable, TRAIN, *COMMON, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_all(procs, deadline):
    """``{name: (returncode, output)}``; kills every process on timeout."""
    out = {}
    try:
        for name, proc in procs.items():
            left = max(1.0, deadline - time.monotonic())
            try:
                text, _ = proc.communicate(timeout=left)
            except subprocess.TimeoutExpired:
                tails = []
                for other, p in procs.items():
                    p.kill()
                    text = p.communicate()[0] or ""
                    tails.append(f"--- {other}:\n{text[-1500:]}")
                raise AssertionError(
                    f"{name} did not finish within the {BUDGET_S} s budget\n"
                    + "\n".join(tails)
                ) from None
            out[name] = (proc.returncode, text)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return out


def listing(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else None


def read_json(path):
    return json.loads(path.read_text()) if path.exists() else None


def worker_env(ports, index, tmpdir=None):
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    env = {
        "TF_CONFIG": json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}
        )
    }
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mw")
    deadline = time.monotonic() + BUDGET_S
    chief_dir, other_dir = tmp / "chief_run", tmp / "worker1_run"
    worker_tmp = tmp / "worker1_tmp"
    worker_tmp.mkdir()
    multi = ["--set", "train.strategy=multi_worker"]
    # Phase 1 (+ the single process, concurrently).
    ports = free_ports(2)
    nan = ["--set", "train.debug_inject_nan_at_step=2"]
    procs = {
        "single": launch(["--set", f"train.run_dir={tmp / 'single'}"]),
        "chief1": launch(
            [*multi, *nan, "--set", f"train.run_dir={chief_dir}"],
            worker_env(ports, 0),
        ),
        "worker1": launch(
            [*multi, *nan, "--set", f"train.run_dir={other_dir}"],
            worker_env(ports, 1, worker_tmp),
        ),
    }
    phase1 = wait_all(procs, deadline)  # kills them all on a timeout
    phase1_files = {
        "chief": listing(chief_dir / "checkpoints"),
        "state": read_json(chief_dir / "checkpoints" / "state.json"),
        "other_dir_exists": other_dir.exists(),
        "worker_tmp": listing(worker_tmp),
    }
    # Phase 2: the documented launch, the same command on every worker.
    ports = free_ports(2)
    same = [*multi, "--set", f"train.run_dir={chief_dir}"]
    phase2 = wait_all(
        {
            "chief2": launch(same, worker_env(ports, 0)),
            "worker2": launch(same, worker_env(ports, 1, worker_tmp)),
        },
        deadline,
    )
    return {
        "tmp": tmp,
        "chief_dir": chief_dir,
        "single_dir": tmp / "single",
        "worker_tmp": worker_tmp,
        "phase1": phase1,
        "phase1_files": phase1_files,
        "phase2": phase2,
    }


def checkpoint(path):
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(path))
    keys = [
        k
        for k in reader.get_variable_to_shape_map()
        if k.startswith("variables/")
    ]
    return {k: reader.get_tensor(k) for k in keys}


def history(path):
    with open(path, encoding="utf-8") as f:
        lines = [line.strip().split(",") for line in f if line.strip()]
    header = lines[0]
    return {
        h: np.array([float(r[i]) for r in lines[1:]])
        for i, h in enumerate(header)
    }


def test_phase1_both_stop_at_the_nan_after_epoch_1(runs):
    phase1 = runs["phase1"]
    assert phase1["single"][0] == 0, phase1["single"][1][-3000:]
    for name in ("chief1", "worker1"):
        code, text = phase1[name]
        assert code == 3, f"{name} exit {code}:\n{text[-3000:]}"
    files = runs["phase1_files"]
    assert files["state"] is not None, phase1["chief1"][1][-3000:]
    assert files["state"]["epoch"] == 1
    assert files["state"]["checkpoint"] == "epoch-00001"
    assert "epoch-00001.index" in files["chief"]
    assert not any(f.startswith("epoch-00002") for f in files["chief"])


def test_non_chief_writes_no_run_folder_and_cleans_its_temp(runs):
    files = runs["phase1_files"]
    assert not files["other_dir_exists"]  # worker 1's own train.run_dir
    assert not [f for f in files["worker_tmp"] if f.startswith("tfdml-")]
    assert not [
        f for f in os.listdir(runs["worker_tmp"]) if f.startswith("tfdml-")
    ]
    code, text = runs["phase2"]["worker2"]
    assert "chief writes the run folder" in text


def test_phase2_resumes_on_every_worker_and_completes(runs):
    for name in ("chief2", "worker2"):
        code, text = runs["phase2"][name]
        assert code == 0, f"{name} exit {code}:\n{text[-3000:]}"
        assert "Epoch 2/2" in text and "Epoch 1/2" not in text
    assert "resuming" in runs["phase2"]["chief2"][1]
    assert "resuming" in runs["phase2"]["worker2"][1]
    for rel in ARTEFACTS:
        assert (runs["chief_dir"] / rel).exists(), rel
    state = json.loads(
        (runs["chief_dir"] / "checkpoints" / "state.json").read_text()
    )
    assert state["done"] and state["epoch"] == 2
    report = json.loads((runs["chief_dir"] / "eval_test.json").read_text())
    assert 0.0 <= report["final"]["recall@1"] <= 1.0


def test_chief_equals_one_process_on_the_same_global_batches(runs):
    ckpt = "checkpoints/epoch-00002"
    multi = checkpoint(runs["chief_dir"] / ckpt)
    single = checkpoint(runs["single_dir"] / ckpt)
    assert sorted(multi) == sorted(single) and len(single) > 10
    for key in single:
        np.testing.assert_allclose(
            multi[key], single[key], rtol=1e-4, atol=1e-5, err_msg=key
        )
    # The comparison is meaningful: epoch 2 moved the weights by far more
    # than the tolerance.
    before = checkpoint(runs["single_dir"] / "checkpoints/epoch-00001")
    moved = max(
        float(np.max(np.abs(single[k] - before[k])))
        for k in single
        if single[k].dtype.kind == "f"
    )
    assert moved > 1e-3
    h_multi = history(runs["chief_dir"] / "history.csv")
    h_single = history(runs["single_dir"] / "history.csv")
    np.testing.assert_array_equal(h_multi["epoch"], [0, 1])
    for key in ("loss", "pos_sim", "neg_sim", "val_recall@1"):
        np.testing.assert_allclose(h_multi[key], h_single[key], rtol=1e-4)
