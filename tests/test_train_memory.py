"""train.py: xbm_drift from stable image ids; history before checkpoint."""

import csv
import os

import numpy as np
import pytest

from tests.test_train import _run

pytestmark = pytest.mark.slow


def test_memory_run_logs_drift_to_own_stored_copy(tmp_path):
    run_dir = tmp_path / "run"
    # 64 slots hold 4 batches: later batches meet their own copies
    assert _run(run_dir, "eval.plots=false", "memory.size=64") == 0
    with open(run_dir / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and "xbm_drift" in rows[0], sorted(rows[0])
    drift = np.array([float(r["xbm_drift"]) for r in rows])
    assert np.all(np.isfinite(drift))
    assert np.all(drift <= 1.0 + 1e-6) and np.all(drift >= -1.0 - 1e-6)
    # images re-drawn within the memory's span have a stored copy: the
    # metric is measured (0 only when no batch row ever met its copy)
    assert np.any(drift != 0.0), drift


def test_history_row_is_written_before_the_checkpoint(tmp_path, monkeypatch):
    """When state.json records epoch e, history.csv already holds rows
    0..e-1, so a kill -9 right after a checkpoint loses no history row."""
    from tfdml.training.checkpoint import Checkpointer

    seen = []
    save = Checkpointer.save

    def checked_save(self, epoch, state):
        path = os.path.join(os.path.dirname(self.directory), "history.csv")
        rows = []
        if os.path.exists(path):
            with open(path, newline="") as f:
                rows = [int(r["epoch"]) for r in csv.DictReader(f)]
        seen.append((epoch, rows))
        return save(self, epoch, state)

    monkeypatch.setattr(Checkpointer, "save", checked_save)
    assert _run(tmp_path / "run", "eval.plots=false") == 0
    assert seen == [(e, list(range(e))) for e in (1, 2, 3)], seen
