"""The run folder (``tfdml.training.run_dir``): what ``train.py`` may delete,
what ``export/export.py --run`` reads, and resuming from what ``kill -9``
leaves behind (a ``*_temp`` checkpoint folder, a truncated checkpoint, a
truncated ``state.json``)."""

import csv
import importlib.util
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

import train
from tfdml.training import config as config_lib
from tfdml.training import run_dir as run_dir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")
# Tiny budget: 3 epochs of 2 steps, no plots.
FAST = [
    "train.epochs=3",
    "train.steps_per_epoch=2",
    "train.deterministic=false",
    "train.verbose=0",
    "eval.plots=false",
]
NAN_AT_EPOCH_3 = "train.debug_inject_nan_at_step=5"  # 2nd step of epoch 3


def _run(run_dir, *overrides, fast=True):
    sets = [f"train.run_dir={run_dir}"] + (FAST if fast else [])
    sets += list(overrides)
    return train.main(
        ["--config", SMOKE, *sum((["--set", s] for s in sets), [])]
    )


def _epochs(run_dir):
    with open(os.path.join(run_dir, "history.csv"), newline="") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped (NaN) after epoch 2: checkpoints epoch-00001 and
    epoch-00002, state.json at epoch 2. Created in an existing empty
    folder (which is allowed). Tests copy it."""
    run = tmp_path_factory.mktemp("base") / "run"
    run.mkdir()
    assert _run(run, NAN_AT_EPOCH_3) == 3
    state = run_dir_lib.read_state(str(run))
    assert state["epoch"] == 2 and not state["done"]
    return run


def _copy(stopped_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    return run


# -- 1. never delete what tfdml did not create --


@pytest.mark.parametrize("overwrite", [False, True])
def test_refuses_non_empty_folder_that_is_not_a_run(
    tmp_path, capsys, overwrite
):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep")
    (folder / "sub").mkdir()
    (folder / "sub" / "data.bin").write_bytes(b"\0\1")
    status = _run(folder, f"train.overwrite={str(overwrite).lower()}")
    err = capsys.readouterr().err
    assert status == 2
    assert "train.run_dir" in err and "not a tfdml run" in err
    # Nothing written, nothing removed.
    assert sorted(os.listdir(folder)) == ["precious.txt", "sub"]
    assert (folder / "precious.txt").read_text() == "keep"
    assert os.listdir(folder / "sub") == ["data.bin"]


def test_refuses_folder_with_a_foreign_config_yaml(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.yaml").write_text("model:\n  image_size: 16\n")
    assert _run(folder, "train.overwrite=true") == 2
    assert "not a tfdml run" in capsys.readouterr().err
    assert os.listdir(folder) == ["config.yaml"]


@pytest.mark.slow
def test_overwrite_removes_only_what_a_run_writes(stopped_run, tmp_path):
    run = _copy(stopped_run, tmp_path)
    (run / "notes.txt").write_text("mine")
    (run / "mydata").mkdir()
    (run / "mydata" / "x.npy").write_bytes(b"x")
    (run / "checkpoints" / "README.mine").write_text("mine too")
    assert _run(run, "train.overwrite=true") == 0
    assert (run / "notes.txt").read_text() == "mine"
    assert (run / "mydata" / "x.npy").read_bytes() == b"x"
    assert (run / "checkpoints" / "README.mine").read_text() == "mine too"
    # A fresh run: 3 epochs trained from scratch, finished.
    assert _epochs(run) == [0, 1, 2]
    assert run_dir_lib.read_state(str(run))["done"] is True


def test_clean_run_dir_keeps_unknown_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cfg = config_lib.load(SMOKE, ["export.enabled=true"])

    def fill():
        run_dir_lib.write_config(str(run), cfg)
        for name in ("history.csv", "eval_test.json", "best_encoder.keras"):
            (run / name).write_text("x")
        for name in ("tb", "plots", "checkpoints", "export"):
            (run / name).mkdir(exist_ok=True)
            (run / name / "f").write_text("x")
        (run / "checkpoints" / "epoch-00001.index").write_text("x")
        (run / "checkpoints" / "state.json").write_text("{}")

    fill()
    (run / "user.txt").write_text("keep")
    run_dir_lib.clean_run_dir(str(run))
    # checkpoints/f is not a checkpoint: it stays, and so its folder.
    assert sorted(os.listdir(run)) == ["checkpoints", "user.txt"]
    assert os.listdir(run / "checkpoints") == ["f"]
    # export/ is tfdml's only when the run exported there.
    cfg["export"]["dir"] = str(tmp_path / "elsewhere")
    fill()
    run_dir_lib.clean_run_dir(str(run))
    assert sorted(os.listdir(run)) == ["checkpoints", "export", "user.txt"]
    # Not a tfdml run: nothing is removed.
    (run / "history.csv").write_text("x")
    run_dir_lib.clean_run_dir(str(run))
    assert (run / "history.csv").exists()


# -- 2. export/export.py --run exports the run's own test split --


def _export_cli():
    spec = importlib.util.spec_from_file_location(
        "export_cli", os.path.join(ROOT, "export", "export.py")
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


@pytest.mark.slow
def test_export_cli_uses_the_runs_test_split(tmp_path):
    from tfdml.data import load_split_arrays

    run = tmp_path / "run"
    assert _run(run, "train.epochs=1", "train.verbose=0", fast=False) == 0
    written = _export_cli().main(
        ["--run", str(run), "--out", str(tmp_path / "m")]
    )
    cfg = run_dir_lib.read_config(str(run))
    assert cfg["train"]["epochs"] == 1
    x, y = load_split_arrays(cfg, "test")[:2]
    m = cfg["model"]
    assert x.shape[1:] == (m["image_size"], m["image_size"], m["channels"])
    n = len(y)
    sm = tf.saved_model.load(written["brute_force"])
    # The gallery holds exactly the n test images, in order, with labels.
    imgs = tf.constant(x.astype("float32") / 255.0)
    hits = sm.signatures["embed_and_search"](images=imgs, k=tf.constant(n))
    ids = np.asarray(hits["ids"]).astype(str)
    assert sorted(ids[0].tolist()) == sorted(f"{i}/{y[i]}" for i in range(n))
    with pytest.raises(tf.errors.InvalidArgumentError):
        sm.signatures["embed_and_search"](images=imgs[:1], k=tf.constant(n + 1))
    # Each test image finds itself first (same pixels, same embedding).
    top1 = np.array([int(r[0].split("/")[0]) for r in ids])
    assert np.mean(top1 == np.arange(n)) > 0.95
    assert np.asarray(hits["scores"])[:, 0] == pytest.approx(1.0, abs=1e-4)


def test_read_config_errors(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(run_dir_lib.RunDirError, match="no config.yaml"):
        run_dir_lib.read_config(str(run))
    run.mkdir()
    (run / "config.yaml").write_text("resolved: [unclosed\n")
    with pytest.raises(run_dir_lib.RunDirError, match="config.yaml"):
        run_dir_lib.read_config(str(run))
    (run / "config.yaml").write_text("model: {image_size: 8}\n")
    with pytest.raises(run_dir_lib.RunDirError, match="not a tfdml run"):
        run_dir_lib.read_config(str(run))


# -- 5. resume survives what kill -9 leaves behind --


@pytest.mark.slow
def test_resume_with_a_leftover_temp_checkpoint_folder(stopped_run, tmp_path):
    run = _copy(stopped_run, tmp_path)
    ckpt = run / "checkpoints"
    # tf.train.Checkpoint's staging folders of saves killed mid-write.
    for name in ("epoch-00001_temp", "epoch-00002_temp", "epoch-00004_temp"):
        (ckpt / name).mkdir()
        (ckpt / name / "part-00000-of-00001.index").write_bytes(b"\0" * 8)
    (ckpt / "README.mine").write_text("mine")
    assert _run(run) == 0
    assert _epochs(run) == [0, 1, 2]
    left = sorted(os.listdir(ckpt))
    assert not any(n.endswith("_temp") for n in left), left
    assert "README.mine" in left


@pytest.mark.slow
def test_resume_falls_back_from_a_truncated_checkpoint(
    stopped_run, tmp_path, capsys
):
    run = _copy(stopped_run, tmp_path)
    data = run / "checkpoints" / "epoch-00002.data-00000-of-00001"
    blob = data.read_bytes()
    data.write_bytes(blob[: len(blob) // 2])
    capsys.readouterr()
    assert _run(run) == 0
    out, err = capsys.readouterr()
    assert "epoch-00002" in err and "epoch-00001" in err
    assert "after epoch 1" in out
    assert _epochs(run) == [0, 1, 2]
    assert run_dir_lib.read_state(str(run))["done"] is True


@pytest.mark.slow
@pytest.mark.parametrize("content", [b'{"epoch": 2, "checkp', b"", b"[1, 2]"])
def test_truncated_state_json_is_a_clear_error(
    stopped_run, tmp_path, capsys, content
):
    run = _copy(stopped_run, tmp_path)
    (run / "checkpoints" / "state.json").write_bytes(content)
    assert _run(run) == 2
    err = capsys.readouterr().err
    assert "state.json" in err and "Traceback" not in err
