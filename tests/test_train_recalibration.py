"""train.py evaluates and saves encoders with recalibrated BatchNorm."""

import os

import keras
import numpy as np
import pytest

import train
from tfdml.training import build as build_lib
from tfdml.training import callbacks as callbacks_lib
from tfdml.training import config as config_lib

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")


def _overrides(run_dir, recalibrate):
    return [
        f"train.run_dir={run_dir}",
        "train.deterministic=false",
        "train.verbose=0",
        "eval.plots=false",
        f"eval.recalibrate_bn={'true' if recalibrate else 'false'}",
    ]


def _bn_stats(encoder):
    from tfdml.models import batchnorm_layers

    return [
        np.array(v)
        for layer in batchnorm_layers(encoder)
        for v in (layer.moving_mean, layer.moving_variance)
    ]


def _stats_after_recalibration(run_dir, recalibrate, name):
    overrides = _overrides(run_dir, recalibrate)
    args = ["--config", SMOKE] + sum((["--set", o] for o in overrides), [])
    assert train.main(args) == 0
    enc = keras.saving.load_model(os.path.join(run_dir, name), compile=False)
    saved = _bn_stats(enc)
    cfg = config_lib.load(SMOKE, overrides)
    cfg["eval"]["recalibrate_bn"] = True
    built = build_lib.validate(cfg)
    assert callbacks_lib.recalibrate(cfg, built, enc) > 0
    return saved, _bn_stats(enc)


@pytest.mark.parametrize("name", ["final_encoder.keras", "best_encoder.keras"])
def test_saved_encoders_carry_recalibrated_statistics(tmp_path, name):
    saved, fresh = _stats_after_recalibration(tmp_path / "on", True, name)
    for a, b in zip(saved, fresh):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_without_recalibration_statistics_are_stale(tmp_path):
    """The check above can fail: moving averages differ from precise BN."""
    saved, fresh = _stats_after_recalibration(
        tmp_path / "off", False, "final_encoder.keras"
    )
    assert (
        max(float(np.max(np.abs(a - b))) for a, b in zip(saved, fresh)) > 1e-2
    )
