"""Binomial deviance loss (Yi, Lei, Liao and Li, "Deep Metric Learning for
Person Re-Identification", ICPR 2014), with the hyper-parameters of
Ustinova and Lempitsky ("Learning Deep Embeddings with Histogram Loss",
NIPS 2016) that the MS paper compares against: ``alpha=2, beta=0.5, C=25``.

With ``m_ij = 1`` for positives and ``-C`` for negatives, each pair costs
``log(1 + exp(-alpha (S_ij - beta) m_ij))``. Per anchor::

  L_i = mean_{j∈P_i} softplus(-alpha   (S_ij - beta))
      + mean_{k∈N_i} softplus( alpha C (S_ik - beta))

(``pair_reduction="mean"``, Ustinova's per-polarity normalisation, applied
per anchor) or the sums (``"sum"``). A polarity without pairs contributes 0.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from tfdml import registry
from tfdml.losses.base import PairLoss
from tfdml.losses.base import apply_pair_weights
from tfdml.validation import check_choice
from tfdml.validation import check_positive

PAIR_REDUCTIONS = ("mean", "sum")


def binomial_deviance(
    sim: tf.Tensor,
    pos_mask: tf.Tensor,
    neg_mask: tf.Tensor,
    pair_weights: tf.Tensor | None = None,
    *,
    alpha: float = 2.0,
    beta: float = 0.5,
    cost: float = 25.0,
    pair_reduction: str = "mean",
) -> tf.Tensor:
    """Per-anchor binomial deviance ``[B]``; ``pair_weights`` multiply
    each pair's term."""
    sim = tf.cast(sim, tf.float32)
    pos_mask = tf.cast(pos_mask, tf.bool)
    neg_mask = tf.cast(neg_mask, tf.bool)
    pos = tf.nn.softplus(-alpha * (sim - beta))
    neg = tf.nn.softplus(alpha * cost * (sim - beta))
    pos = apply_pair_weights(pos, pair_weights)
    neg = apply_pair_weights(neg, pair_weights)
    pos = tf.reduce_sum(tf.where(pos_mask, pos, tf.zeros_like(pos)), axis=1)
    neg = tf.reduce_sum(tf.where(neg_mask, neg, tf.zeros_like(neg)), axis=1)
    if pair_reduction == "mean":
        pos = tf.math.divide_no_nan(
            pos, tf.reduce_sum(tf.cast(pos_mask, tf.float32), axis=1)
        )
        neg = tf.math.divide_no_nan(
            neg, tf.reduce_sum(tf.cast(neg_mask, tf.float32), axis=1)
        )
    return pos + neg


@registry.register
class BinomialDevianceLoss(PairLoss):
    """Binomial deviance loss on cosine similarities.

    Args:
      alpha: the scale α (default 2).
      beta: the similarity offset β (default 0.5).
      cost: the negative cost C (default 25; negatives are scaled by α·C).
      pair_reduction: ``"mean"`` (default) or ``"sum"`` over each anchor's
        pairs of one polarity.
      **kwargs: passed to :class:`tfdml.losses.PairLoss` (``miner``, ...).

    Example::

      model.compile(optimizer="adam", loss=tfdml.losses.BinomialDevianceLoss())

    Reference: Yi et al., ICPR 2014; Ustinova and Lempitsky, NIPS 2016.
    """

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 0.5,
        cost: float = 25.0,
        pair_reduction: str = "mean",
        name: str = "binomial_deviance_loss",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.alpha = check_positive("alpha", alpha)
        self.beta = float(beta)
        self.cost = check_positive("cost", cost)
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
        return binomial_deviance(
            sim,
            pos_mask,
            neg_mask,
            pair_weights,
            alpha=self.alpha,
            beta=self.beta,
            cost=self.cost,
            pair_reduction=self.pair_reduction,
        )

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            alpha=self.alpha,
            beta=self.beta,
            cost=self.cost,
            pair_reduction=self.pair_reduction,
        )
        return config
