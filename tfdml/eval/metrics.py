"""Exact retrieval metrics for deep metric learning, computed in blocks.

Definitions (Musgrave et al., "A Metric Learning Reality Check", ECCV 2020):

* every query ranks the references by similarity (dot product of the
  L2-normalised embeddings, i.e. cosine, unless ``normalize=False``);
* the *relevant* references of a query are those with its label, itself
  excluded (by index, never by score) when queries are their own references;
  ``R`` is their number;
* ``recall@K``: 1 if any of the top K references is relevant (the DML
  "recall", i.e. hit rate), averaged over queries;
* ``precision@1``: the top reference is relevant (equals ``recall@1``);
* ``r_precision``: relevant references among the top R, divided by R;
* ``map@r``: ``1/R * sum_{i<=R} P(i) * rel(i)`` over the top R positions;
* ``map``: mean average precision over *all* R relevant references;
* ``mrr``: mean of ``1 / rank`` of the first relevant reference.

Queries with ``R = 0`` (their label has no other reference) are excluded from
every mean and counted in ``num_excluded``.

Relevance beyond one label: with multi-hot labels ``[N, C]`` a reference is
relevant iff its label set intersects the query's, and ``relevance=`` takes
any ``[Nq, Nr]`` bool matrix; ``R`` is then the number of relevant
references and the definitions above are unchanged (see
:func:`_relevance_metrics`: the top-R ranking below, or a full ranking for
``map`` / ``mrr``).

Ties: the ranking is ``(score descending, reference index ascending)``, the
order ``tf.math.top_k`` uses. Two scores tie only when their float32 values
are bit-identical.

Algorithm (exact, no ``N x N`` matrix): for a block of queries the scores of
the relevant references are gathered (the members of the query's class) and
sorted; then the reference set is streamed in chunks and every *negative*
reference scoring at least the query's lowest relevant score is placed among
the sorted relevant scores: by ``tf.searchsorted`` on the gathered few when
they are few (a trained embedding), or, when they are many, by one fused XLA
kernel that compares every score of the chunk with the query's R relevant
scores; a ``bincount`` of these positions, accumulated over chunks, gives
the exact rank of every relevant reference (the ranks give every metric,
``map`` and ``mrr`` included, which a top-k list could not). Memory is
``O(query_block * (ref_block + R_max * d))`` plus the inputs.

Top-R path (``metrics`` without ``map`` and ``mrr``): ``recall@K``,
``precision@1``, ``r_precision`` and ``map@r`` only look at each query's
first ``k = max(R_max, K_max)`` references, so the exact top k (same tie
rule) is enough: per block of queries the scores against all references are
cut into groups of 16 consecutive references, the ``k + 1`` groups with the
largest maxima are kept (they hold the top k) and only their scores are
ranked. The references are scored in chunks (a block of 1,024 queries
against 65,536 references at a time: 2**26 scores, 256 MB); each chunk keeps
its own ``k + 1`` best groups and the row's best are chosen among the kept
ones. Cost: the matrix product, one max pass and a top-k over ``N / 16``
columns; no compilation. Memory ``O(query_block * min(N, chunk))``.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import tensorflow as tf

_DEFAULT_KS = (1, 2, 4, 8)


def _as_float_matrix(x, name):
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(
            f"`{name}` must have rank 2 [num, dim]; received shape {x.shape}."
        )
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(
            f"`{name}` must be floating point; received dtype {x.dtype}."
        )
    x = x.astype(np.float32, copy=False)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"`{name}` contains NaN or infinite values.")
    return x


def _as_labels(y, n, name):
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) != n:
        raise ValueError(
            f"`{name}` must have shape [{n}]; received shape {y.shape}."
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"`{name}` must be integer class ids; received dtype {y.dtype}."
        )
    return y.astype(np.int64)


def _check_ks(ks):
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"`ks` must be positive integers; received {ks}.")
    return tuple(sorted(set(ks)))


def _normalize(x):
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32)


def _prepare(
    query_embeddings,
    query_labels,
    ref_embeddings,
    ref_labels,
    exclude_self,
    normalize,
    query_ids=None,
):
    q = _as_float_matrix(query_embeddings, "query_embeddings")
    ql = _as_labels(query_labels, len(q), "query_labels")
    own = ref_embeddings is None
    if own != (ref_labels is None):
        raise ValueError(
            "`ref_embeddings` and `ref_labels` must be given together; "
            f"received ref_embeddings={'None' if own else 'array'}, "
            f"ref_labels={'None' if ref_labels is None else 'array'}."
        )
    if own:
        r, rl = q, ql
    else:
        r = _as_float_matrix(ref_embeddings, "ref_embeddings")
        rl = _as_labels(ref_labels, len(r), "ref_labels")
        if r.shape[1] != q.shape[1]:
            raise ValueError(
                "`ref_embeddings` must have the query dimension "
                f"{q.shape[1]}; received {r.shape[1]}."
            )
    if query_ids is not None:
        if exclude_self is False:
            raise ValueError(
                "`query_ids` names each query's own reference, which is "
                "excluded; it cannot be combined with exclude_self=False."
            )
        self_idx = np.asarray(query_ids)
        if self_idx.ndim != 1 or len(self_idx) != len(q):
            raise ValueError(
                f"`query_ids` must have shape [{len(q)}]; received shape "
                f"{self_idx.shape}."
            )
        if not np.issubdtype(self_idx.dtype, np.integer):
            raise ValueError(
                "`query_ids` must be integer reference indices; received "
                f"dtype {self_idx.dtype}."
            )
        self_idx = self_idx.astype(np.int64)
        bad = (self_idx < 0) | (self_idx >= len(r))
        if bad.any():
            raise ValueError(
                f"`query_ids` must be in [0, {len(r)}); received "
                f"{self_idx[bad][0]}."
            )
    else:
        if exclude_self is None:
            exclude_self = own
        if exclude_self and len(r) != len(q):
            raise ValueError(
                "`exclude_self=True` pairs query i with reference i and "
                f"needs as many references as queries; received {len(q)} "
                f"queries and {len(r)} references (pass `query_ids` when "
                "the queries are a subset of the references)."
            )
        self_idx = np.arange(len(q)) if exclude_self else np.full(len(q), -1)
    if normalize:
        q = _normalize(q)
        r = q if own else _normalize(r)
    return q, ql, r, rl, self_idx.astype(np.int64)


def _class_tables(ql, rl, self_idx):
    """Reference indices grouped by label, and each query's R.

    ``self_idx[i]`` is the reference excluded for query i (-1: none).
    """
    order = np.lexsort((np.arange(len(rl)), rl))  # by label, then index
    classes, starts, counts = np.unique(
        rl[order], return_index=True, return_counts=True
    )
    pos = np.searchsorted(classes, ql)
    pos_c = np.minimum(pos, max(len(classes) - 1, 0))
    found = (len(classes) > 0) & (classes[pos_c] == ql)
    start = np.where(found, starts[pos_c], 0)
    count = np.where(found, counts[pos_c], 0)
    has_self = self_idx >= 0
    self_rel = has_self & (rl[np.where(has_self, self_idx, 0)] == ql)
    r = np.maximum(count - self_rel, 0)
    r_max = int(counts.max()) if len(counts) else 1
    return order.astype(np.int64), start, count, r, max(r_max, 1)


@tf.function(reduce_retracing=True, autograph=False)
def _relevant_scores(q, ql, qidx, refs, order, start, count, r_max):
    """Sorted scores and indices of each query's relevant references."""
    offs = tf.range(r_max, dtype=tf.int64)
    slot = start[:, None] + offs[None, :]
    valid = offs[None, :] < count[:, None]
    slot = tf.where(valid, slot, 0)
    members = tf.gather(order, slot)  # [B, r_max] ascending index per class
    valid &= members != qidx[:, None]
    vecs = tf.gather(refs, members)  # [B, r_max, d]
    scores = tf.einsum("bd,brd->br", q, vecs)
    masked = tf.where(valid, scores, -np.inf)
    # Stable: equal scores keep the lower reference index first.
    top, pos = tf.math.top_k(masked, k=tf.shape(masked)[1])
    idx = tf.gather(members, pos, batch_dims=1)
    ok = tf.gather(valid, pos, batch_dims=1)
    neg_sorted = tf.where(ok, -top, np.inf)  # ascending
    idx = tf.where(ok, idx, tf.cast(-1, tf.int64))
    return neg_sorted, idx


def _bucket_sparse(key, rows, cols, neg_sorted, rel_idx):
    """Relevant items ranked before each listed negative (exact ties)."""
    r_max = tf.shape(neg_sorted)[1]
    ns = tf.gather(neg_sorted, rows)  # [T, r_max]
    lo = tf.searchsorted(ns, key[:, None], side="left", out_type=tf.int32)
    hi = tf.searchsorted(ns, key[:, None], side="right", out_type=tf.int32)
    # Exact ties between a negative and relevant items: the relevant items
    # with a lower reference index come first.
    ar = tf.range(r_max)[None, :]
    before = (ar >= lo) & (ar < hi)
    before &= tf.gather(rel_idx, rows) < cols[:, None]
    return lo[:, 0] + tf.reduce_sum(tf.cast(before, tf.int32), axis=1)


def _negatives(ql, qidx, rl_c, offset, c):
    """[B, C] bool: reference ``offset + j`` is a negative of query b."""
    cols = tf.range(c, dtype=tf.int64) + offset
    neg = ql[:, None] != rl_c[None, :]
    return neg & (cols[None, :] != qidx[:, None])


@tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
def _dense_buckets(s, ql, qidx, rel_scores, rel_idx, rl_c, offset, r_max):
    """[B, C] relevant items ranked before each reference (R + 1: not a
    negative).

    One fused elementwise XLA kernel: each score is compared with the R
    relevant scores of its query (R is small and static, so the loop is
    unrolled and vectorises). A relevant item comes first when it scores
    higher, or equally with a lower reference index. Padding slots (score
    -inf) never come first.
    """
    c = tf.shape(s)[1]
    neg = _negatives(ql, qidx, rl_c, offset, c)
    # Tie-breaks compare chunk-local int32 indices (int64 is slower); the
    # relevant indices are clipped to [-1, C], which keeps every comparison.
    local = tf.range(c, dtype=tf.int32)[None, :]
    rel_local = tf.cast(
        tf.clip_by_value(rel_idx - offset, -1, tf.cast(c, tf.int64)), tf.int32
    )
    bucket = tf.zeros(tf.shape(s), tf.int32)
    for i in range(r_max):
        t = rel_scores[:, i : i + 1]
        j = rel_local[:, i : i + 1]
        first = (t > s) | ((t == s) & (j < local))
        bucket += tf.cast(first, tf.int32)
    return tf.where(neg, bucket, r_max + 1)


def _dense_buckets_search(s, ql, qidx, neg_sorted, rel_idx, rl_c, offset):
    """As :func:`_dense_buckets` with ``tf.searchsorted`` (any R)."""
    b = tf.shape(s)[0]
    r_max = tf.shape(neg_sorted)[1]
    key = -s
    neg = _negatives(ql, qidx, rl_c, offset, tf.shape(s)[1])
    lo = tf.searchsorted(neg_sorted, key, side="left", out_type=tf.int32)
    # A tie exists iff the first threshold not below the key equals it.
    pad = tf.fill([b, 1], tf.constant(np.inf, neg_sorted.dtype))
    at = tf.gather(tf.concat([neg_sorted, pad], 1), lo, batch_dims=1)
    tie = tf.where((at == key) & neg)
    corr = _bucket_sparse(
        tf.gather_nd(key, tie),
        tie[:, 0],
        tie[:, 1] + offset,
        neg_sorted,
        rel_idx,
    ) - tf.gather_nd(lo, tie)
    bucket = tf.tensor_scatter_nd_add(lo, tie, corr)
    return tf.where(neg, bucket, r_max + 1)


# Row slices of the dense path's bincount (run on parallel threads).
_BINCOUNT_PARTS = 4

# Largest R_max whose dense kernel is unrolled (compile time grows with R).
_UNROLL_LIMIT = 64

# Above this many (negative, relevant) comparisons the dense path is used.
_SPARSE_LIMIT = 1 << 24


@tf.function(reduce_retracing=True, autograph=False)
def _count_chunk(
    q,
    ql,
    qidx,
    neg_sorted,
    rel_idx,
    refs_c,
    rl_c,
    offset,
    sparse_limit,
    r_static,
    unrolled,
):
    """For each query and i, negatives of this chunk ranked before item i.

    Only negatives scoring at least the lowest relevant score of their query
    can precede a relevant item, so these few are gathered and placed by a
    binary search; when they are many (a poor embedding) every element of
    the block is placed instead (:func:`_dense_buckets`, or
    :func:`_dense_buckets_search` when ``unrolled`` is False).
    """
    # R_max is a Python int (one trace per value): the dense kernel unrolls
    # over it.
    neg_sorted = tf.ensure_shape(neg_sorted, [None, r_static])
    rel_idx = tf.ensure_shape(rel_idx, [None, r_static])
    b = tf.shape(neg_sorted)[0]
    r_max = r_static
    s = tf.matmul(q, refs_c, transpose_b=True)  # [B, C]
    finite = tf.math.is_finite(neg_sorted)
    worst = tf.reduce_max(tf.where(finite, neg_sorted, -np.inf), axis=1)
    # Candidates (any label) first, read straight off the scores (one pass);
    # the label test runs on the few only. ``-worst`` is the query's lowest
    # relevant score (+inf when it has none: no candidate).
    cand = s >= -worst[:, None]
    per_row = tf.reduce_sum(tf.cast(cand, tf.int32), axis=1)  # < 2**31
    n_cand = tf.reduce_sum(tf.cast(per_row, tf.int64))
    nb = b * (r_max + 1)

    def sparse():
        idx = tf.where(cand)
        is_neg = tf.gather(ql, idx[:, 0]) != tf.gather(rl_c, idx[:, 1])
        is_neg &= idx[:, 1] + offset != tf.gather(qidx, idx[:, 0])
        idx = tf.boolean_mask(idx, is_neg)
        bucket = _bucket_sparse(
            -tf.gather_nd(s, idx),
            idx[:, 0],
            idx[:, 1] + offset,
            neg_sorted,
            rel_idx,
        )
        flat = tf.cast(idx[:, 0], tf.int32) * (r_max + 1) + bucket
        c = tf.math.bincount(flat, minlength=nb, maxlength=nb)
        return tf.reshape(c, [b, r_max + 1])

    def dense():
        if unrolled:
            bucket = _dense_buckets(
                s, ql, qidx, -neg_sorted, rel_idx, rl_c, offset, r_max
            )
        else:  # large classes: a binary search per score
            bucket = _dense_buckets_search(
                s, ql, qidx, neg_sorted, rel_idx, rl_c, offset
            )
        # TF's 2-D bincount runs on one thread: row slices run in parallel.
        cuts = [b * i // _BINCOUNT_PARTS for i in range(_BINCOUNT_PARTS + 1)]
        return tf.concat(
            [
                tf.math.bincount(
                    bucket[lo:hi],
                    minlength=r_max + 1,
                    maxlength=r_max + 1,
                    axis=-1,
                )
                for lo, hi in zip(cuts[:-1], cuts[1:])
            ],
            axis=0,
        )

    use_sparse = n_cand * tf.cast(r_max, tf.int64) <= sparse_limit
    return tf.cond(use_sparse, sparse, dense)


def _ranks_exact(q, ql, r, rl, self_idx, block_size, ref_block, sparse_limit):
    """[Nq, r_max] 1-based ranks of the relevant items (0 = no item)."""
    order, start, count, big_r, r_max = _class_tables(ql, rl, self_idx)
    refs = tf.constant(r)
    order_t = tf.constant(order)
    rl_t = tf.constant(rl)
    n, nr = len(q), len(r)
    # Keep the gathered [B, r_max, d] block bounded (~256 MB).
    budget = max(1, (1 << 26) // max(1, r_max * q.shape[1]))
    bq = max(1, min(block_size, budget))
    ranks = np.zeros((n, r_max), np.int64)
    for b0 in range(0, n, bq):
        b1 = min(n, b0 + bq)
        qb = tf.constant(q[b0:b1])
        qlb = tf.constant(ql[b0:b1])
        qidx = tf.constant(self_idx[b0:b1])
        neg_sorted, rel_idx = _relevant_scores(
            qb,
            qlb,
            qidx,
            refs,
            order_t,
            tf.constant(start[b0:b1]),
            tf.constant(count[b0:b1]),
            tf.constant(r_max),
        )
        counts = None
        for c0 in range(0, nr, ref_block):
            c1 = min(nr, c0 + ref_block)
            c = _count_chunk(
                qb,
                qlb,
                qidx,
                neg_sorted,
                rel_idx,
                refs[c0:c1],
                rl_t[c0:c1],
                tf.constant(c0, tf.int64),
                tf.constant(sparse_limit, tf.int64),
                r_max,
                r_max <= _UNROLL_LIMIT,
            )
            counts = c if counts is None else counts + c
        before = np.cumsum(counts.numpy()[:, :r_max], axis=1)
        rb = np.arange(1, r_max + 1)[None, :] + before
        valid = np.arange(r_max)[None, :] < big_r[b0:b1, None]
        ranks[b0:b1] = np.where(valid, rb, 0)
    return ranks, big_r


def metrics_from_ranks(
    ranks: npt.ArrayLike,
    num_relevant: npt.ArrayLike,
    ks: Iterable[int] = _DEFAULT_KS,
) -> dict[str, float | int]:
    """Metrics from the sorted 1-based ranks of every relevant reference.

    Args:
      ranks: ``[Nq, R_max]`` int, row q holds the ranks of its relevant
        references in increasing order, padded with 0.
      num_relevant: ``[Nq]`` int ``R`` per query; 0 excludes the query.
      ks: the K of ``recall@K``.

    Returns:
      the metrics dict described in the module docstring.
    """
    ks = _check_ks(ks)
    ranks = np.asarray(ranks, np.float64)
    big_r = np.asarray(num_relevant, np.int64)
    keep = big_r > 0
    out = {}
    ranks, big_r = ranks[keep], big_r[keep].astype(np.float64)
    n = len(big_r)

    def mean(v):
        return float(np.mean(v)) if n else float("nan")

    i = np.arange(1, ranks.shape[1] + 1)[None, :]
    valid = i <= big_r[:, None]
    first = ranks[:, 0] if ranks.shape[1] else np.zeros(0)
    for k in ks:
        out[f"recall@{k}"] = mean(first <= k)
    out["precision@1"] = mean(first == 1)
    safe = np.where(valid, ranks, 1.0)
    prec = np.where(valid, i / safe, 0.0)
    in_r = valid & (ranks <= big_r[:, None])
    out["r_precision"] = mean(in_r.sum(1) / big_r)
    out["map@r"] = mean(np.where(in_r, prec, 0.0).sum(1) / big_r)
    out["map"] = mean(prec.sum(1) / big_r)
    out["mrr"] = mean(1.0 / np.maximum(first, 1.0))
    out["num_queries"] = int(n)
    out["num_excluded"] = int((~keep).sum())
    return out


def metrics_from_neighbors(
    neighbor_labels: npt.ArrayLike,
    query_labels: npt.ArrayLike,
    num_relevant: npt.ArrayLike,
    ks: Iterable[int] | int,
) -> dict[str, float]:
    """Metrics from top-k neighbour label lists (self already removed).

    Used by the approximate mode: ``map`` and ``mrr`` only see the top k
    (a relevant item beyond k contributes 0), so they are lower bounds.
    """
    ks = _check_ks(ks)
    rel = np.asarray(neighbor_labels) == np.asarray(query_labels)[:, None]
    names = tuple(f"recall@{k}" for k in ks) + _TOP_METRICS + _RANK_METRICS
    return _metrics_from_relevance(rel, num_relevant, names)


# -- the top-R path: metrics that only look at the first max(R, K) ranks ----

# Metrics the top-k path computes exactly (``recall@K`` too).
_TOP_METRICS = ("precision@1", "r_precision", "map@r")
_RANK_METRICS = ("map", "mrr")

# Memory bound of one [query block, references] score block (floats).
_SCORE_BUDGET = 1 << 25

# References per group of the selection (see :func:`_topk_block`).
_TOPK_GROUP = 16

# Scores per chunk of the top-R path's grouped selection (a query block of
# 1,024 rows against 65,536 references). Larger query blocks keep the
# product near this CPU's sgemm speed; chunking the references bounds the
# memory. Measured at 200k references (AVX-512 EPYC, 2 threads, in-process,
# s for the whole set): 167-row blocks without chunks (the 2**25 bound)
# 84.7; 1,024 rows x 32,768 references 75.9; x 65,536 72.5; unchunked
# (800 MB per block) 67.7.
_TOPK_SCORE_BUDGET = 1 << 26

# References per scored chunk of the top-R path (None: the budget above
# divided by the query block; a test knob).
_REF_CHUNK = None

# Groups are used when there are at least ratio * (k + 1) of them (else a
# plain top-k over the row: small sets, or k a large part of N).
_TOPK_MIN_RATIO = 4


def _resolve_metrics(metrics, ks):
    """(ks, names) of the metrics to return; names in a fixed order."""
    if metrics is None:
        return ks, tuple(f"recall@{k}" for k in ks) + _TOP_METRICS + (
            _RANK_METRICS
        )
    if isinstance(metrics, str):
        metrics = (metrics,)
    names, rk = [], []
    for m in metrics:
        m = str(m)
        if m == "recall":
            rk.extend(ks)
        elif m.startswith("recall@"):
            try:
                k = int(m[len("recall@") :])
            except ValueError:
                k = 0
            if k < 1:
                raise ValueError(
                    f"`metrics`: bad name {m!r} (recall@K, K >= 1)."
                )
            rk.append(k)
        elif m in _TOP_METRICS + _RANK_METRICS:
            names.append(m)
        else:
            raise ValueError(
                f"`metrics`: unknown name {m!r}; known: 'recall' (every K of "
                "`ks`), 'recall@K', "
                + ", ".join(repr(n) for n in _TOP_METRICS + _RANK_METRICS)
                + "."
            )
    rk = tuple(sorted(set(rk)))
    order = tuple(f"recall@{k}" for k in rk) + tuple(
        n for n in _TOP_METRICS + _RANK_METRICS if n in names
    )
    if not order:
        raise ValueError("`metrics` must name at least one metric.")
    return (rk or ks), order


def _group_candidates(s, c0, kk, group):
    """The ``kk + 1`` groups with the largest maxima of a score chunk ``s``
    (``[B, C]``, ``C`` a multiple of ``group``; all of its groups when it has
    fewer), in index order: their maxima ``[B, g]``, their scores
    ``[B, g, group]`` and their global group ids ``[B, g]`` (``c0`` is the
    chunk's first reference)."""
    b = tf.shape(s)[0]
    ng = s.shape[1] // group
    grouped = tf.reshape(s, [b, ng, group])
    maxima = tf.reduce_max(grouped, axis=2)
    first = c0 // group
    if kk + 1 >= ng:
        ids = tf.broadcast_to(tf.range(first, first + ng)[None, :], [b, ng])
        return maxima, grouped, ids
    _, chosen = tf.math.top_k(maxima, k=kk + 1)
    chosen = tf.sort(chosen, axis=1)
    return (
        tf.gather(maxima, chosen, batch_dims=1),
        tf.gather(grouped, chosen, batch_dims=1),
        chosen + first,
    )


@tf.function(reduce_retracing=True, autograph=False)
def _topk_block(q, refs, n, kk, group, bounds):
    """Top ``kk`` of the first ``n`` references for each query, ordered by
    (score desc, index asc).

    ``group`` > 1: ``refs`` is padded with zero rows to a multiple of
    ``group``. The row's scores are cut into groups of ``group``
    consecutive references; the top ``kk`` elements lie in the ``kk``
    groups with the largest maxima (ties: lower group first), plus one slot
    for the last group, whose padding scores 0. Only these groups' scores
    are ranked: a reduce-max pass and a top-k over ``N / group`` columns
    replace a top-k over ``N``. The groups are gathered in index order and
    ``tf.math.top_k`` is stable, so equal scores keep the lower reference
    index first.

    ``bounds`` (Python ints, multiples of ``group``): the references are
    scored in chunks ``refs[bounds[i]:bounds[i + 1]]``, one after the
    other, so a block holds ``B x chunk`` scores however many references
    there are (the product runs at full speed only with a few hundred query
    rows or more: 1.9 ns per score with 167 rows, 1.5 with 1,024, measured
    at 200k references). Each chunk keeps its own ``kk + 1`` best groups
    (a superset of the row's best groups that fall in it, same order) and
    the row's ``kk + 1`` best are chosen among the kept ones.
    """
    if group <= 1:
        s = tf.matmul(q, refs, transpose_b=True)  # [B, N]
        return tf.math.top_k(s, k=kk).indices
    b = tf.shape(q)[0]
    maxima, grouped, ids = [], [], []
    deps = []
    for c0, c1 in zip(bounds[:-1], bounds[1:]):
        # One chunk's scores at a time: the next product waits for this
        # chunk's selection (else the executor may hold several at once).
        with tf.control_dependencies(deps):
            s = tf.matmul(q, refs[c0:c1], transpose_b=True)
        m, g, i = _group_candidates(s, c0, kk, group)
        maxima.append(m)
        grouped.append(g)
        ids.append(i)
        deps = [m, g]
    if len(maxima) == 1:
        maxima, grouped, ids = maxima[0], grouped[0], ids[0]
    else:
        maxima = tf.concat(maxima, 1)
        grouped = tf.concat(grouped, 1)
        ids = tf.concat(ids, 1)
    kept = maxima.shape[1]
    if kept is None or kk + 1 < kept:
        _, pos = tf.math.top_k(maxima, k=kk + 1)
        pos = tf.sort(pos, axis=1)
        ids = tf.gather(ids, pos, batch_dims=1)
        grouped = tf.gather(grouped, pos, batch_dims=1)
    cols = ids[:, :, None] * group + tf.range(group)[None, None, :]
    cols = tf.reshape(cols, [b, -1])
    # Whole groups (``group`` contiguous scores each), not single scores.
    vals = tf.reshape(grouped, [b, -1])
    vals = tf.where(cols < n, vals, -np.inf)
    pos = tf.math.top_k(vals, k=kk).indices
    return tf.gather(cols, pos, batch_dims=1)


def _topk_neighbors(q, r, self_idx, k, block_size):
    """[Nq, k] reference indices of each query's top k, self removed."""
    n = len(r)
    extra = int(np.any(self_idx >= 0))
    kk = min(k + extra, n)
    group = _TOPK_GROUP
    if n // max(group, 1) < _TOPK_MIN_RATIO * (kk + 1):
        group = 1
    if group > 1 and n % group:
        r = np.concatenate(
            [r, np.zeros((group - n % group, r.shape[1]), r.dtype)]
        )
    nq = len(q)
    if group > 1:
        # Query blocks of ``block_size`` rows, references in chunks that
        # keep a block's scores within the budget.
        bq = max(1, min(int(block_size), nq))
        chunk = _REF_CHUNK or _TOPK_SCORE_BUDGET // bq
        chunk = max(group, chunk // group * group)
        bounds = tuple(range(0, len(r), chunk)) + (len(r),)
    else:
        bq = max(1, min(int(block_size), _SCORE_BUDGET // max(len(r), 1)))
        bq = min(bq, nq)
        bounds = (0, len(r))
    if nq % bq:
        # Every block has bq rows: one trace per process, not a second one
        # for a shorter last block (the zero rows' results are dropped).
        q = np.concatenate([q, np.zeros((bq - nq % bq, q.shape[1]), q.dtype)])
    refs = tf.constant(r)
    out = np.empty((len(q), kk), np.int64)
    for b0 in range(0, len(q), bq):
        cols = _topk_block(
            tf.constant(q[b0 : b0 + bq]),
            refs,
            tf.constant(n),
            kk,
            group,
            bounds,
        )
        out[b0 : b0 + bq] = cols.numpy()
    out = out[:nq]
    if extra:
        keep = out != self_idx[:, None]
        order = np.argsort(~keep, axis=1, kind="stable")
        out = np.take_along_axis(out, order, axis=1)
        # A row without its own index among the kk keeps its first kk - 1.
        out = out[:, : kk - 1]
    return out[:, :k]


def _metrics_from_relevance(rel, num_relevant, names):
    """The ``names`` metrics of boolean top-k relevance rows (exact when
    k >= R and k >= K; ``map`` / ``mrr`` only see the top k)."""
    big_r = np.asarray(num_relevant)
    keep = big_r > 0
    rel, big_r = rel[keep], big_r[keep].astype(np.float64)
    n = len(big_r)

    def mean(v):
        return float(np.mean(v)) if n else float("nan")

    pos = np.arange(1, rel.shape[1] + 1)[None, :]
    within_r = pos <= big_r[:, None]
    p_at = np.cumsum(rel, axis=1) / pos
    out = {}
    for name in names:
        if name.startswith("recall@"):
            out[name] = mean(rel[:, : int(name[7:])].any(1))
        elif name == "precision@1":
            out[name] = mean(rel[:, 0]) if rel.shape[1] else float("nan")
        elif name == "r_precision":
            out[name] = mean((rel & within_r).sum(1) / big_r)
        elif name == "map@r":
            out[name] = mean(np.where(rel & within_r, p_at, 0).sum(1) / big_r)
        elif name == "map":  # over the top k only
            out[name] = mean(np.where(rel, p_at, 0).sum(1) / big_r)
        elif name == "mrr":  # 0 when no relevant item is in the top k
            first = np.where(rel.any(1), rel.argmax(1) + 1, np.inf)
            out[name] = mean(1.0 / first)
    out["num_queries"] = int(n)
    out["num_excluded"] = int((~keep).sum())
    return out


def _metrics_topk(q, ql, r, rl, self_idx, names, block_size):
    """Exact top-R metrics from each query's first max(R_max, K) refs."""
    _, _, _, big_r, _ = _class_tables(ql, rl, self_idx)
    extra = int(np.any(self_idx >= 0))
    ks = [int(m[7:]) for m in names if m.startswith("recall@")]
    need = max([int(big_r.max()) if len(big_r) else 0, 1] + ks)
    k = max(1, min(need, len(r) - extra))
    if len(r) - extra < 1:
        rel = np.zeros((len(q), 1), bool)
    else:
        nb = _topk_neighbors(q, r, self_idx, k, block_size)
        rel = (nb >= 0) & (rl[np.maximum(nb, 0)] == ql[:, None])
    return _metrics_from_relevance(rel, big_r, names)


def _scann_metrics(q, ql, r, rl, self_idx, ks, sample, seed, scann_kw):
    from tfdml.eval.index import BruteForceIndex
    from tfdml.eval.index import ScaNNIndex

    _, _, _, big_r, r_max = _class_tables(ql, rl, self_idx)
    exclude_self = bool(np.any(self_idx >= 0))
    extra = 1 if exclude_self else 0
    k = min(max(max(ks), r_max), len(r) - extra)
    ids = np.arange(len(r)).astype(str)
    index = ScaNNIndex(r, ids, **(scann_kw or {}))

    def search(idx, qq):
        got, _ = idx.search(qq, k + extra)
        return got.astype(np.int64)

    nb = search(index, q)

    def drop_self(nb, rows):
        if not exclude_self:
            return nb[:, :k]
        keep = nb != self_idx[rows][:, None]
        # keep the first k entries that are not the query itself
        out = np.zeros((len(nb), k), np.int64)
        for i in range(len(nb)):
            out[i] = nb[i][keep[i]][:k]
        return out

    rows = np.arange(len(q))
    nb = drop_self(nb, rows)
    out = metrics_from_neighbors(rl[nb], ql, big_r, ks)
    rng = np.random.default_rng(seed)
    m = min(sample, len(q))
    pick = np.sort(rng.choice(len(q), m, replace=False))
    exact = drop_self(search(BruteForceIndex(r, ids), q[pick]), pick)
    kk = min(10, k)
    hits = [
        len(set(nb[p, :kk]) & set(exact[j, :kk])) for j, p in enumerate(pick)
    ]
    out[f"index_recall@{kk}"] = float(np.sum(hits) / (m * kk)) if m else 1.0
    out["index_recall_sample"] = int(m)
    return out


# -- relevance beyond one label: multi-hot labels or a relevance matrix -----


def _is_multi_hot(y):
    """``[N, C]`` labels with ``C > 1`` (``[N, 1]`` are class ids)."""
    return y is not None and np.ndim(y) == 2 and np.shape(y)[1] != 1


def _as_multi_hot(y, n, name, classes=None):
    y = np.asarray(y)
    if y.ndim != 2 or len(y) != n or (classes and y.shape[1] != classes):
        want = f"[{n}, {classes or 'classes'}]"
        raise ValueError(
            f"`{name}` must be multi-hot labels of shape {want} (the "
            f"query and reference labels in the same form); received "
            f"shape {y.shape}."
        )
    if y.dtype != bool:
        if not (
            np.issubdtype(y.dtype, np.integer)
            or np.issubdtype(y.dtype, np.floating)
        ):
            raise ValueError(
                f"`{name}` must be multi-hot 0/1 values; received dtype "
                f"{y.dtype}."
            )
        if not np.all((y == 0) | (y == 1)):
            raise ValueError(
                f"`{name}` are multi-hot labels: every value must be 0 or 1."
            )
    return y != 0


def _relevance_metrics(
    query_embeddings,
    query_labels,
    ref_embeddings,
    ref_labels,
    relevance,
    exclude_self,
    normalize,
    query_ids,
    names,
    block_size,
):
    """Exact metrics when relevance is not "same class id": multi-hot labels
    (relevant iff the label sets intersect) or an explicit ``[Nq, Nr]`` bool
    matrix. Per block of queries: the relevance rows (self excluded), then
    the ranking of :func:`_topk_neighbors` (same tie rule) over the first
    ``max(R_max, K)`` references, or over all of them when ``map`` / ``mrr``
    are asked for."""
    nq = np.shape(query_embeddings)[0] if np.ndim(query_embeddings) else 0
    own = ref_embeddings is None
    if relevance is not None:
        if query_labels is not None or ref_labels is not None:
            raise ValueError(
                "Give either `relevance` or labels (`query_labels`, "
                "`ref_labels`), not both."
            )
    elif not own and ref_labels is None:
        raise ValueError(
            "`ref_embeddings` and `ref_labels` must be given together; "
            "received ref_labels=None."
        )
    nr = (
        nq
        if own
        else (np.shape(ref_embeddings)[0] if np.ndim(ref_embeddings) else 0)
    )
    q, _, r, _, self_idx = _prepare(
        query_embeddings,
        np.zeros(nq, np.int64),
        ref_embeddings,
        None if own else np.zeros(nr, np.int64),
        exclude_self,
        normalize,
        query_ids,
    )
    if relevance is not None:
        rel_all = np.asarray(relevance)
        if rel_all.shape != (len(q), len(r)) or rel_all.dtype != bool:
            raise ValueError(
                f"`relevance` must be a bool matrix of shape [{len(q)}, "
                f"{len(r)}] (queries x references); received dtype "
                f"{rel_all.dtype}, shape {rel_all.shape}."
            )

        def rows(b0, b1):
            return rel_all[b0:b1].copy()

    else:
        ql = _as_multi_hot(query_labels, len(q), "query_labels")
        rl = (
            ql
            if own
            else _as_multi_hot(ref_labels, len(r), "ref_labels", ql.shape[1])
        )
        ql32, rl32 = ql.astype(np.float32), rl.astype(np.float32)

        def rows(b0, b1):
            return (ql32[b0:b1] @ rl32.T) > 0.5

    n = len(r)
    bq = max(1, min(block_size, _SCORE_BUDGET // max(n, 1)))
    blocks = [(b0, min(len(q), b0 + bq)) for b0 in range(0, len(q), bq)]

    def block_rows(b0, b1):
        rel = rows(b0, b1)
        own_ref = self_idx[b0:b1]
        has = own_ref >= 0
        rel[np.nonzero(has)[0], own_ref[has]] = False
        return rel

    big_r = np.zeros(len(q), np.int64)
    for b0, b1 in blocks:
        big_r[b0:b1] = block_rows(b0, b1).sum(1)
    extra = int(np.any(self_idx >= 0))
    if set(names) & set(_RANK_METRICS):
        k = n - extra
    else:
        ks = [int(m[7:]) for m in names if m.startswith("recall@")]
        k = min(max([int(big_r.max(initial=0)), 1] + ks), n - extra)
    totals, counted, excluded = dict.fromkeys(names, 0.0), 0, 0
    for b0, b1 in blocks:
        rel = block_rows(b0, b1)
        if k < 1:
            rel = np.zeros((b1 - b0, 1), bool)
        else:
            nb = _topk_neighbors(q[b0:b1], r, self_idx[b0:b1], k, bq)
            rel = np.take_along_axis(rel, nb, axis=1)
        part = _metrics_from_relevance(rel, big_r[b0:b1], names)
        excluded += part["num_excluded"]
        if part["num_queries"]:
            counted += part["num_queries"]
            for name in names:
                totals[name] += part[name] * part["num_queries"]
    out = {
        name: (totals[name] / counted if counted else float("nan"))
        for name in names
    }
    out["num_queries"] = int(counted)
    out["num_excluded"] = int(excluded)
    return out


def retrieval_metrics(
    query_embeddings: npt.ArrayLike,
    query_labels: npt.ArrayLike | None,
    ref_embeddings: npt.ArrayLike | None = None,
    ref_labels: npt.ArrayLike | None = None,
    ks: Iterable[int] = _DEFAULT_KS,
    exclude_self: bool | None = None,
    block_size: int = 1024,
    ref_block_size: int = 32768,
    normalize: bool = True,
    method: str = "exact",
    scann_sample: int = 1000,
    seed: int = 0,
    scann_options: Mapping[str, Any] | None = None,
    recall_at: Iterable[int] | None = None,
    sparse_limit: int = _SPARSE_LIMIT,
    query_ids: npt.ArrayLike | None = None,
    metrics: str | Iterable[str] | None = None,
    relevance: npt.ArrayLike | None = None,
) -> dict[str, float | int]:
    """Retrieval metrics of a query set against a reference set.

    See the module docstring for the definitions (Musgrave et al. 2020) and
    the tie rule.

    Args:
      query_embeddings: ``[Nq, d]`` float.
      query_labels: ``[Nq]`` int class ids, or ``[Nq, C]`` multi-hot 0/1
        labels (a reference is relevant iff its label set intersects the
        query's; ``ref_labels`` then ``[Nr, C]``), or None with
        ``relevance``.
      ref_embeddings: ``[Nr, d]`` float, or None: the queries are their own
        references.
      ref_labels: ``[Nr]`` int; given together with ``ref_embeddings``.
      ks: the K of ``recall@K``.
      exclude_self: drop reference i for query i (default: True exactly when
        no reference set is given).
      block_size: queries per block.
      ref_block_size: references per streamed chunk.
      normalize: L2-normalise both sets (cosine similarity).
      method: ``"exact"`` or ``"scann"`` (approximate neighbour lists from
        ScaNN; ``map``/``mrr`` only see the top k and the dict adds
        ``index_recall@10`` against exact search on ``scann_sample``
        queries).
      scann_sample: queries checked against exact search in ScaNN mode.
      seed: sampling seed for the ScaNN check.
      scann_options: keyword arguments for :class:`ScaNNIndex`.
      recall_at: alias of ``ks`` (the config key ``eval.recall_at``).
      query_ids: ``[Nq]`` int, when the queries are (a subset of) the
        references: reference ``query_ids[i]`` is query i itself and is
        excluded (by index). Lets a sample of queries be scored against
        the whole set.
      sparse_limit: per chunk, the most (candidate negative x R_max)
        comparisons done sparsely before the dense path is used (both are
        exact; a tuning knob).
      metrics: the metrics to compute, or None for all of them. Names:
        ``"recall"`` (``recall@K`` for every K of ``ks``), ``"recall@K"``
        (any K; ``ks`` is then ignored), ``"precision@1"``,
        ``"r_precision"``, ``"map@r"``, ``"map"``, ``"mrr"``. Without
        ``map`` and ``mrr`` (which need the rank of every relevant
        reference) the exact metrics come from each query's first
        ``max(R, K)`` references, several times faster.
      relevance: optional ``[Nq, Nr]`` bool matrix, True where reference j
        is relevant to query i (instead of labels; ``Nr = Nq`` without a
        reference set). The query itself stays excluded as with labels.
        With multi-hot labels or ``relevance``, ``R`` is the number of
        relevant references, the ranking and tie rule are the same, and
        ``map`` / ``mrr`` rank every reference (slower than the top-R
        metrics); ``method="scann"`` is not available.

    Returns:
      dict with ``recall@K`` for each K, ``precision@1``, ``r_precision``,
      ``map@r``, ``map``, ``mrr`` (floats, NaN when no query is usable;
      only those of ``metrics`` when it is given), ``num_queries`` and
      ``num_excluded``.
    """
    if recall_at is not None:
        ks = recall_at
    ks = _check_ks(ks)
    ks, names = _resolve_metrics(metrics, ks)

    def pick(out):
        keep = set(names) | {"num_queries", "num_excluded"}
        return {k: v for k, v in out.items() if k in keep or "index_" in k}

    if int(block_size) < 1:
        raise ValueError(f"`block_size` must be >= 1; received {block_size}.")
    if int(ref_block_size) < 1:
        raise ValueError(
            f"`ref_block_size` must be >= 1; received {ref_block_size}."
        )
    if (
        relevance is not None
        or _is_multi_hot(query_labels)
        or _is_multi_hot(ref_labels)
    ):
        if method != "exact":
            raise ValueError(
                "`method` must be 'exact' with multi-hot labels or "
                f"`relevance`; received {method!r}."
            )
        return pick(
            _relevance_metrics(
                query_embeddings,
                query_labels,
                ref_embeddings,
                ref_labels,
                relevance,
                exclude_self,
                normalize,
                query_ids,
                names,
                int(block_size),
            )
        )
    q, ql, r, rl, ex = _prepare(
        query_embeddings,
        query_labels,
        ref_embeddings,
        ref_labels,
        exclude_self,
        normalize,
        query_ids,
    )
    if method == "exact":
        if len(q) == 0:
            return pick(metrics_from_ranks(np.zeros((0, 1)), np.zeros(0), ks))
        if not set(names) & set(_RANK_METRICS):
            return _metrics_topk(q, ql, r, rl, ex, names, int(block_size))
        ranks, big_r = _ranks_exact(
            q,
            ql,
            r,
            rl,
            ex,
            int(block_size),
            int(ref_block_size),
            int(sparse_limit),
        )
        return pick(metrics_from_ranks(ranks, big_r, ks))
    if method == "scann":
        return pick(
            _scann_metrics(
                q, ql, r, rl, ex, ks, int(scann_sample), seed, scann_options
            )
        )
    raise ValueError(
        f"`method` must be 'exact' or 'scann'; received {method!r}."
    )


def nmi_ami(
    embeddings: npt.ArrayLike,
    labels: npt.ArrayLike,
    n_clusters: int | None = None,
    seed: int = 0,
    normalize: bool = True,
) -> dict[str, float]:
    """NMI and AMI of k-means clusters against the labels.

    Uses scikit-learn's ``KMeans`` (k = number of classes by default) and
    ``normalized_mutual_info_score`` / ``adjusted_mutual_info_score``.

    Returns:
      ``{"nmi": float, "ami": float}``.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_mutual_info_score
    from sklearn.metrics import normalized_mutual_info_score

    x = _as_float_matrix(embeddings, "embeddings")
    y = _as_labels(labels, len(x), "labels")
    if normalize:
        x = _normalize(x)
    k = len(np.unique(y)) if n_clusters is None else int(n_clusters)
    if k < 1 or k > len(x):
        raise ValueError(
            f"`n_clusters` must be in [1, {len(x)}]; received {k}."
        )
    pred = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(x)
    return {
        "nmi": float(normalized_mutual_info_score(y, pred)),
        "ami": float(adjusted_mutual_info_score(y, pred)),
    }
