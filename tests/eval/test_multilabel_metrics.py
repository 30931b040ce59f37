"""retrieval_metrics with multi-hot labels [N, C] (relevant iff the label
sets intersect) and an explicit [Nq, Nr] relevance matrix, vs a NumPy
float64 full-sort brute force."""

import numpy as np
import pytest

from tests.eval.test_metrics import brute_force
from tfdml.eval import retrieval_metrics

ALL = ("precision@1", "r_precision", "map@r", "map", "mrr")


def intersect(a, b):
    return (np.asarray(a, int) @ np.asarray(b, int).T) > 0


def assert_same(got, want, names=None):
    if names is not None:
        keep = {"num_queries", "num_excluded"} | set(names)
        if "recall" in names:
            keep |= {f"recall@{k}" for k in (1, 2, 4, 8)}
        want = {k: v for k, v in want.items() if k in keep}
    assert set(got) == set(want), (set(got), set(want))
    for k, v in want.items():
        if isinstance(v, int):
            assert got[k] == v, (k, got[k], v)
        else:
            np.testing.assert_allclose(
                got[k], v, rtol=1e-9, atol=1e-12, err_msg=k
            )


def multi_hot_set(seed, n, classes=6, dim=6, empty=2):
    """Embeddings near the sum of their labels' centres; 1-3 labels per
    row, ``empty`` rows without labels (R = 0: excluded queries)."""
    rng = np.random.default_rng(seed)
    y = np.zeros((n, classes), np.int64)
    for i in range(n):
        y[i, rng.choice(classes, rng.integers(1, 4), replace=False)] = 1
    y[rng.choice(n, empty, replace=False)] = 0
    centers = rng.normal(size=(classes, dim))
    x = y @ centers * 0.6 + rng.normal(size=(n, dim))
    return x.astype(np.float32), y


@pytest.mark.parametrize("names", [None, ("recall", "map@r", "r_precision")])
@pytest.mark.parametrize("block", [1024, 7])
def test_self_retrieval_multi_hot(names, block):
    x, y = multi_hot_set(0, 50)
    want = brute_force(x, x, intersect(y, y), np.arange(50))
    assert want["num_excluded"] >= 2
    got = retrieval_metrics(x, y, metrics=names, block_size=block)
    assert_same(got, want, names)
    # The same relevance as an explicit matrix gives the same numbers.
    got = retrieval_metrics(
        x, None, relevance=intersect(y, y), metrics=names, block_size=block
    )
    assert_same(got, want, names)


def test_overlap_not_equality_changes_the_metrics():
    """A multi-label metric that compared label *sets* for equality (or
    used only the first label) would give different numbers here."""
    x, y = multi_hot_set(1, 40, empty=0)
    got = retrieval_metrics(x, y)
    equal_sets = (y[:, None, :] == y[None, :, :]).all(-1)
    first = np.argmax(y, 1)
    for other in (equal_sets, first[:, None] == first[None, :]):
        alt = brute_force(x, x, other, np.arange(40))
        assert any(not np.isclose(got[k], alt[k]) for k in ALL if k in alt), (
            other
        )
    assert_same(got, brute_force(x, x, intersect(y, y), np.arange(40)))


def test_reference_set_query_ids_and_exclude_self():
    q, ql = multi_hot_set(2, 20)
    r, rl = multi_hot_set(3, 33)
    rel = intersect(ql, rl)
    for names in (None, ("precision@1", "map@r")):
        want = brute_force(q, r, rel, np.full(20, -1))
        assert_same(
            retrieval_metrics(q, ql, r, rl, metrics=names),
            want,
            names,
        )
        assert_same(
            retrieval_metrics(q, None, r, relevance=rel, metrics=names),
            want,
            names,
        )
    # Queries that are references 5..24 of the set: their own row left out.
    ids = np.arange(5, 25)
    want = brute_force(r[ids], r, intersect(rl[ids], rl), ids)
    assert_same(retrieval_metrics(r[ids], rl[ids], r, rl, query_ids=ids), want)
    # exclude_self=False: a query finds itself first.
    want = brute_force(q, q, intersect(ql, ql), np.full(20, -1))
    assert_same(retrieval_metrics(q, ql, exclude_self=False), want)
    assert want["precision@1"] == 1.0


def test_ties_dyadic_and_non_symmetric_relevance():
    rng = np.random.default_rng(4)
    x = rng.integers(-1, 2, size=(40, 3)).astype(np.float32)
    x[np.abs(x).sum(1) == 0] = [1, 0, 0]
    s = x @ x.T
    assert np.sum(s[0] == s[0][:, None]) > 40  # many exact ties
    rel = rng.random((40, 40)) < 0.2  # any relation, not symmetric
    want = brute_force(x, x, rel, np.arange(40), normalize=False)
    for names in (None, ("recall", "map@r")):
        got = retrieval_metrics(
            x, None, relevance=rel, normalize=False, block_size=6, metrics=names
        )
        assert_same(got, want, names)
    _, y = multi_hot_set(5, 40, classes=4)
    want = brute_force(x, x, intersect(y, y), np.arange(40), normalize=False)
    assert_same(
        retrieval_metrics(x, y.astype(bool), normalize=False, block_size=6),
        want,
    )


def test_one_hot_equals_integer_labels():
    x, _ = multi_hot_set(6, 45)
    labels = np.random.default_rng(6).integers(0, 5, 45)
    onehot = np.eye(5, dtype=np.int64)[labels]
    a = retrieval_metrics(x, labels)
    b = retrieval_metrics(x, onehot)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-9, err_msg=k)


def test_no_usable_query_and_empty():
    x, y = multi_hot_set(7, 10)
    got = retrieval_metrics(x, np.zeros_like(y))
    assert got["num_queries"] == 0 and got["num_excluded"] == 10
    assert np.isnan(got["map@r"])
    got = retrieval_metrics(x[:1], y[:1])  # one query, no other reference
    assert got["num_queries"] == 0 and np.isnan(got["precision@1"])


def test_bad_input():
    x, y = multi_hot_set(8, 12)
    r, rl = multi_hot_set(9, 9)
    with pytest.raises(ValueError, match="0 or 1"):
        retrieval_metrics(x, y * 2)
    with pytest.raises(ValueError, match="ref_labels"):
        retrieval_metrics(x, y, r, rl[:, :3])
    with pytest.raises(ValueError, match="ref_labels"):
        retrieval_metrics(x, y, r, np.arange(9))
    with pytest.raises(ValueError, match="query_labels"):
        retrieval_metrics(x, np.arange(12), r, rl)
    with pytest.raises(ValueError, match="relevance"):
        retrieval_metrics(x, None, relevance=intersect(y, y)[:, :5])
    with pytest.raises(ValueError, match="relevance"):
        retrieval_metrics(x, None, relevance=intersect(y, y).astype(int))
    with pytest.raises(ValueError, match="not both"):
        retrieval_metrics(x, y, relevance=intersect(y, y))
    with pytest.raises(ValueError, match="method"):
        retrieval_metrics(x, y, method="scann")
    with pytest.raises(ValueError, match="together"):
        retrieval_metrics(x, y, r)
