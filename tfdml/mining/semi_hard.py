"""Semi-hard mining (Schroff et al., "FaceNet", CVPR 2015, arXiv 1503.03832,
Sec. 3.2) as pair masks, plus the sorted-search helpers it shares with
:class:`tfdml.losses.TripletMarginLoss`.

A triplet (a, p, n) is semi-hard when the negative is farther than the
positive but inside the margin: ``d_ap < d_an < d_ap + margin``. On cosine
similarity (higher is closer) that is ``S_ap - margin < S_an < S_ap``.

Pair-mask reading (the masks have no triplet axis): a negative ``n`` of
anchor ``a`` is kept when it is semi-hard for **at least one** positive of
``a``; a positive ``p`` is kept when **at least one** negative is semi-hard
for it. Both tests run without a sort: each anchor's positives become ``P``
slots (:func:`positive_slots`, ``P`` = the most positives of an anchor) and
``[B, P, M]`` comparisons answer both, ``O(B P M)`` time and memory. Under
XLA (static shapes) and when ``[B, P, M]`` would exceed
:data:`DENSE_MAX_ELEMENTS`, a sort and ``tf.searchsorted`` per anchor are
used instead (``O(B M log M)`` time, ``O(B M)`` memory, never
``[B, M, M]``); both give the same masks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from tfdml import ops
from tfdml import registry
from tfdml.mining.base import Miner
from tfdml.validation import check_non_negative

_BIG = -ops.NEG_INF


def _in_xla():
    """True while tracing for XLA (``tf.function(jit_compile=True)``)."""
    try:
        from tensorflow.python.framework import ops as tf_ops
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - private API moved
        return False
    graph = tf_ops.get_default_graph()
    return bool(control_flow_util.GraphOrParentsInXlaContext(graph))


def search_right(sorted_x, queries):
    """Per row, the number of ``sorted_x`` entries ``<= query``.

    ``tf.searchsorted(..., side="right")``, except under XLA: there TF lowers
    it to a ``[B, N, M]`` comparison (34 GB at B = N = M = 2048), so a
    binary search of ``ceil(log2(M + 1))`` batched gathers is used instead,
    ``O(B N log M)`` time and ``O(B N)`` memory.
    """
    if not _in_xla():
        return tf.searchsorted(sorted_x, queries, side="right")
    m = tf.shape(sorted_x)[1]
    lo = tf.zeros(tf.shape(queries), tf.int32)
    hi = tf.fill(tf.shape(queries), m)
    steps = tf.cast(
        tf.math.ceil(tf.math.log(tf.cast(m + 1, tf.float32)) / np.log(2.0)),
        tf.int32,
    )

    def body(i, lo, hi):
        mid = (lo + hi) // 2
        v = tf.gather(sorted_x, tf.minimum(mid, m - 1), batch_dims=1)
        active = lo < hi
        right = active & (v <= queries)
        left = active & ~(v <= queries)
        return i + 1, tf.where(right, mid + 1, lo), tf.where(left, mid, hi)

    # One extra step absorbs float rounding of the log.
    _, lo, _ = tf.while_loop(
        lambda i, lo, hi: i <= steps, body, (tf.constant(0), lo, hi)
    )
    return lo


def smallest_greater(x, mask, queries, return_index=False):
    """Per row, the smallest masked ``x`` strictly greater than each query.

    Args:
      x: ``[B, M]`` float values.
      mask: ``[B, M]`` bool, which values are candidates.
      queries: ``[B, N]`` float.

    Returns:
      ``(values, exists)``, both ``[B, N]``. Where no candidate is greater,
      ``exists`` is False and ``values`` holds a finite sentinel (or the last
      candidate); gradients flow to the chosen ``x`` entries. With
      ``return_index``, also the ``[B, N]`` column of the chosen entry.
    """
    x = tf.cast(x, tf.float32)
    mask = tf.cast(mask, tf.bool)
    filled = tf.where(mask, x, tf.fill(tf.shape(x), _BIG))
    order = tf.argsort(tf.stop_gradient(filled), axis=1, stable=True)
    sorted_x = tf.gather(filled, order, axis=1, batch_dims=1)
    idx = search_right(tf.stop_gradient(sorted_x), tf.cast(queries, tf.float32))
    count = tf.reduce_sum(tf.cast(mask, tf.int32), axis=1, keepdims=True)
    exists = idx < count
    last = tf.shape(x)[1] - 1
    pick = tf.minimum(idx, last)
    values = tf.gather(sorted_x, pick, axis=1, batch_dims=1)
    if return_index:
        return values, exists, tf.gather(order, pick, axis=1, batch_dims=1)
    return values, exists


def largest_less(x, mask, queries):
    """Per row, the largest masked ``x`` strictly less than each query."""
    values, exists = smallest_greater(-x, mask, -queries)
    return -values, exists


# The sort-free semi-hard search builds [B, P, M] temporaries (P: the most
# positives of an anchor); above this many elements it falls back to the
# sort (O(B M log M) time, O(B M) memory).
DENSE_MAX_ELEMENTS = 2**25


def positive_slots(mask, bucket=False):
    """Each row's masked columns, in column order, padded to the row maximum.

    Returns ``(index [B, P], valid [B, P])`` with ``P`` the largest row
    count (dynamic); a row with fewer entries is padded with ``valid``
    False and column 0. One pass over the mask (``tf.where``) and
    ``O(B P)`` work after it: no sort, no top-k. ``bucket``: ``P`` rounded
    up to a multiple of 4 (a power of two above 32), so that an XLA
    consumer sees few distinct shapes.
    """
    mask = tf.cast(mask, tf.bool)
    count = tf.reduce_sum(tf.cast(mask, tf.int32), axis=1)
    slots = tf.reduce_max(tf.concat([count, [0]], 0))
    if bucket:
        pow2 = tf.cast(
            2
            ** tf.math.ceil(
                tf.math.log(tf.cast(slots, tf.float64)) / np.log(2.0)
            ),
            tf.int32,
        )
        slots = tf.where(
            slots <= 32, (slots + 3) // 4 * 4, tf.maximum(pow2, slots)
        )
    where = tf.cast(tf.where(mask), tf.int32)  # [N, 2], row-major order
    row, column = where[:, 0], where[:, 1]
    start = tf.cumsum(count, exclusive=True)
    rank = tf.range(tf.shape(row)[0]) - tf.gather(start, row)
    at = tf.stack([row, rank], axis=1)
    shape = tf.stack([tf.shape(mask)[0], slots])
    index = tf.scatter_nd(at, column, shape)
    valid = tf.scatter_nd(at, tf.ones_like(row), shape) > 0
    return index, valid


def dense_budget_ok(mask, slots):
    """True when ``[B, P, M]`` (``P = slots``) fits DENSE_MAX_ELEMENTS."""
    shape = tf.shape(mask, out_type=tf.int64)
    return shape[0] * tf.cast(slots, tf.int64) * shape[1] <= DENSE_MAX_ELEMENTS


def semi_hard_negatives(dist, neg_mask, queries):
    """Per positive slot: the closest negative strictly farther than it.

    ``queries [B, P]`` are the distances of the slots' positives (from
    :func:`positive_slots`). A masked ``argmin`` over ``[B, P, M]`` instead
    of a sort: ``O(B P M)`` time and memory, no ``[B, M]`` sort. Among equal
    distances the lowest column wins (as the stable sort of
    :func:`smallest_greater` does).

    Returns ``(column [B, P] int32, exists [B, P] bool)``.
    """
    d = tf.stop_gradient(tf.cast(dist, tf.float32))
    q = tf.stop_gradient(tf.cast(queries, tf.float32))
    cand = tf.logical_and(
        tf.cast(neg_mask, tf.bool)[:, None, :], d[:, None, :] > q[:, :, None]
    )
    masked = tf.where(cand, d[:, None, :], _BIG)
    column = tf.math.argmin(masked, axis=2, output_type=tf.int32)
    exists = tf.gather(masked, column, axis=2, batch_dims=2) < _BIG
    return column, exists


def _dense_keep(c, neg_mask, index, valid, margin):
    """The miner's tests per positive slot, without a sort: ``[B, P, M]``
    comparisons and ``any`` reductions, the same comparisons as the sorted
    search (``c_n < c_p < c_n + margin`` for a negative,
    ``c_p - margin < c_n < c_p`` for a positive)."""
    c_p = tf.gather(c, index, axis=1, batch_dims=1)[:, :, None]  # [B, P, 1]
    c_n = c[:, None, :]  # [B, 1, M]
    # Negative n: some valid slot p with c_n < c_p < c_n + margin.
    hit_neg = (c_p > c_n) & (c_p < c_n + margin) & valid[:, :, None]
    keep_neg = tf.reduce_any(hit_neg, axis=1)
    # Positive p: some negative n with c_p - margin < c_n < c_p.
    hit_pos = (c_n < c_p) & (c_n > c_p - margin) & neg_mask[:, None, :]
    slot_keep = tf.reduce_any(hit_pos, axis=2) & valid  # [B, P]
    rows = tf.broadcast_to(
        tf.range(tf.shape(index)[0])[:, None], tf.shape(index)
    )
    at = tf.stack([rows, index], axis=-1)
    keep_pos = tf.scatter_nd(at, tf.cast(slot_keep, tf.int32), tf.shape(c)) > 0
    return keep_pos, keep_neg


@registry.register
class SemiHardMiner(Miner):
    """Keeps semi-hard pairs (FaceNet), read as pair masks.

    Args:
      margin: the triplet margin, in the units of ``form``; default 0.2
        (FaceNet's α).
      form: ``"distance"`` (Euclidean distance of L2-normalised embeddings,
        ``d = sqrt(2 - 2 S)``, the default) or ``"similarity"`` (cosine).

    A negative is kept if it is semi-hard for at least one positive of the
    anchor, and a positive is kept if at least one negative is semi-hard for
    it (strict inequalities on both sides).

    Example::

      loss = tfdml.losses.ContrastiveLoss(miner=SemiHardMiner(margin=0.2))
    """

    def __init__(self, margin: float = 0.2, form: str = "distance"):
        check_non_negative("margin", margin)
        if form not in ("similarity", "distance"):
            raise ValueError(
                "`form` must be 'similarity' or 'distance'; received "
                f"form={form!r}."
            )
        self.margin = float(margin)
        self.form = form

    def __call__(
        self, sim: tf.Tensor, pos_mask: tf.Tensor, neg_mask: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        pos_mask = tf.cast(pos_mask, tf.bool)
        neg_mask = tf.cast(neg_mask, tf.bool)
        sim = tf.stop_gradient(tf.cast(sim, tf.float32))
        # Work on a "closeness" c (higher is closer): c = S or c = -d.
        if self.form == "distance":
            c = -ops.distance_from_similarity(sim)
        else:
            c = sim
        if _in_xla():  # static shapes: the sort
            keep_pos, keep_neg = self._sorted(c, pos_mask, neg_mask)
        else:
            index, valid = positive_slots(pos_mask, bucket=True)
            keep_pos, keep_neg = tf.cond(
                dense_budget_ok(pos_mask, tf.shape(index)[1]),
                lambda: _dense_keep(c, neg_mask, index, valid, self.margin),
                lambda: self._sorted(c, pos_mask, neg_mask),
            )
        return (
            tf.logical_and(pos_mask, keep_pos),
            tf.logical_and(neg_mask, keep_neg),
        )

    def _sorted(self, c, pos_mask, neg_mask):
        # Negative n is kept iff some positive p has c_n < c_p < c_n + margin:
        # the smallest positive closeness above c_n is below c_n + margin.
        above, has_above = smallest_greater(c, pos_mask, c)
        keep_neg = tf.logical_and(has_above, above < c + self.margin)
        # Positive p is kept iff some negative has c_p - margin < c_n < c_p.
        below, has_below = largest_less(c, neg_mask, c)
        keep_pos = tf.logical_and(has_below, below > c - self.margin)
        return keep_pos, keep_neg

    def get_config(self) -> dict[str, Any]:
        return {"margin": self.margin, "form": self.form}
