"""A train.py run with the issue-16 extras: no Keras shuffle warning, step
evaluations, the embedding projector, training-curve and PR-curve PNGs, a
calibrated export threshold and the SavedModel's ``matched`` flag."""

import glob
import importlib.util
import json
import os
import warnings

import numpy as np
import pytest
import tensorflow as tf

import tfdml.models  # noqa: F401  (registers the encoder's layers)
from tests.test_train import SMOKE
from tests.test_train import _run

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scalars(folder, tag):
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(folder, {"tensors": 0})
    acc.Reload()
    return [e.step for e in acc.Tensors(tag)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("extras") / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = _run(
            run_dir,
            "eval.every_n_steps=2",
            "eval.projector=true",
            "eval.projector_points=8",
            "export.enabled=true",
            # Always reachable: the validation pairs' base rate is 180 / 780
            # (4 classes x 10 images), so the lowest threshold has 0.23.
            "export.target_precision=0.2",
        )
    assert status == 0
    return run_dir, [str(w.message) for w in caught]


def test_fit_emits_no_shuffle_warning(run):
    _, messages = run
    assert not [m for m in messages if "shuffle" in m], messages


def test_step_evaluations_and_projector(run):
    run_dir, _ = run
    # smoke.yaml: 3 epochs x 4 steps; evaluations at steps 2, 4, ..., 12.
    steps = _scalars(str(run_dir / "tb" / "eval_steps"), "val_map@r_by_step")
    assert steps == [2, 4, 6, 8, 10, 12]
    proj = run_dir / "tb" / "projector"
    names = set(os.listdir(proj))
    assert {
        "projector_config.pbtxt",
        "embeddings.tsv",
        "metadata.tsv",
        "sprite.png",
    } <= names
    assert glob.glob(str(proj / "events.out.tfevents.*"))
    rows = (proj / "metadata.tsv").read_text().splitlines()
    assert rows[0] == "label\tindex" and len(rows) == 9
    emb = np.loadtxt(proj / "embeddings.tsv", delimiter="\t")
    assert emb.shape == (8, 16)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)


def test_plots_and_calibration_report(run):
    run_dir, _ = run
    names = set(os.listdir(run_dir / "plots"))
    assert {"training_curves.png", "precision_recall.png"} <= names
    report = json.loads((run_dir / "eval_test.json").read_text())
    cal = report["calibration"]
    assert cal["split"] == "val" and cal["target_precision"] == 0.2
    assert cal["precision"] >= 0.2 and -1 <= cal["threshold"] <= 1
    assert cal["num_pairs"] == 780 and cal["num_positive"] == 180
    assert set(cal["test"]) == {"precision", "recall", "f1", "num_pairs"}


def test_export_matched_flag_uses_the_calibrated_threshold(
    run, tmp_path, capsys
):
    run_dir, _ = run
    report = json.loads((run_dir / "eval_test.json").read_text())
    thr = report["calibration"]["threshold"]
    (path,) = glob.glob(str(run_dir / "export" / "tfdml" / "1"))
    m = tf.saved_model.load(path)
    q = m.signatures["search"](
        embeddings=tf.constant(np.eye(3, 16, dtype=np.float32)),
        k=tf.constant(5),
    )
    np.testing.assert_array_equal(
        q["matched"].numpy(), q["scores"].numpy() >= np.float32(thr)
    )
    # export/export.py: --threshold overrides, a bad one exits 2.
    spec = importlib.util.spec_from_file_location(
        "export_cli", os.path.join(ROOT, "export", "export.py")
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "m"
    written = cli.main(
        ["--run", str(run_dir), "--out", str(out), "--threshold", "-1"]
    )
    m2 = tf.saved_model.load(written["brute_force"])
    o = m2.signatures["search_default"](
        embeddings=tf.constant(np.eye(2, 16, dtype=np.float32))
    )
    assert o["matched"].numpy().all()  # every score >= -1
    with pytest.raises(SystemExit) as e:
        cli.main(["--run", str(run_dir), "--out", str(out), "--threshold", "2"])
    assert e.value.code == 2
    base = ["--run", str(run_dir), "--out", str(tmp_path / "c")]
    with pytest.raises(SystemExit) as e:
        cli.main(base + ["--threshold", "0.5", "--target-precision", "0.2"])
    assert e.value.code == 2
    # --target-precision: calibrated on the run's validation split (the
    # final encoder there, the best one here: any threshold in [-1, 1]).
    capsys.readouterr()
    written = cli.main(base + ["--target-precision", "0.2"])
    printed = capsys.readouterr().out
    # The same calibration by hand: the run's best encoder on its val split.
    from tfdml.data import load_split_arrays
    from tfdml.eval import calibrate
    from tfdml.training import report

    enc, cfg, _ = report.load_run(str(run_dir))
    xv, yv = load_split_arrays(cfg, "val")[:2]
    emb = np.asarray(enc(xv.astype(np.float32) / 255.0)["embeddings"])
    expected = calibrate(emb, yv, target_precision=0.2)
    assert f"threshold {expected.threshold:.4f}" in printed
    m3 = tf.saved_model.load(written["brute_force"])
    o = m3.signatures["search"](
        embeddings=tf.constant(emb[:4]), k=tf.constant(9)
    )
    np.testing.assert_array_equal(
        o["matched"].numpy(),
        o["scores"].numpy() >= np.float32(expected.threshold),
    )


def test_unreachable_target_precision_warns_and_exports_without_threshold(
    tmp_path, monkeypatch, capsys
):
    # Known only after training: the run must not fail (and lose its
    # export) because the validation classes cannot reach the target.
    import tfdml.eval

    real = tfdml.eval.calibrate
    seen = []

    def constant_embeddings(emb, labels, **kw):
        # Identical embeddings: every pair ties, so the only precision is
        # the same-class base rate (180 / 780 = 0.2308 < 0.9).
        seen.append(kw["target_precision"])
        return real(np.ones_like(emb), labels, **kw)

    monkeypatch.setattr(tfdml.eval, "calibrate", constant_embeddings)
    run_dir = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = _run(
            run_dir,
            "eval.plots=false",
            "export.enabled=true",
            "export.target_precision=0.9",
        )
    assert status == 0 and seen == [0.9]
    messages = [str(w.message) for w in caught]
    (msg,) = [m for m in messages if "target_precision=0.9" in m]
    assert "highest precision is 0.2308" in msg and "WITHOUT" in msg
    assert "WITHOUT a threshold" in capsys.readouterr().out
    cal = json.loads((run_dir / "eval_test.json").read_text())["calibration"]
    assert cal["threshold"] is None and cal["reached"] is False
    assert cal["target_precision"] == 0.9 and cal["split"] == "val"
    assert abs(cal["best_precision"] - 180 / 780) < 1e-9
    assert "without a threshold" in cal["note"]
    (path,) = glob.glob(str(run_dir / "export" / "tfdml" / "1"))
    out = tf.saved_model.load(path).signatures["search"](
        embeddings=tf.constant(np.eye(3, 16, dtype=np.float32)),
        k=tf.constant(5),
    )
    assert set(out) == {"ids", "scores"}  # no threshold: no matched


def test_smoke_config_is_unchanged():
    # The run above relies on smoke.yaml's 3 epochs x 4 steps.
    from tfdml.training import config as config_lib

    cfg = config_lib.load(SMOKE)
    assert (cfg["train"]["epochs"], cfg["train"]["steps_per_epoch"]) == (3, 4)
