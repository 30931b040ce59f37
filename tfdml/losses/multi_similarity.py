"""Multi-Similarity loss (Wang et al., "Multi-Similarity Loss with General
Pair Weighting for Deep Metric Learning", CVPR 2019, arXiv 1904.06627).

Per anchor i, after MS mining (:class:`tfdml.mining.MultiSimilarityMiner`)::

  L_i = c/alpha * log(1 + sum_{P_i} exp(-alpha (S_ij - base)))
      + c/beta  * log(1 + sum_{N_i} exp( beta (S_ik - base)))

with ``c = 1`` (msight code, the default) or ``c = 2`` (MMSI's code,
``coefficient=2``). An anchor with no mined positive *or* no mined negative
contributes 0 (msight code); the reduction divides by the batch size.

Note: the msight code calls the positive scale ``scale_pos = 2`` and the
negative scale ``scale_neg = 40``; here ``alpha`` is the positive scale and
``beta`` the negative one, the MS paper's convention.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tensorflow as tf

from tfdml import ops
from tfdml import registry
from tfdml.losses.base import PairLoss
from tfdml.mining.base import Miner
from tfdml.mining.multi_similarity import MultiSimilarityMiner
from tfdml.validation import check_non_negative
from tfdml.validation import check_positive


def multi_similarity(
    sim: tf.Tensor,
    pos_mask: tf.Tensor,
    neg_mask: tf.Tensor,
    pair_weights: tf.Tensor | None = None,
    *,
    alpha: float,
    beta: float,
    base: float,
    coefficient: float = 1.0,
    weights_on_similarity: bool = False,
) -> tf.Tensor:
    """Per-anchor MS loss ``[B]`` on already-mined masks.

    ``pair_weights`` multiply each pair's term inside the sum, or, with
    ``weights_on_similarity=True`` (MMSI's W-form), the similarity inside the
    exponent.
    """
    s = sim
    if pair_weights is not None and weights_on_similarity:
        s = sim * tf.cast(pair_weights, sim.dtype)
    pos_logits = -alpha * (s - base)
    neg_logits = beta * (s - base)
    if pair_weights is not None and not weights_on_similarity:
        w = tf.cast(pair_weights, sim.dtype)
        # log(1 + sum w exp(x)) == log(1 + sum exp(x + log w)).
        log_w = tf.math.log(tf.maximum(w, 1e-30))
        pos_mask = tf.logical_and(pos_mask, w > 0)
        neg_mask = tf.logical_and(neg_mask, w > 0)
        pos_logits = pos_logits + log_w
        neg_logits = neg_logits + log_w
    pos_term = ops.masked_logsumexp(pos_logits, pos_mask, add_one=True) / alpha
    neg_term = ops.masked_logsumexp(neg_logits, neg_mask, add_one=True) / beta
    has_both = tf.logical_and(
        tf.reduce_any(pos_mask, axis=1), tf.reduce_any(neg_mask, axis=1)
    )
    loss = coefficient * (pos_term + neg_term)
    return tf.where(has_both, loss, tf.zeros_like(loss))


@registry.register
class MultiSimilarityLoss(PairLoss):
    """Multi-Similarity loss with MS mining.

    Args:
      alpha: positive scale (msight ``scale_pos``), default 2.
      beta: negative scale (msight ``scale_neg``), default 40.
      base: the similarity margin λ, default 0.5.
      epsilon: MS mining margin ε, default 0.1; ``None`` disables mining
        (then every positive with ``S < 1 - 1e-5`` and every negative count).
      coefficient: 1 (msight code and MS paper: 1/scale) or 2 (MMSI code:
        2/scale).
      weights_on_similarity: how ``pair_weights`` (MMSI) enter: False
        (default) multiplies each pair's ``exp`` term; True is MMSI's
        W-form, ``S -> w * S`` inside the exponent.
      miner: overrides the MS miner built from ``epsilon``.
      **kwargs: passed to :class:`tfdml.losses.PairLoss`.

    Example::

      model.compile(optimizer="adam", loss=tfdml.losses.MultiSimilarityLoss())
    """

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 40.0,
        base: float = 0.5,
        epsilon: float = 0.1,
        coefficient: float = 1.0,
        weights_on_similarity: bool = False,
        miner: Miner | str | Mapping[str, Any] | None = None,
        name: str = "multi_similarity_loss",
        **kwargs,
    ):
        self.epsilon = (
            None if epsilon is None else check_non_negative("epsilon", epsilon)
        )
        if miner is None:
            miner = MultiSimilarityMiner(
                epsilon=1e9 if self.epsilon is None else self.epsilon
            )
        super().__init__(miner=miner, name=name, **kwargs)
        self.alpha = check_positive("alpha", alpha)
        self.beta = check_positive("beta", beta)
        self.base = float(base)
        self.coefficient = check_positive("coefficient", coefficient)
        self.weights_on_similarity = bool(weights_on_similarity)

    def pair_loss(
        self,
        sim: tf.Tensor,
        pos_mask: tf.Tensor,
        neg_mask: tf.Tensor,
        pair_weights: tf.Tensor | None = None,
        **context,
    ) -> tf.Tensor:
        return multi_similarity(
            sim,
            pos_mask,
            neg_mask,
            pair_weights,
            alpha=self.alpha,
            beta=self.beta,
            base=self.base,
            coefficient=self.coefficient,
            weights_on_similarity=self.weights_on_similarity,
        )

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            alpha=self.alpha,
            beta=self.beta,
            base=self.base,
            epsilon=self.epsilon,
            coefficient=self.coefficient,
            weights_on_similarity=self.weights_on_similarity,
        )
        return config
