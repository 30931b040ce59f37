"""The evaluation benchmark scripts still run (tiny sizes, no timing)."""

import importlib.util
import os

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    path = os.path.join(ROOT, "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_eval_benchmark_tables(capsys):
    ev = _load("eval")
    # 400 points in full, then 1,000 points timed on a 100-query sample.
    ev.bench_metrics([400, 1000], [0.5], full_max_n=500, query_sample=100)
    ev.bench_scann([3000], nq=20)
    out = capsys.readouterr().out
    rows = [r for r in out.splitlines() if r.startswith("| 0.5 |")]
    assert [r.split("|")[2:4] for r in rows] == [
        [" 400 ", " 400 "],
        [" 1,000 ", " 100 "],
    ]
    # well-separated classes: perfect retrieval on the sample as well
    assert all(r.rstrip(" |").endswith("1.0000") for r in rows)
    assert "| 3,000 |" in out


def test_full_run_script(capsys):
    _load("eval_full_1m").main(["--n", "600"])
    out = capsys.readouterr().out
    row = [r for r in out.splitlines() if r.startswith("| 600 |")]
    assert len(row) == 1 and "1.0000" in row[0]


def test_vs_pml_protocol_and_tfdml_trainer(tmp_path, capsys):
    """vs_pml: class split, shared P x K batches, the tfdml side end to end
    on a tiny npz (the PML side needs the peer's venv: not run here)."""
    import json

    import numpy as np

    vs = _load("vs_pml")
    labels = np.repeat(np.arange(12), 5)
    train, test = vs.protocol(labels, test_classes=4)
    assert list(train) == list(range(6))
    assert len(test) == 4 and set(test) <= set(range(6, 12))
    b = vs.pk_batches(labels, train, steps=3, p=2, k=3, seed=0)
    assert b.shape == (3, 6)
    for row in b:
        groups = labels[row].reshape(2, 3)
        assert (groups == groups[:, :1]).all()  # K of one class each
        assert len(set(row)) == 6  # distinct images
        assert set(labels[row]) <= set(train)
    np.testing.assert_array_equal(
        b, vs.pk_batches(labels, train, steps=3, p=2, k=3, seed=0)
    )
    rng = np.random.default_rng(0)
    x = (rng.random((60, 16, 16)) * 255).astype(np.uint8)
    npz = tmp_path / "d.npz"
    np.savez(npz, X=x, y=labels)
    vs.main(
        [
            "--dataset",
            str(npz),
            "--skip-pml",
            "--steps",
            "2",
            "--classes-per-batch",
            "2",
            "--samples-per-class",
            "3",
            "--test-classes",
            "4",
            "--out",
            str(tmp_path / "out"),
            "--name",
            "t",
        ]
    )
    rows = json.loads((tmp_path / "out" / "t.json").read_text())["rows"]
    assert [r["framework"] for r in rows] == [
        "tfdml (moving BN statistics)",
        "tfdml (precise BN)",
    ]
    assert all(0.0 <= r["map@r"] <= 1.0 for r in rows)
