"""train.py with a cross-batch memory logs xbm_drift from stable image ids."""

import csv
import os

import numpy as np

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")


def test_memory_run_logs_drift_to_own_stored_copy(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        f"train.run_dir={run_dir}",
        "train.deterministic=false",
        "train.verbose=0",
        "eval.plots=false",
        # 64 slots hold 4 batches: later batches meet their own copies
        "memory.size=64",
    ]
    args = ["--config", SMOKE] + sum((["--set", o] for o in overrides), [])
    assert train.main(args) == 0
    with open(run_dir / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and "xbm_drift" in rows[0], sorted(rows[0])
    drift = np.array([float(r["xbm_drift"]) for r in rows])
    assert np.all(np.isfinite(drift))
    assert np.all(drift <= 1.0 + 1e-6) and np.all(drift >= -1.0 - 1e-6)
    # images re-drawn within the memory's span have a stored copy: the
    # metric is measured (0 only when no batch row ever met its copy)
    assert np.any(drift != 0.0), drift
