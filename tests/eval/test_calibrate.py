"""tfdml.eval.calibrate against a brute-force threshold sweep in NumPy, and
the exported SavedModel's ``matched`` flag."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import tiny_encoder
from tfdml.eval import calibrate
from tfdml.eval import plots
from tfdml.eval import precision_recall_at


def _data(seed=0, n=60, classes=5, d=8, noise=0.9):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centers = rng.normal(size=(classes, d))
    x = centers[y] + noise * rng.normal(size=(n, d))
    return x.astype(np.float32), y


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_pairs(q, ql, r=None, rl=None):
    """Every (query, reference) pair; every unordered pair {i, j}, i != j,
    once when r is None."""
    own = r is None
    r, rl = (q, ql) if own else (r, rl)
    s = _unit(q) @ _unit(r).T
    rel = ql[:, None] == rl[None, :]
    keep = np.triu(np.ones(s.shape, bool), 1) if own else np.ones(s.shape, bool)
    return s[keep], rel[keep]


def _brute_nearest(q, ql):
    s = _unit(q) @ _unit(q).T
    np.fill_diagonal(s, -np.inf)
    nb = np.argmax(s, axis=1)
    return s[np.arange(len(q)), nb], ql == ql[nb]


def _sweep(scores, rel, target=None):
    """Brute force: every distinct score as threshold, predict s >= t."""
    best = None
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & rel)
        p, r = tp / pred.sum(), tp / rel.sum()
        f = 2 * p * r / (p + r) if p + r else 0.0
        if target is not None:
            if p >= target and (best is None or t < best[0]):
                best = (t, p, r, f)
        elif best is None or f >= best[3]:  # ties: highest threshold
            best = (t, p, r, f)
    return best


def _check(res, expected):
    t, p, r, f = expected
    np.testing.assert_allclose(res.threshold, t, rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        [res.precision, res.recall, res.f1], [p, r, f], rtol=1e-6
    )


@pytest.mark.parametrize("target", [None, 0.3, 0.6, 0.9])
def test_pairs_match_brute_force_sweep(target):
    x, y = _data()
    scores, rel = _brute_pairs(x, y)
    expected = _sweep(scores, rel, target)
    res = calibrate(x, y, target_precision=target)
    _check(res, expected)
    assert res.num_pairs == len(x) * (len(x) - 1) // 2
    assert res.num_positive == rel.sum()
    assert not res.sampled
    assert res.mode == "pairs" and res.target_precision == target
    # The curve is the brute-force curve at every threshold.
    for t, p, r in zip(res.thresholds, res.precisions, res.recalls):
        pred = scores >= t - 1e-12
        tp = np.sum(pred & rel)
        assert p == pytest.approx(tp / pred.sum(), rel=1e-6)
        assert r == pytest.approx(tp / rel.sum(), rel=1e-6)


def test_separate_references_keep_every_pair():
    x, y = _data(1)
    r, rl = _data(2, n=40)
    expected = _sweep(*_brute_pairs(x, y, r, rl))
    res = calibrate(x, y, r, rl)
    _check(res, expected)
    assert res.num_pairs == len(x) * len(r)


@pytest.mark.parametrize("target", [None, 0.9])
def test_nearest_matches_brute_force(target):
    x, y = _data(3, n=80, noise=1.2)
    scores, rel = _brute_nearest(x, y)
    expected = _sweep(scores, rel, target)
    res = calibrate(x, y, target_precision=target, mode="nearest")
    _check(res, expected)
    assert res.num_pairs == len(x)


def test_sampled_pairs_match_brute_force_sample():
    """Above max_pairs: the sweep on a seeded sample of distinct unordered
    pairs (row-major i < j order, as np.triu_indices lists them)."""
    x, y = _data(4, n=50)
    full_s, full_rel = _brute_pairs(x, y)  # row-major upper triangle
    res = calibrate(x, y, max_pairs=500, seed=3, block_size=7)
    assert res.sampled and res.num_pairs == 500
    pick = np.sort(
        np.random.default_rng(3).choice(len(full_s), 500, replace=False)
    )
    _check(res, _sweep(full_s[pick], full_rel[pick]))
    assert res.num_positive == full_rel[pick].sum()
    # Another seed, another sample; the same seed, the same one.
    assert calibrate(x, y, max_pairs=500, seed=3).threshold == res.threshold
    other = calibrate(x, y, max_pairs=500, seed=4)
    assert not np.array_equal(other.thresholds, res.thresholds)
    # Separate references: all Q x N pairs, row-major.
    r, rl = _data(6, n=30)
    s2, rel2 = _brute_pairs(x, y, r, rl)
    res2 = calibrate(x, y, r, rl, max_pairs=700, seed=1)
    pick2 = np.sort(
        np.random.default_rng(1).choice(len(s2), 700, replace=False)
    )
    _check(res2, _sweep(s2[pick2], rel2[pick2]))


def test_precision_recall_at_matches_brute_force():
    x, y = _data(5)
    scores, rel = _brute_pairs(x, y)
    t = float(np.quantile(scores, 0.8))
    pred = scores >= t
    tp = np.sum(pred & rel)
    out = precision_recall_at(t, x, y)
    assert out["precision"] == pytest.approx(tp / pred.sum(), rel=1e-6)
    assert out["recall"] == pytest.approx(tp / rel.sum(), rel=1e-6)
    assert np.isnan(precision_recall_at(1.5, x, y)["precision"])


def test_errors_name_the_argument():
    x, y = _data()
    with pytest.raises(ValueError, match="target_precision"):
        calibrate(x, y, target_precision=0.0)
    with pytest.raises(ValueError, match="target_precision"):
        calibrate(x, y, target_precision=float("nan"))
    with pytest.raises(ValueError, match="mode"):
        calibrate(x, y, mode="all")
    with pytest.raises(ValueError, match="metric"):
        calibrate(x, y, metric="accuracy")
    with pytest.raises(ValueError, match="max_pairs"):
        calibrate(x, y, max_pairs=0)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="query_embeddings"):
        calibrate(bad, y)
    with pytest.raises(ValueError, match="query_labels"):
        calibrate(x, y[:-1])
    with pytest.raises(ValueError, match="no relevant"):
        calibrate(x, np.arange(len(x)))  # one item per class
    with pytest.raises(ValueError, match="no irrelevant"):
        calibrate(x, np.zeros(len(x), int))  # a single class
    # Unreachable precision: identical embeddings, two classes.
    same = np.ones((6, 4), np.float32)
    with pytest.raises(ValueError, match="target_precision.*highest"):
        calibrate(same, np.array([0, 0, 0, 1, 1, 1]), target_precision=0.9)
    # ... a ValueError subclass that carries what was reachable.
    from tfdml.eval import PrecisionUnreachableError

    with pytest.raises(PrecisionUnreachableError) as e:
        calibrate(same, np.array([0, 0, 0, 1, 1, 1]), target_precision=0.9)
    # 15 tied pairs, 6 same-class: one point, precision 0.4 at score 1.
    assert e.value.target_precision == 0.9
    assert e.value.best_precision == pytest.approx(0.4)
    assert e.value.best_threshold == pytest.approx(1.0)


def test_precision_recall_plot(tmp_path):
    x, y = _data()
    res = calibrate(x, y, target_precision=0.8)
    path = plots.plot_precision_recall(res, tmp_path / "pr" / "pr.png")
    assert os.path.getsize(path) > 1000
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    json.dumps(res.to_dict(curve=True))  # JSON-ready


def test_exported_matched_flag(tmp_path):
    """Reloaded SavedModel: matched == (score >= threshold) per neighbour,
    absent without a threshold."""
    from tfdml.export import export_saved_model

    h, w, c, d = 8, 8, 3, 6
    enc = tiny_encoder(h, w, c, d)
    rng = np.random.default_rng(0)
    gallery = rng.random((20, h, w, c)).astype(np.float32)
    gal = np.asarray(enc(gallery)["embeddings"])
    labels = np.arange(20) % 4
    # A threshold inside the query scores (the encoder's weights are random,
    # so a calibrated one could sit below every score).
    thr = float(np.median(gal[:6] @ gal.T))
    written = export_saved_model(
        enc,
        str(tmp_path / "m"),
        database=gal,
        database_labels=labels,
        k=5,
        threshold=thr,
    )
    m = tf.saved_model.load(written["brute_force"])
    q = tf.constant(gal[:6])
    out = m.signatures["search"](embeddings=q, k=tf.constant(20))
    scores, matched = out["scores"].numpy(), out["matched"].numpy()
    assert matched.dtype == bool and matched.shape == (6, 20)
    np.testing.assert_array_equal(matched, scores >= np.float32(thr))
    assert matched.any() and not matched.all()  # the flag is informative
    assert (
        float(m.signatures["search_default"](embeddings=q)["matched"].shape[1])
        == 5
    )
    img = m.signatures["embed_and_search_default"](images=gallery[:2])
    assert img["matched"].dtype == tf.bool
    plain = export_saved_model(
        enc, str(tmp_path / "p"), database=gal, database_labels=labels, k=5
    )
    m2 = tf.saved_model.load(plain["brute_force"])
    assert "matched" not in m2.signatures["search"](
        embeddings=q, k=tf.constant(3)
    )
    for bad in (1.5, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="threshold"):
            export_saved_model(
                enc, str(tmp_path / "b"), database=gal, threshold=bad
            )


def test_f1_tie_goes_to_the_highest_threshold():
    # Scores 0.9 (relevant), 0.8, 0.7, 0.6 (relevant): F1 = 2TP / (predicted
    # + relevant) is 2/3 at t = 0.9 and at t = 0.6.
    cos = np.array([0.9, 0.8, 0.7, 0.6])
    refs = np.stack([cos, np.sqrt(1 - cos**2)], 1).astype(np.float32)
    q = np.array([[1.0, 0.0]], np.float32)
    labels = np.array([0, 1, 1, 0])
    res = calibrate(q, [0], refs, labels)
    assert res.f1 == pytest.approx(2 / 3)
    assert res.threshold == pytest.approx(0.9)
    assert (res.precision, res.recall) == (1.0, 0.5)
    _check(res, _sweep(*_brute_pairs(q, np.array([0]), refs, labels)))


def test_nearest_needs_a_reference_other_than_the_query_itself():
    # One item against itself has no nearest match: both entry points say
    # so (precision_recall_at used to score the excluded self pair).
    x = np.ones((1, 4), np.float32)
    with pytest.raises(ValueError, match="at least one reference"):
        calibrate(x, [0], mode="nearest")
    with pytest.raises(ValueError, match="at least one reference"):
        precision_recall_at(0.5, x, [0], mode="nearest")
