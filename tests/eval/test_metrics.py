"""retrieval_metrics vs a NumPy float64 full-sort reference."""

import numpy as np
import pytest

from tfdml.eval import metrics_from_neighbors
from tfdml.eval import nmi_ami
from tfdml.eval import retrieval_metrics


def reference(
    q,
    ql,
    r=None,
    rl=None,
    ks=(1, 2, 4, 8),
    exclude_self=None,
    normalize=True,
    query_ids=None,
):
    """Full sort in float64; order = (score desc, reference index asc).

    Query i's own reference (excluded) is ``query_ids[i]``, or ``i`` with
    ``exclude_self``.
    """
    own = r is None
    if exclude_self is None:
        exclude_self = own
    if query_ids is None:
        query_ids = np.arange(len(q)) if exclude_self else np.full(len(q), -1)
    if own:
        r, rl = q, ql
    relevant = np.asarray(rl)[None, :] == np.asarray(ql)[:, None]
    return brute_force(q, r, relevant, query_ids, ks, normalize)


def brute_force(q, r, relevant, query_ids, ks=(1, 2, 4, 8), normalize=True):
    """``relevant[i, j]``: reference j is relevant to query i. Query i's own
    reference ``query_ids[i]`` (-1: none) is left out of the ranking. Order:
    (score desc, reference index asc)."""
    q = np.asarray(q, np.float64)
    r = np.asarray(r, np.float64)
    if normalize:
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        r = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
    per = {f"recall@{k}": [] for k in ks}
    for key in ("precision@1", "r_precision", "map@r", "map", "mrr"):
        per[key] = []
    excluded = 0
    for i in range(len(q)):
        s = r @ q[i]
        cand = [j for j in range(len(r)) if j != query_ids[i]]
        cand.sort(key=lambda j: (-s[j], j))
        rel = np.array([bool(relevant[i, j]) for j in cand], bool)
        big_r = int(rel.sum())
        if big_r == 0:
            excluded += 1
            continue
        for k in ks:
            per[f"recall@{k}"].append(rel[:k].any())
        per["precision@1"].append(rel[0])
        per["r_precision"].append(rel[:big_r].sum() / big_r)
        prec = np.cumsum(rel) / np.arange(1, len(rel) + 1)
        per["map@r"].append((prec[:big_r] * rel[:big_r]).sum() / big_r)
        per["map"].append((prec * rel).sum() / big_r)
        per["mrr"].append(1.0 / (np.argmax(rel) + 1))
    out = {k: float(np.mean(v)) if v else float("nan") for k, v in per.items()}
    out["num_queries"] = len(q) - excluded
    out["num_excluded"] = excluded
    return out


def assert_same(got, want):
    assert set(got) == set(want), (set(got), set(want))
    for k, v in want.items():
        if isinstance(v, int):
            assert got[k] == v, (k, got[k], v)
        else:
            np.testing.assert_allclose(
                got[k], v, rtol=1e-9, atol=1e-12, err_msg=k
            )


def clustered(seed, n, classes, dim, noise=1.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    c = rng.normal(size=(classes, dim))
    x = c[y] + noise * rng.normal(size=(n, dim))
    return x.astype(np.float32), y


@pytest.mark.parametrize(
    "block,ref_block,sparse_limit",
    [
        (1024, 32768, 1 << 24),
        (7, 13, 1 << 24),
        (1, 5, 1 << 24),
        (7, 13, 0),
        (1024, 32768, 0),
        (16, 40, 60),
    ],
)
def test_random_self_retrieval(block, ref_block, sparse_limit):
    # sparse_limit 0: every chunk takes the dense path; 60: a mix.
    x, y = clustered(0, 97, 9, 6, noise=1.5)
    got = retrieval_metrics(
        x,
        y,
        ks=(1, 3, 5, 50),
        block_size=block,
        ref_block_size=ref_block,
        sparse_limit=sparse_limit,
    )
    assert_same(got, reference(x, y, ks=(1, 3, 5, 50)))
    assert 0 < got["map"] < 1


def test_query_differs_from_reference_and_k_larger_than_class():
    q, ql = clustered(1, 40, 6, 5)
    r, rl = clustered(2, 71, 8, 5)  # classes 6, 7 only in refs
    ql[:3] = 99  # no reference of this label -> excluded
    ks = (1, 2, 30, 100)
    want = reference(q, ql, r, rl, ks=ks)
    assert want["num_excluded"] == 3
    for limit in (0, 1 << 24):
        got = retrieval_metrics(
            q,
            ql,
            r,
            rl,
            ks=ks,
            block_size=9,
            ref_block_size=10,
            sparse_limit=limit,
        )
        assert_same(got, want)


def test_ties_and_duplicates_dyadic():
    # Entries in {-1, 0, 1}: dot products are exact in float32 and float64,
    # so the tie order (lower reference index first) is fully tested.
    rng = np.random.default_rng(3)
    x = rng.integers(-1, 2, size=(60, 3)).astype(np.float32)
    x[x.sum(1) == 0] = [1, 0, 0]  # no zero vectors
    x[np.abs(x).sum(1) == 0] = [1, 0, 0]
    y = rng.integers(0, 4, 60)
    want = reference(x, y, normalize=False)
    for limit in (0, 1 << 24):
        got = retrieval_metrics(
            x,
            y,
            normalize=False,
            block_size=8,
            ref_block_size=11,
            sparse_limit=limit,
        )
        assert_same(got, want)
    # Many exact ties exist, and they change the result if broken otherwise.
    s = x @ x.T
    assert np.sum(s[0] == s[0][:, None]) > 60
    r2, l2 = x[::-1].copy(), y[::-1].copy()
    assert_same(
        retrieval_metrics(x, y, r2, l2, normalize=False, block_size=5),
        reference(x, y, r2, l2, normalize=False),
    )
    # All-identical embeddings: the ranking is pure index order.
    same = np.ones((10, 4), np.float32)
    lab = np.array([0, 1, 0, 1, 1, 0, 2, 2, 0, 1])
    for limit in (0, 1 << 24):
        assert_same(
            retrieval_metrics(
                same, lab, block_size=3, ref_block_size=4, sparse_limit=limit
            ),
            reference(same, lab),
        )


@pytest.mark.parametrize("unroll_limit", [0, 64])
def test_dense_kernels_agree_with_reference(monkeypatch, unroll_limit):
    # unroll_limit 0: the dense path bins scores with tf.searchsorted;
    # 64: with the unrolled XLA comparison kernel. Ties included (dyadic).
    from tfdml.eval import metrics as m

    monkeypatch.setattr(m, "_UNROLL_LIMIT", unroll_limit)
    rng = np.random.default_rng(5)
    x = rng.integers(-1, 2, size=(50, 3)).astype(np.float32)
    x[np.abs(x).sum(1) == 0] = [1, 0, 0]
    y = rng.integers(0, 3, 50)
    r, rl = x[::-1].copy(), y[::-1].copy()
    for args in ((x, y), (x, y, r, rl)):
        got = retrieval_metrics(
            *args,
            normalize=False,
            block_size=6,
            ref_block_size=9,
            sparse_limit=0,
        )
        assert_same(got, reference(*args, normalize=False))


def test_lone_labels_and_all_excluded():
    x, _ = clustered(4, 12, 3, 4)
    lone = np.arange(12)
    got = retrieval_metrics(x, lone)
    assert got["num_queries"] == 0 and got["num_excluded"] == 12
    assert np.isnan(got["map@r"])
    y = np.array([0, 0, 0, 1, 2, 3, 1, 1, 4, 5, 6, 6])
    assert_same(
        retrieval_metrics(x, y, ks=(1, 20)), reference(x, y, ks=(1, 20))
    )


def test_exclude_self_with_reference_set_of_other_labels():
    q, ql = clustered(5, 30, 4, 5)
    r = q + 0.01
    rl = ql.copy()
    rl[::4] = (rl[::4] + 1) % 4  # reference i may have another label
    want = reference(q, ql, r, rl, exclude_self=True)
    for limit in (0, 1 << 24):
        got = retrieval_metrics(
            q, ql, r, rl, exclude_self=True, sparse_limit=limit
        )
        assert_same(got, want)


def test_perfect_and_known_values():
    y = np.repeat(np.arange(3), 4)
    x = np.eye(3, dtype=np.float32)[y] + 0.0
    x += np.arange(12)[:, None] * 1e-3 * np.array([[0.1, 0.2, 0.3]])
    got = retrieval_metrics(x, y)
    for key in (
        "recall@1",
        "precision@1",
        "r_precision",
        "map@r",
        "map",
        "mrr",
    ):
        assert got[key] == pytest.approx(1.0), key
    # One query whose only relevant item is ranked 3rd.
    nb = np.array([[1, 1, 0, 1]])
    m = metrics_from_neighbors(nb, np.array([0]), np.array([1]), ks=(1, 2, 4))
    assert m["recall@2"] == 0 and m["recall@4"] == 1
    assert m["mrr"] == pytest.approx(1 / 3)
    assert m["map"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("limit", [0, 1 << 24])
def test_query_sample_of_the_references(limit):
    # A sample of the set scored against the whole set: with query_ids the
    # sample's rows equal those of the full self-retrieval.
    x, y = clustered(8, 90, 7, 5, noise=1.2)
    pick = np.array([3, 17, 0, 88, 41, 41, 60])
    want = reference(x[pick], y[pick], x, y, query_ids=pick)
    got = retrieval_metrics(
        x[pick],
        y[pick],
        x,
        y,
        query_ids=pick,
        block_size=3,
        ref_block_size=20,
        sparse_limit=limit,
    )
    assert_same(got, want)
    # Without the ids the query finds itself first: a different answer.
    plain = retrieval_metrics(x[pick], y[pick], x, y)
    assert plain["precision@1"] == 1.0 != got["precision@1"]
    # A singleton class in the sample: its query has no other reference.
    y2 = y.copy()
    y2[17] = 100
    got2 = retrieval_metrics(x[pick], y2[pick], x, y2, query_ids=pick)
    assert got2["num_excluded"] == 1
    assert_same(got2, reference(x[pick], y2[pick], x, y2, query_ids=pick))


def test_query_ids_bad_input():
    x, y = clustered(6, 10, 2, 3)
    with pytest.raises(ValueError, match="query_ids.*shape"):
        retrieval_metrics(x[:3], y[:3], x, y, query_ids=[0, 1])
    with pytest.raises(ValueError, match=r"query_ids.*\[0, 10\)"):
        retrieval_metrics(x[:2], y[:2], x, y, query_ids=[0, 10])
    with pytest.raises(ValueError, match="query_ids.*integer"):
        retrieval_metrics(x[:2], y[:2], x, y, query_ids=[0.0, 1.0])
    with pytest.raises(ValueError, match="exclude_self=False"):
        retrieval_metrics(
            x[:2], y[:2], x, y, query_ids=[0, 1], exclude_self=False
        )
    with pytest.raises(ValueError, match="query_ids"):
        retrieval_metrics(x[:2], y[:2], x, y, exclude_self=True)


def test_bad_input():
    x, y = clustered(6, 10, 2, 3)
    with pytest.raises(ValueError, match="query_embeddings"):
        retrieval_metrics(x[0], y)
    with pytest.raises(ValueError, match="query_labels"):
        retrieval_metrics(x, y[:5])
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(x, y, ks=(0,))
    with pytest.raises(ValueError, match="ref_labels"):
        retrieval_metrics(x, y, ref_embeddings=x)
    with pytest.raises(ValueError, match="method"):
        retrieval_metrics(x, y, method="faiss")
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.full((3, 2), np.nan), [0, 0, 1])


def test_nmi_ami():
    x, y = clustered(7, 200, 4, 8, noise=0.05)
    m = nmi_ami(x, y, seed=0)
    assert m["nmi"] > 0.95 and m["ami"] > 0.95
    rng = np.random.default_rng(0)
    m2 = nmi_ami(rng.normal(size=(200, 8)), y, seed=0)
    assert m2["nmi"] < 0.2
    with pytest.raises(ValueError, match="n_clusters"):
        nmi_ami(x, y, n_clusters=0)


# -- the top-R path (metrics without map / mrr) ------------------------------

TOP = ("recall", "precision@1", "r_precision", "map@r")


def _top_cases():
    x, y = clustered(0, 97, 9, 6, noise=1.5)
    yield (x, y), dict(ks=(1, 3, 5, 50)), {}
    q, ql = clustered(1, 40, 6, 5)
    r, rl = clustered(2, 71, 8, 5)
    ql[:3] = 99
    yield (q, ql, r, rl), dict(ks=(1, 2, 30, 100)), {}
    rng = np.random.default_rng(3)
    d = rng.integers(-1, 2, size=(60, 3)).astype(np.float32)
    d[np.abs(d).sum(1) == 0] = [1, 0, 0]
    dl = rng.integers(0, 4, 60)
    yield (d, dl), dict(normalize=False), {}
    yield (d, dl, d[::-1].copy(), dl[::-1].copy()), dict(normalize=False), {}
    same = np.ones((10, 4), np.float32)
    yield (same, np.array([0, 1, 0, 1, 1, 0, 2, 2, 0, 1])), {}, {}
    x, y = clustered(8, 90, 7, 5, noise=1.2)
    pick = np.array([3, 17, 0, 88, 41, 41, 60])
    yield (x[pick], y[pick], x, y), {}, dict(query_ids=pick)
    q, ql = clustered(5, 30, 4, 5)
    rl = ql.copy()
    rl[::4] = (rl[::4] + 1) % 4
    yield (q, ql, q + 0.01, rl), {}, dict(exclude_self=True)
    x, _ = clustered(4, 12, 3, 4)
    yield (x, np.array([0, 0, 0, 1, 2, 3, 1, 1, 4, 5, 6, 6])), {}, {}


@pytest.mark.parametrize(
    "group,chunk",
    [
        (1, None),
        (2, None),
        (3, None),
        (16, None),
        (2, 1),
        (3, 7),
        (16, 40),
        (2, 24),
        (3, 60),
    ],
)
@pytest.mark.parametrize("block", [1024, 5])
def test_top_path_matches_reference(monkeypatch, group, chunk, block):
    # group > 1: the grouped selection (every case large enough for it);
    # the dyadic cases hold many exact ties across group boundaries.
    # chunk: references scored in chunks of that many (rounded down to a
    # multiple of the group, at least one group), each keeping its own best
    # groups (one group per chunk with (2, 1)).
    from tfdml.eval import metrics as m

    monkeypatch.setattr(m, "_TOPK_GROUP", group)
    monkeypatch.setattr(m, "_TOPK_MIN_RATIO", 1)
    monkeypatch.setattr(m, "_REF_CHUNK", chunk)
    for args, common, extra in _top_cases():
        want = reference(*args, **common, **extra)
        got = retrieval_metrics(
            *args, **common, **extra, metrics=TOP, block_size=block
        )
        want = {k: v for k, v in want.items() if k not in ("map", "mrr")}
        assert_same(got, want)


@pytest.mark.parametrize("group,chunk", [(2, 40), (4, 64), (3, 33)])
def test_top_path_chunks_keep_the_rows_best_groups(monkeypatch, group, chunk):
    # Many references, small R: every chunk has more groups than the k + 1
    # it keeps, so each chunk's selection and the choice among the kept
    # groups both run (and the kept groups' ids must be global). The dyadic
    # set ties exactly across chunk boundaries; the query subset is scored
    # against all references (query != reference positions).
    from tfdml.eval import metrics as m

    monkeypatch.setattr(m, "_TOPK_GROUP", group)
    monkeypatch.setattr(m, "_TOPK_MIN_RATIO", 1)
    monkeypatch.setattr(m, "_REF_CHUNK", chunk)
    x, y = clustered(21, 301, 60, 8, noise=0.8)
    rng = np.random.default_rng(5)
    d = rng.integers(-1, 2, size=(301, 3)).astype(np.float32)
    d[np.abs(d).sum(1) == 0] = [0, 1, 0]
    dl = rng.integers(0, 50, 301)
    pick = np.array([0, 5, 150, 299, 300, 77])
    cases = [
        ((x, y), {}, {}),
        ((d, dl), dict(normalize=False), {}),
        ((x[pick], y[pick], x, y), {}, dict(query_ids=pick)),
        ((d[pick], dl[pick], d[::-1].copy(), dl[::-1].copy()), {}, {}),
    ]
    for args, common, extra in cases:
        want = reference(*args, **common, **extra)
        got = retrieval_metrics(*args, **common, **extra, metrics=TOP)
        assert_same(got, {k: v for k, v in want.items() if k in got})


def test_top_path_chunk_order_and_full_chunk(monkeypatch):
    # Hand-built, groups of 2, chunks of 12 references (6 groups, 4 kept).
    # 1) An exact tie at rank R = 3: reference 1 (relevant, group 0) and 5
    # (not, group 2, whose maximum is larger): the lower index ranks first
    # only if each chunk keeps its groups in index order (r_precision 2/3;
    # 1/3 with group 2 first).
    # 2) The top k all in one chunk, one per group: the chunk must keep
    # k + 1 groups, not fewer.
    from tfdml.eval import metrics as m

    monkeypatch.setattr(m, "_TOPK_GROUP", 2)
    monkeypatch.setattr(m, "_TOPK_MIN_RATIO", 1)
    monkeypatch.setattr(m, "_REF_CHUNK", 12)
    s = np.full(24, -0.5)
    s[6:] -= 0.01 * np.arange(18)
    s[[0, 1, 2, 3, 4, 5, 10]] = [0.1, 0.5, 0.9, 0.1, 0.8, 0.5, -0.9]
    rl = np.full(24, 2)
    rl[[1, 4, 10]] = 1
    r = np.stack([s, np.zeros(24)], 1).astype(np.float32)
    q = np.array([[1.0, 0.0]], np.float32)
    got = retrieval_metrics(
        q, [1], r, rl, normalize=False, metrics=("r_precision",)
    )
    assert got["r_precision"] == pytest.approx(2 / 3)
    want = reference(q, [1], r, rl, normalize=False)
    assert want["r_precision"] == pytest.approx(2 / 3)

    # 48 references; the 8 relevant ones at 0, 2, ..., 14 (8 groups of
    # chunk 0) score highest: R = 8, so chunk 0 must keep 9 of its groups.
    monkeypatch.setattr(m, "_REF_CHUNK", 24)
    s = -0.5 - 0.001 * np.arange(48)
    s[0:16:2] = 1.0 - 0.01 * np.arange(8)
    rl = np.full(48, 2)
    rl[0:16:2] = 1
    r = np.stack([s, np.zeros(48)], 1).astype(np.float32)
    got = retrieval_metrics(
        q, [1], r, rl, normalize=False, metrics=("r_precision", "map@r")
    )
    assert got["r_precision"] == 1.0 and got["map@r"] == 1.0


def test_top_path_is_used_and_agrees_with_the_rank_path(monkeypatch):
    # Default settings on a set large enough for the grouped selection:
    # the shared metrics are identical; map / mrr take the rank path.
    from tfdml.eval import metrics as m

    x, y = clustered(11, 3000, 40, 16, noise=1.0)
    calls = []
    real = m._ranks_exact
    monkeypatch.setattr(
        m, "_ranks_exact", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    top = retrieval_metrics(x, y, metrics=TOP)
    assert not calls
    full = retrieval_metrics(x, y)
    assert calls
    assert 0.05 < top["map@r"] < 0.95
    # Equal up to float32 rounding: the two paths form the scores with
    # differently blocked products, and which of two scores 1 ulp apart
    # ranks first depends on the CPU's kernels (an AVX2 machine moved MAP@R
    # by 7e-8 where an AVX-512 one gave identical values).
    for key, v in top.items():
        assert full[key] == pytest.approx(v, rel=1e-5, abs=1e-6), key
    only = retrieval_metrics(x, y, metrics=("map", "recall@3"))
    assert set(only) == {"map", "recall@3", "num_queries", "num_excluded"}
    assert only["map"] == full["map"]


def test_metrics_names():
    x, y = clustered(6, 30, 3, 4)
    got = retrieval_metrics(x, y, ks=(2, 5), metrics=["recall", "map@r"])
    assert set(got) == {
        "recall@2",
        "recall@5",
        "map@r",
        "num_queries",
        "num_excluded",
    }
    got = retrieval_metrics(x, y, metrics="recall@7")
    assert set(got) == {"recall@7", "num_queries", "num_excluded"}
    for bad in ("map@", "recall@0", "recall@x", "ndcg"):
        with pytest.raises(ValueError, match="metrics"):
            retrieval_metrics(x, y, metrics=[bad])
    with pytest.raises(ValueError, match="metrics"):
        retrieval_metrics(x, y, metrics=[])


@pytest.mark.parametrize("chunk", [None, 12, 21])
def test_top_path_padding_group_takes_no_needed_slot(monkeypatch, chunk):
    # 40 references in groups of 3: the last group is 1 reference and 2
    # padding rows, which score 0 and beat every (negative) real score. The
    # top 5 lie in 5 different groups, so the padding group must not take
    # one of their slots: the relevant reference is the 5th best.
    from tfdml.eval import metrics as m

    monkeypatch.setattr(m, "_TOPK_GROUP", 3)
    monkeypatch.setattr(m, "_TOPK_MIN_RATIO", 1)
    monkeypatch.setattr(m, "_REF_CHUNK", chunk)
    i = np.arange(40)
    score = np.where(i % 3 == 0, -1.0 - 0.001 * i, -5.0)
    r = np.stack([score, np.zeros(40)], 1).astype(np.float32)
    rl = np.where(i == 12, 1, 2)
    q = np.array([[1.0, 0.0]], np.float32)
    got = retrieval_metrics(
        q, [1], r, rl, normalize=False, metrics=("recall@5", "recall@4")
    )
    want = reference(q, [1], r, rl, ks=(4, 5), normalize=False)
    assert want["recall@5"] == 1.0 and want["recall@4"] == 0.0
    assert got["recall@5"] == 1.0 and got["recall@4"] == 0.0


def test_top_path_blocks_share_one_shape(monkeypatch):
    # A query count that is not a multiple of the block size: the last block
    # is padded, so every block has the same shape and a fresh process
    # traces the selection once (a shorter last block traced it twice).
    from tfdml.eval import metrics as m

    x, y = clustered(3, 23, 4, 5)
    shapes = []
    real = m._topk_block
    monkeypatch.setattr(
        m,
        "_topk_block",
        lambda q, *a: shapes.append(tuple(q.shape)) or real(q, *a),
    )
    got = retrieval_metrics(x, y, metrics=TOP, block_size=5)
    assert len(shapes) == 5 and len(set(shapes)) == 1, shapes
    want = reference(x, y)
    assert_same(got, {k: v for k, v in want.items() if k in got})
