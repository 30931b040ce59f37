"""Triplet margin loss (Weinberger and Saul, JMLR 2009; Schroff et al.,
"FaceNet", CVPR 2015, arXiv 1503.03832, Eq. 1; Hermans et al., arXiv
1703.07737, Eq. 5 for batch-hard), in PML's ``TripletMarginLoss`` form.

For a triplet (a, p, n): ``l = max(0, d_ap - d_an + margin)`` with ``d`` the
Euclidean distance of L2-normalised embeddings (``sqrt(2 - 2 S)``, PML's
default) or the cosine distance ``1 - S``. Which triplets (``mining``):

* ``"all"``: every (positive, negative) of the anchor. Builds a ``[B, M, M]``
  tensor: 4 bytes x B x M x M (64 MiB for B = M = 2048), so prefer the other
  two for large reference sets.
* ``"semi-hard"``: per (anchor, positive), the closest negative that is
  farther than the positive (FaceNet Eq. 3 reading: ``d_an > d_ap``); a pair
  without such a negative forms no triplet. Found without a sort: each
  anchor's positives become ``P`` slots (``P`` = the most positives of an
  anchor) and a masked argmin over ``[B, P, M]`` (one XLA-compiled search)
  picks each slot's negative: ``O(B P M)`` time and memory, and the
  ``[B, M]`` distances never enter the backward pass (the loss is built
  from gathered similarities). When ``[B, P, M]`` would exceed
  ``tfdml.mining.semi_hard.DENSE_MAX_ELEMENTS`` (many positives per
  anchor), and under ``jit_compile=True`` (static shapes), a sort and
  ``tf.searchsorted`` are used instead: ``O(B M log M)`` time, ``O(B M)``
  memory. Both give the same triplets and gradients (exact ties: the lowest
  column).
* ``"hard"``: batch-hard: the farthest positive and the closest negative of
  each anchor (one triplet per anchor).

Distances are computed from the cosine similarity, so they assume unit-norm
embeddings (``normalize=True``, the default, or already normalised ones).

Anchor loss: the reduction of its triplet losses by ``pair_reduction``
(default ``"avg_nonzero"``, PML's ``AvgNonZeroReducer`` per anchor; ``"pml"``
is PML's batch-level reducer, see :mod:`tfdml.losses.contrastive`). An anchor
without triplets contributes 0. ``pair_weights`` weight a triplet by
``w_ap * w_an``.
"""

from __future__ import annotations

import functools
from typing import Any

import tensorflow as tf

from tfdml import ops
from tfdml import registry
from tfdml.losses.base import PairLoss
from tfdml.losses.contrastive import PAIR_REDUCTIONS
from tfdml.losses.contrastive import reduce_pairs
from tfdml.mining.semi_hard import _in_xla
from tfdml.mining.semi_hard import dense_budget_ok
from tfdml.mining.semi_hard import positive_slots
from tfdml.mining.semi_hard import semi_hard_negatives
from tfdml.mining.semi_hard import smallest_greater
from tfdml.validation import check_choice
from tfdml.validation import check_non_negative

MININGS = ("all", "semi-hard", "hard")
DISTANCES = ("euclidean", "cosine")


def similarity_to_distance(sim, distance):
    sim = tf.cast(sim, tf.float32)
    if distance == "euclidean":
        return ops.distance_from_similarity(sim)
    return 1.0 - sim


def triplet_margin(
    sim: tf.Tensor,
    pos_mask: tf.Tensor,
    neg_mask: tf.Tensor,
    pair_weights: tf.Tensor | None = None,
    *,
    margin: float,
    mining: str = "all",
    distance: str = "euclidean",
    pair_reduction: str = "avg_nonzero",
) -> tf.Tensor:
    """Per-anchor triplet margin loss ``[B]`` from the pair contract."""
    pos_mask = tf.cast(pos_mask, tf.bool)
    neg_mask = tf.cast(neg_mask, tf.bool)
    w = None if pair_weights is None else tf.cast(pair_weights, tf.float32)
    if mining == "semi-hard" and not _in_xla():
        return _semi_hard_slots(
            sim, pos_mask, neg_mask, w, margin, distance, pair_reduction
        )
    dist = similarity_to_distance(sim, distance)
    if mining == "all":
        loss = tf.nn.relu(dist[:, :, None] - dist[:, None, :] + margin)
        mask = tf.logical_and(pos_mask[:, :, None], neg_mask[:, None, :])
        if w is not None:
            loss = loss * w[:, :, None] * w[:, None, :]
        return reduce_pairs(loss, mask, pair_reduction)
    if mining == "semi-hard":
        # Under XLA (a static number of positive slots is needed): the sort.
        return _semi_hard_sorted(
            dist, pos_mask, neg_mask, w, margin, pair_reduction
        )
    # Batch-hard.
    d_ap = ops.masked_max(dist, pos_mask)
    d_an = ops.masked_min(dist, neg_mask)
    loss = tf.nn.relu(d_ap - d_an + margin)
    if w is not None:
        loss = loss * _hard_weight(dist, pos_mask, d_ap, w)
        loss = loss * _hard_weight(dist, neg_mask, d_an, w)
    valid = tf.logical_and(
        tf.reduce_any(pos_mask, axis=1), tf.reduce_any(neg_mask, axis=1)
    )
    return reduce_pairs(loss[:, None], valid[:, None], pair_reduction)


def _semi_hard_sorted(dist, pos_mask, neg_mask, w, margin, pair_reduction):
    """Semi-hard triplets with a sort of each row (any number of positives,
    static shapes: the XLA path and the fallback for many positives)."""
    d_an, exists, n_idx = smallest_greater(
        dist, neg_mask, dist, return_index=True
    )
    loss = tf.nn.relu(dist - d_an + margin)
    if w is not None:
        loss = loss * w * tf.gather(w, n_idx, axis=1, batch_dims=1)
    return reduce_pairs(loss, tf.logical_and(pos_mask, exists), pair_reduction)


@functools.lru_cache(maxsize=None)
def _dense_search(distance):
    """The sort-free semi-hard search, XLA-compiled (forward only; about
    half the CPU time of the same ops unfused, at B = M = 128 and 2048):
    ``(sim [B, M], neg_mask, index [B, P]) -> (column [B, P], exists)``.
    XLA compiles once per shape; :func:`positive_slots` buckets ``P``."""

    def search(sim, neg_mask, index):
        d = similarity_to_distance(sim, distance)
        queries = tf.gather(d, index, axis=1, batch_dims=1)
        return semi_hard_negatives(d, neg_mask, queries)

    return tf.function(search, jit_compile=True)


def _semi_hard_slots(
    sim, pos_mask, neg_mask, w, margin, distance, pair_reduction
):
    """Semi-hard triplets per positive slot (:func:`positive_slots`): the
    negative of each (anchor, positive) by a masked argmin
    (:func:`semi_hard_negatives`, no sort) or, when ``[B, P, M]`` is over
    the budget, by the sort, queried for the positives only. The same
    triplets, values and gradient entries as :func:`_semi_hard_sorted`.

    Only integer columns cross the ``tf.cond``; the loss is built outside
    it from the gathered similarities: the ``[B, M]`` distances are a
    forward-only search key, so the backward pass never touches them.
    """
    index, valid = positive_slots(pos_mask, bucket=True)
    sim_key = tf.stop_gradient(tf.cast(sim, tf.float32))

    def sort():
        d = similarity_to_distance(sim_key, distance)
        queries = tf.gather(d, index, axis=1, batch_dims=1)
        _, exists, column = smallest_greater(
            d, neg_mask, queries, return_index=True
        )
        return column, exists

    n_idx, exists = tf.cond(
        dense_budget_ok(pos_mask, tf.shape(index)[1]),
        lambda: _dense_search(distance)(sim_key, neg_mask, index),
        sort,
    )
    # distance(gather(sim)) == gather(distance(sim)), elementwise.
    sim = tf.cast(sim, tf.float32)
    d_ap = similarity_to_distance(
        tf.gather(sim, index, axis=1, batch_dims=1), distance
    )
    d_an = similarity_to_distance(
        tf.gather(sim, n_idx, axis=1, batch_dims=1), distance
    )
    loss = tf.nn.relu(d_ap - d_an + margin)
    if w is not None:
        w_ap = tf.gather(w, index, axis=1, batch_dims=1)
        loss = loss * w_ap * tf.gather(w, n_idx, axis=1, batch_dims=1)
    return reduce_pairs(loss, tf.logical_and(valid, exists), pair_reduction)


def _hard_weight(dist, mask, chosen, w):
    eq = tf.logical_and(mask, dist == chosen[:, None])
    m = tf.shape(dist)[1]
    index = tf.range(m)[None, :]
    first = tf.reduce_min(tf.where(eq, index, tf.fill(tf.shape(eq), m)), axis=1)
    return tf.gather(w, tf.minimum(first, m - 1), axis=1, batch_dims=1)


@registry.register
class TripletMarginLoss(PairLoss):
    """Triplet margin loss with all, semi-hard or batch-hard triplets.

    Args:
      margin: the margin (PML default 0.05), >= 0.
      mining: ``"all"`` (default, PML's ``triplets_per_anchor="all"``),
        ``"semi-hard"`` or ``"hard"`` (see the module docstring).
      distance: ``"euclidean"`` (of L2-normalised embeddings, default) or
        ``"cosine"`` (``1 - S``).
      pair_reduction: ``"avg_nonzero"`` (default) | ``"sum"`` | ``"mean"`` |
        ``"pml"``: how an anchor's triplet losses are reduced.
      **kwargs: passed to :class:`tfdml.losses.PairLoss`.

    Example::

      loss = tfdml.losses.TripletMarginLoss(margin=0.2, mining="semi-hard")

    Reference: Schroff et al., CVPR 2015; Hermans et al., arXiv 1703.07737.
    """

    def __init__(
        self,
        margin: float = 0.05,
        mining: str = "all",
        distance: str = "euclidean",
        pair_reduction: str = "avg_nonzero",
        name: str = "triplet_margin_loss",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.margin = check_non_negative("margin", margin)
        self.mining = check_choice("mining", mining, MININGS)
        self.distance = check_choice("distance", distance, DISTANCES)
        self.pair_reduction = check_choice(
            "pair_reduction", pair_reduction, PAIR_REDUCTIONS
        )

    def pair_loss(
        self,
        sim: tf.Tensor,
        pos_mask: tf.Tensor,
        neg_mask: tf.Tensor,
        pair_weights: tf.Tensor | None = None,
        **context,
    ) -> tf.Tensor:
        return triplet_margin(
            sim,
            pos_mask,
            neg_mask,
            pair_weights,
            margin=self.margin,
            mining=self.mining,
            distance=self.distance,
            pair_reduction=self.pair_reduction,
        )

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            margin=self.margin,
            mining=self.mining,
            distance=self.distance,
            pair_reduction=self.pair_reduction,
        )
        return config
