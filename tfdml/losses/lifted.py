"""Lifted structured loss (Song, Xiang, Jegelka and Savarese, "Deep Metric
Learning via Lifted Structured Feature Embedding", CVPR 2016, arXiv
1511.06452, Eq. 4) and its generalised per-anchor form (Hermans, Beyer and
Leibe, arXiv 1703.07737, Sec. 2, PML ``GeneralizedLiftedStructureLoss``).

``D`` is the Euclidean distance of L2-normalised embeddings
(``sqrt(2 - 2 S)``, PML's default distance).

Distances come from the cosine similarity (``d = sqrt(2 - 2 S)``), so they
assume unit-norm embeddings (``normalize=True``, the default).

``form="song"`` (default, the paper's smooth relaxation, also PML's
``LiftedStructureLoss`` and tfa's ``lifted_struct_loss``)::

  J_ij = log( Σ_{k∈N(i)} exp(neg_margin - D_ik)
            + Σ_{l∈N(j)} exp(neg_margin - D_jl) ) + D_ij - pos_margin
  L = 1 / (2 |P|) Σ_{(i,j)∈P} max(0, J_ij)^2

over ordered positive pairs P. Per anchor we return
``B * Σ_j max(0, J_ij)^2 / (2 |P|)`` so that the mean over anchors is ``L``
exactly. With a reference set (memory) the negatives ``N(j)`` of a reference
``j`` are taken among the *anchors* (the column of the ``[B, M]`` matrix);
for the batch itself this is the paper's ``N(j)``. A positive pair whose
two ends have no negative contributes 0 (the log of an empty sum is -inf).

``form="generalized"``::

  L_i = max(0, log Σ_{j∈P(i)} exp(D_ij - pos_margin)
               + log Σ_{k∈N(i)} exp(neg_margin - D_ik))

(0 for an anchor without positives or negatives; mean over anchors).
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from tfdml import ops
from tfdml import registry
from tfdml.losses.base import PairLoss
from tfdml.validation import check_choice
from tfdml.validation import check_non_negative

FORMS = ("song", "generalized")


def _log_weights(w, mask):
    w = tf.cast(w, tf.float32)
    return tf.math.log(tf.maximum(w, 1e-30)), tf.logical_and(mask, w > 0)


def lifted_structure_song(
    dist: tf.Tensor,
    pos_mask: tf.Tensor,
    neg_mask: tf.Tensor,
    pair_weights: tf.Tensor | None = None,
    *,
    neg_margin: float,
    pos_margin: float = 0.0,
) -> tf.Tensor:
    """Per-anchor share ``[B]`` of Song et al.'s Eq. 4 on distances ``D``.

    ``pair_weights`` multiply each positive pair's squared hinge.
    """
    dist = tf.cast(dist, tf.float32)
    pos_mask = tf.cast(pos_mask, tf.bool)
    neg_mask = tf.cast(neg_mask, tf.bool)
    logits = neg_margin - dist
    rows = ops.masked_logsumexp(logits, neg_mask, axis=1)  # [B]
    cols = ops.masked_logsumexp(logits, neg_mask, axis=0)  # [M]
    a = rows[:, None]
    b = cols[None, :]
    top = tf.maximum(a, b)
    neg_term = top + tf.math.log(tf.exp(a - top) + tf.exp(b - top))
    hinge = tf.nn.relu(neg_term + dist - pos_margin)
    pair = 0.5 * tf.square(hinge)
    if pair_weights is not None:
        pair = pair * tf.cast(pair_weights, pair.dtype)
    pair = tf.where(pos_mask, pair, tf.zeros_like(pair))
    num_pos = tf.reduce_sum(tf.cast(pos_mask, tf.float32))
    batch = tf.cast(tf.shape(dist)[0], tf.float32)
    return tf.math.divide_no_nan(tf.reduce_sum(pair, axis=1) * batch, num_pos)


def lifted_structure_generalized(
    dist: tf.Tensor,
    pos_mask: tf.Tensor,
    neg_mask: tf.Tensor,
    pair_weights: tf.Tensor | None = None,
    *,
    neg_margin: float,
    pos_margin: float = 0.0,
) -> tf.Tensor:
    """Per-anchor generalised lifted structure loss ``[B]``."""
    dist = tf.cast(dist, tf.float32)
    pos_mask = tf.cast(pos_mask, tf.bool)
    neg_mask = tf.cast(neg_mask, tf.bool)
    pos_logits = dist - pos_margin
    neg_logits = neg_margin - dist
    if pair_weights is not None:
        log_w, pos_mask_w = _log_weights(pair_weights, pos_mask)
        _, neg_mask_w = _log_weights(pair_weights, neg_mask)
        pos_logits, neg_logits = pos_logits + log_w, neg_logits + log_w
        pos_mask, neg_mask = pos_mask_w, neg_mask_w
    loss = tf.nn.relu(
        ops.masked_logsumexp(pos_logits, pos_mask)
        + ops.masked_logsumexp(neg_logits, neg_mask)
    )
    valid = tf.logical_and(
        tf.reduce_any(pos_mask, axis=1), tf.reduce_any(neg_mask, axis=1)
    )
    return tf.where(valid, loss, tf.zeros_like(loss))


@registry.register
class LiftedStructureLoss(PairLoss):
    """Lifted structured loss, Song et al.'s form or the generalised one.

    Args:
      neg_margin: the margin α on negative distances (default 1).
      pos_margin: subtracted from positive distances (default 0, PML).
      form: ``"song"`` (default, Eq. 4 of the paper) or ``"generalized"``
        (Hermans et al.'s per-anchor log-sum-exp form).
      **kwargs: passed to :class:`tfdml.losses.PairLoss`.

    Example::

      loss = tfdml.losses.LiftedStructureLoss(neg_margin=1.0)

    Reference: Song et al., CVPR 2016; Hermans et al., arXiv 1703.07737.
    """

    def __init__(
        self,
        neg_margin: float = 1.0,
        pos_margin: float = 0.0,
        form: str = "song",
        name: str = "lifted_structure_loss",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.neg_margin = check_non_negative("neg_margin", neg_margin)
        self.pos_margin = check_non_negative("pos_margin", pos_margin)
        self.form = check_choice("form", form, FORMS)

    def pair_loss(
        self,
        sim: tf.Tensor,
        pos_mask: tf.Tensor,
        neg_mask: tf.Tensor,
        pair_weights: tf.Tensor | None = None,
        **context,
    ) -> tf.Tensor:
        dist = ops.distance_from_similarity(tf.cast(sim, tf.float32))
        fn = (
            lifted_structure_song
            if self.form == "song"
            else lifted_structure_generalized
        )
        return fn(
            dist,
            pos_mask,
            neg_mask,
            pair_weights,
            neg_margin=self.neg_margin,
            pos_margin=self.pos_margin,
        )

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            neg_margin=self.neg_margin,
            pos_margin=self.pos_margin,
            form=self.form,
        )
        return config
