"""``train.init_from``: a new run starts from another run's encoder."""

import os

import keras
import numpy as np
import pytest

import tfdml.models  # noqa: F401  (registers the encoder's layers)
from tests.test_train import _run as smoke_run
from tfdml import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")


def _source(root, name="best_encoder.keras", embedding_dim=16):
    """A run folder holding a seeded smoke-sized encoder (nonzero BN
    statistics), not the weights a fresh seed-0 run would start with."""
    keras.utils.set_random_seed(123)
    enc = models.build_embedding_model(
        input_shape=(16, 16, 1), embedding_dim=embedding_dim
    )
    for v in enc.non_trainable_variables:
        v.assign(np.random.default_rng(1).uniform(0.5, 1.5, v.shape))
    run = root / "source"
    run.mkdir()
    enc.save(run / name)
    return run, enc


def _run(run_dir, *overrides):
    """A one-step smoke run (tests.test_train._run with a tiny budget)."""
    return smoke_run(
        run_dir, "train.epochs=1", "train.steps_per_epoch=1", *overrides
    )


def _trainable(path):
    enc = keras.saving.load_model(path, compile=False)
    return {v.path: v.numpy() for v in enc.trainable_variables}


@pytest.mark.slow
def test_init_from_loads_the_source_weights(tmp_path):
    src, enc = _source(tmp_path)
    want = {v.path: v.numpy() for v in enc.trainable_variables}
    run_dir = tmp_path / "run"
    # a learning rate so small that one step leaves the weights in place
    rc = _run(
        run_dir,
        f"train.init_from={src}",
        "optimizer.learning_rate=1e-12",
    )
    assert rc == 0
    got = _trainable(run_dir / "final_encoder.keras")
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-6, err_msg=key)
    # without init_from the run starts elsewhere
    fresh = tmp_path / "fresh"
    assert _run(fresh, "optimizer.learning_rate=1e-12") == 0
    other = _trainable(fresh / "final_encoder.keras")
    assert max(np.abs(other[k] - want[k]).max() for k in want) > 1e-2


def test_init_from_falls_back_to_final_encoder(tmp_path):
    from tfdml.training import build as build_lib
    from tfdml.training import config as config_lib

    src, enc = _source(tmp_path, name="final_encoder.keras")
    cfg = config_lib.load(SMOKE, [f"train.init_from={src}"])
    built = build_lib.validate(cfg)
    parts = build_lib.build_model(cfg, built)
    build_lib.apply_init_from(built, parts.encoder)
    for a, b in zip(parts.encoder.weights, enc.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def _refused(tmp_path, capsys, init_from, *overrides):
    run_dir = tmp_path / "run"
    rc = _run(run_dir, f"train.init_from={init_from}", *overrides)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "train.init_from" in err, err
    assert not run_dir.exists()  # refused before the run folder is touched
    return err


def test_init_from_refuses_a_mismatched_architecture(tmp_path, capsys):
    src, _ = _source(tmp_path, embedding_dim=8)
    err = _refused(tmp_path, capsys, src)
    assert "embedding_head/kernel" in err, err


def test_init_from_refuses_a_missing_folder_or_encoder(tmp_path, capsys):
    err = _refused(tmp_path, capsys, tmp_path / "nowhere")
    assert "nowhere" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _refused(tmp_path, capsys, empty)
    assert "best_encoder.keras" in err and "final_encoder.keras" in err
