"""End-to-end ``train.py`` runs on configs/smoke.yaml: run folder, resume
after ``kill -9``, NaN handling and the demo with a tiny budget."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfdml.models  # noqa: F401  (registers the encoder's layers)
import train
from tfdml.training import loop as loop_lib
from tfdml.training import run_dir as run_dir_lib

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")


def _run(run_dir, *overrides):
    return train.main(
        [
            "--config",
            SMOKE,
            "--set",
            f"train.run_dir={run_dir}",
            "--set",
            "train.deterministic=false",
            "--set",
            "train.verbose=0",
            *sum((["--set", o] for o in overrides), []),
        ]
    )


def _history(run_dir):
    with open(os.path.join(run_dir, "history.csv"), newline="") as f:
        return list(csv.DictReader(f))


def _state(run_dir):
    return run_dir_lib.read_state(str(run_dir))


def _weights(path):
    model = keras.saving.load_model(path, compile=False)
    return model.get_weights()


def test_smoke_run_writes_every_artefact(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _run(run_dir, "optimizer.learning_rate=2e-3") == 0
    names = set(os.listdir(run_dir))
    for name in [
        "config.yaml",
        "history.csv",
        "tb",
        "checkpoints",
        "best_encoder.keras",
        "final_encoder.keras",
        "eval_test.json",
        "plots",
    ]:
        assert name in names, sorted(names)
    assert os.listdir(run_dir / "tb")
    assert {"recall_at_k.png", "retrieval_grid.png"} <= set(
        os.listdir(run_dir / "plots")
    )
    # Resolved config (with the override) and every object's config.
    from tfdml.training import config as config_lib

    doc = run_dir_lib.read_document(str(run_dir))
    assert doc["resolved"]["optimizer"]["learning_rate"] == 2e-3
    assert doc["objects"]["loss"]["class_name"] == "MultiSimilarityLoss"
    assert "alpha" in doc["objects"]["loss"]["config"]
    assert "proxy_optimizer" not in doc["objects"]  # a pair loss
    # One CSV row per epoch, with the validation metric used for selection.
    cfg = config_lib.load(SMOKE)
    rows = _history(run_dir)
    assert [int(r["epoch"]) for r in rows] == list(
        range(cfg["train"]["epochs"])
    )
    assert all("val_map@r" in r for r in rows)
    # best_encoder.keras is the validation argmax, not the test one.
    state = _state(run_dir)
    val = [float(r["val_map@r"]) for r in rows]
    assert state["done"] is True
    assert state["best"] == pytest.approx(max(val))
    assert state["best_epoch"] == int(np.argmax(val)) + 1
    report = json.loads((run_dir / "eval_test.json").read_text())
    assert report["monitor"] == "val_map@r"
    assert "final" in report and "best" in report
    assert 0.0 <= report["final"]["map@r"] <= 1.0
    # The encoder is the functional model of the architecture contract.
    enc = keras.saving.load_model(run_dir / "final_encoder.keras")
    x = np.random.default_rng(0).uniform(size=(3, 16, 16, 1)).astype("f4")
    emb = enc(x)["embeddings"].numpy()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # Running the same command again does not train again.
    capsys.readouterr()
    assert _run(run_dir, "optimizer.learning_rate=2e-3") == 0
    assert "already holds a finished run" in capsys.readouterr().out


def test_nan_stops_keeps_last_good_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = {"steps": 4}
    status = _run(
        run_dir,
        f"train.steps_per_epoch={cfg['steps']}",
        # Poison the weights before the second step of epoch 2.
        f"train.debug_inject_nan_at_step={cfg['steps'] + 1}",
    )
    assert status == loop_lib.EXIT_NAN
    err = capsys.readouterr().err
    assert "non-finite" in err and "epoch 2" in err
    assert "epoch-00001" in err
    state = _state(run_dir)
    assert state["epoch"] == 1 and state["checkpoint"] == "epoch-00001"
    assert not state["done"]
    assert not (run_dir / "final_encoder.keras").exists()
    files = os.listdir(run_dir / "checkpoints")
    assert not any(f.startswith("epoch-00002") for f in files)
    # The kept checkpoint holds finite values only.
    reader = tf.train.load_checkpoint(
        str(run_dir / "checkpoints" / "epoch-00001")
    )
    for name in reader.get_variable_to_shape_map():
        value = reader.get_tensor(name)
        if np.issubdtype(np.asarray(value).dtype, np.floating):
            assert np.all(np.isfinite(value)), name


def _cmd(run_dir, *overrides):
    cmd = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--config",
        SMOKE,
        "--set",
        f"train.run_dir={run_dir}",
        "--set",
        "train.epochs=3",
        "--set",
        "train.steps_per_epoch=20",
        "--set",
        "train.deterministic=true",
        "--set",
        "train.verbose=0",
        "--set",
        "eval.plots=false",
    ]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def test_resume_after_kill_9_matches_uninterrupted_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    done = subprocess.run(
        _cmd(a), env=ENV, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]

    proc = subprocess.Popen(
        _cmd(b),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Kill as soon as the first epoch's checkpoint is recorded.
    state_file = b / run_dir_lib.CHECKPOINT_DIR / run_dir_lib.STATE_FILE
    deadline = time.time() + 300
    while not state_file.exists() and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = _state(b)
    assert killed_at is not None and not killed_at["done"]
    assert 1 <= killed_at["epoch"] < 3  # killed mid-run

    again = subprocess.run(
        _cmd(b), env=ENV, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"after epoch {killed_at['epoch']}" in again.stdout
    # At most one epoch lost: training restarted at the last checkpoint.
    assert [int(r["epoch"]) for r in _history(b)] == [0, 1, 2]
    assert _history(a) == _history(b)
    for wa, wb in zip(
        _weights(a / "final_encoder.keras"),
        _weights(b / "final_encoder.keras"),
    ):
        np.testing.assert_array_equal(wa, wb)


@pytest.mark.needs_fonts
def test_demo_tiny(tmp_path, capsys):
    from tfdml.training import demo

    status = demo.main(["--tiny", "--out", str(tmp_path / "demo")])
    assert status == 0
    out = capsys.readouterr().out
    assert "| map@r |" in out and "export_precision@5" in out
    assert "run folder:" in out and "export:" in out
    run = tmp_path / "demo" / "run"
    assert (run / "eval_test.json").exists()
    assert (run / "plots" / "recall_at_k.png").exists()
    assert (tmp_path / "demo" / "export" / "tfdml" / "1").is_dir()
