"""BruteForceIndex / ScaNNIndex vs a NumPy float64 exact search."""

import sys
import time

import numpy as np
import pytest

from tfdml.eval import BruteForceIndex
from tfdml.eval import ScaNNIndex
from tfdml.eval import retrieval_metrics
from tfdml.eval.index import import_scann_ops


def exact(q, db, k):
    s = q.astype(np.float64) @ db.astype(np.float64).T
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(s, idx, 1)


def clustered(n, d, clusters, seed, noise=0.3):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(clusters, d)).astype(np.float32)
    lab = rng.integers(0, clusters, n)
    x = c[lab] + noise * rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), lab


def test_brute_force_exact_and_save_load(tmp_path):
    db, _ = clustered(500, 16, 10, 0)
    q, _ = clustered(33, 16, 10, 1)
    ids = np.array([f"id{i}" for i in range(len(db))])
    index = BruteForceIndex(db, ids, block_size=8)
    got_ids, got_s = index.search(q, 12)
    want_i, want_s = exact(q, db, 12)
    np.testing.assert_array_equal(got_ids, ids[want_i])
    np.testing.assert_allclose(got_s, want_s, atol=1e-5)
    # ties: duplicates come back in gallery index order
    dup = np.repeat(db[:1], 5, axis=0)
    i2, _ = BruteForceIndex(dup).search(db[:1], 5)
    assert i2.tolist() == [["0", "1", "2", "3", "4"]]
    index.save(tmp_path / "bf")
    again = BruteForceIndex.load(tmp_path / "bf")
    np.testing.assert_array_equal(again.search(q, 12)[0], got_ids)
    with pytest.raises(ValueError, match="k"):
        index.search(q, 501)
    with pytest.raises(ValueError, match="queries"):
        index.search(q[:, :3], 2)
    with pytest.raises(ValueError, match="ids"):
        BruteForceIndex(db, ids[:3])


def test_scann_small_exact_and_save_load(tmp_path):
    db, _ = clustered(300, 8, 5, 2)
    q, _ = clustered(20, 8, 5, 3)
    ids = np.array([f"g{i}" for i in range(300)])
    index = ScaNNIndex(db, ids, k=7)  # < 20k rows: ScaNN brute force
    got, sc = index.search(q)
    want_i, want_s = exact(q, db, 7)
    np.testing.assert_array_equal(got, ids[want_i])
    np.testing.assert_allclose(sc, want_s, atol=1e-5)
    index.save(tmp_path / "sc")
    again = ScaNNIndex.load(tmp_path / "sc")
    np.testing.assert_array_equal(again.search(q, 4)[0], ids[want_i[:, :4]])


def test_scann_recall_100k_clustered():
    d = 128
    x, _ = clustered(101_000, d, 1000, 4)
    db, q = x[:100_000], x[100_000:]  # same centres, queries not in db
    t = time.time()
    index = ScaNNIndex(db, k=10)
    build = time.time() - t
    got, _ = index.search_indices(q, 10)
    want, _ = BruteForceIndex(db).search_indices(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)])
    assert recall >= 0.95, (recall, build)


def test_retrieval_metrics_scann_mode():
    x, y = clustered(3000, 16, 30, 5, noise=0.6)
    ex = retrieval_metrics(x, y, ks=(1, 4))
    ap = retrieval_metrics(x, y, ks=(1, 4), method="scann", scann_sample=200)
    assert ap["index_recall@10"] == pytest.approx(1.0)  # brute-force scorer
    for key in ("recall@1", "recall@4", "precision@1", "r_precision", "map@r"):
        assert ap[key] == pytest.approx(ex[key], abs=1e-6), key
    assert ap["num_queries"] == ex["num_queries"]
    # A sample of queries against the whole set (self excluded by id).
    pick = np.arange(0, 3000, 7)
    ex_s = retrieval_metrics(x[pick], y[pick], x, y, query_ids=pick)
    ap_s = retrieval_metrics(
        x[pick], y[pick], x, y, query_ids=pick, method="scann"
    )
    assert ap_s["num_queries"] == ex_s["num_queries"] == len(pick)
    for key in ("recall@1", "recall@4", "r_precision", "map@r"):
        assert ap_s[key] == pytest.approx(ex_s[key], abs=1e-6), key


def test_missing_scann_gives_clear_error(monkeypatch):
    for name in list(sys.modules):
        if name == "scann" or name.startswith("scann."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "scann", None)
    with pytest.raises(ImportError, match="pip install scann"):
        import_scann_ops()
