"""The benchmark scripts still run (tiny sizes, no timing) and share
benchmarks/_common.py (machine header, timers, P x K batches)."""

import importlib.util
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    path = os.path.join(ROOT, "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
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


@pytest.mark.slow
def test_full_run_script(capsys):
    _load("eval_full_1m").main(["--n", "600"])
    out = capsys.readouterr().out
    row = [r for r in out.splitlines() if r.startswith("| 600 |")]
    assert len(row) == 1 and "1.0000" in row[0]


@pytest.mark.slow
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


def test_common_pk_batches_and_images():
    common = _load("_common")
    labels = np.repeat(np.arange(12), 5)
    labels[:2] = 11  # class 0 keeps 3 images: not eligible for k = 4
    train = np.arange(8)
    b = common.pk_batches(labels, train, steps=20, p=3, k=4, seed=1)
    assert b.shape == (20, 12) and b.dtype == np.int64
    for row in b:
        groups = labels[row].reshape(3, 4)
        assert (groups == groups[:, :1]).all()  # k images of one class each
        assert len(set(groups[:, 0])) == 3  # p distinct classes
        assert len(set(row)) == 12  # distinct images
        assert set(groups[:, 0]) <= set(range(1, 8))  # eligible train only
    np.testing.assert_array_equal(
        b, common.pk_batches(labels, train, steps=20, p=3, k=4, seed=1)
    )
    with pytest.raises(ValueError, match="p=9"):
        common.pk_batches(labels, train, steps=1, p=9, k=4, seed=0)
    x, y = common.pk_images(8, 3, 2, seed=0, channels=1)
    assert x.shape == (6, 8, 8, 1) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() < 1.0
    np.testing.assert_array_equal(y, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(common.pk_labels(2, 3), [0, 0, 0, 1, 1, 1])


def test_common_headers_and_timers():
    common = _load("_common")
    env = common.environment()
    assert set(env) == {
        "date_utc",
        "machine",
        "python",
        "tensorflow",
        "keras",
        "numpy",
    }
    assert "CPU cores visible" in env["machine"]
    assert "CPU cores" in common.machine_line()
    calls = []
    t = common.median_time(lambda v: calls.append(v) or v, (1,), repeats=3)
    assert calls == [1] * 4 and t >= 0.0  # one warm-up call + 3 timed
    with common.Stopwatch() as watch:
        pass
    assert watch.seconds >= 0.0


def test_scripts_import_the_shared_module():
    """Each script that uses _common loads (imports resolve) and its data
    helper is _common's P x K batch."""
    common = _load("_common")
    for name in ("losses", "train_step", "iaa", "mmsi"):
        mod = _load(name)
        assert mod.__dict__.get("pk_images", common.pk_images).__name__ == (
            "pk_images"
        )
    iaa = _load("iaa")
    x, y = iaa.batch(8, 2, 3)
    x2, y2 = common.pk_images(8, 2, 3)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)


def test_conv_floor_kernels_and_table():
    """conv_floor.py times the side-by-side CNN's convolutions (the same
    layer shapes as vs_pml's CNN; no input gradient for the first layer)
    and its table sums one step's kernels per round."""
    cf = _load("conv_floor")
    vs = _load("vs_pml")
    assert cf.WIDTHS == vs.WIDTHS
    assert cf.layers() == [
        (64, 1, 32),
        (32, 32, 64),
        (16, 64, 128),
        (8, 128, 256),
    ]
    assert cf.gflop(128, 32, 32, 64) == pytest.approx(4.831838208)
    res = cf.tf_kernels(batch=2, repeats=1)
    ms = res["ms"]
    assert set(ms[0]) == {"forward", "filter grad"}
    assert all(set(ms[i]) == set(cf.KERNELS) for i in (1, 2, 3))
    assert all(v > 0 for layer in ms.values() for v in layer.values())
    # 11 kernels; tf at 1 ms and torch at 2 ms each, two rounds
    fake = {
        i: {k: 1.0 for k in cf.KERNELS if i or k != "input grad"}
        for i in range(4)
    }
    slow = {i: {k: 2 * v for k, v in d.items()} for i, d in fake.items()}
    text = cf.table(
        {"tf": [{"ms": fake}] * 2, "torch": [{"ms": slow}] * 2}, batch=128
    )
    rows = text.splitlines()
    assert len(rows) == 2 + 11 + 1
    assert rows[-1] == (
        "| all | one step's kernels | | 11.0 | 22.0 | 0.50 / 0.50 |"
    )
    assert "| 2: 32x32, 32->64 | input grad | 4.83 | 1.0 (4832) |" in text
    # TensorFlow alone: no ratio column
    assert "ratio" not in cf.table({"tf": [{"ms": fake}], "torch": []}, 128)
