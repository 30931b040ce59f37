"""Binomial-deviance pair weights: ``|∂L/∂S|`` of
:class:`tfdml.losses.BinomialDevianceLoss` (Yi et al., ICPR 2014)::

  w+_ij = alpha   sigmoid(-alpha   (S_ij - beta)) [/ |P_i|]
  w-_ik = alpha C sigmoid( alpha C (S_ik - beta)) [/ |N_i|]
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from tfdml import registry
from tfdml.validation import check_choice
from tfdml.weighting.base import Weighting
from tfdml.weighting.basic import check_number
from tfdml.weighting.basic import finish
from tfdml.weighting.basic import per_anchor_count


@registry.register
class BinomialWeighting(Weighting):
    """Binomial-deviance weights (similarity space).

    Args:
      alpha: the scale α (default 2).
      beta: the similarity offset β (default 0.5).
      cost: the negative cost C (default 25).
      pair_reduction: ``"mean"`` (default; the loss averages each polarity
        over the anchor's pairs) or ``"sum"``.

    Example::

      w_pos, w_neg = BinomialWeighting()(sim, pos_mask, neg_mask)
    """

    space = "similarity"

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 0.5,
        cost: float = 25.0,
        pair_reduction: str = "mean",
    ):
        self.alpha = check_number("alpha", alpha, 0.0, strict=True)
        self.beta = check_number("beta", beta)
        self.cost = check_number("cost", cost, 0.0, strict=True)
        self.pair_reduction = check_choice(
            "pair_reduction", pair_reduction, ("mean", "sum")
        )

    def __call__(
        self,
        sim: tf.Tensor,
        pos_mask: tf.Tensor,
        neg_mask: tf.Tensor,
        **context,
    ) -> tuple[tf.Tensor, tf.Tensor]:
        sim = tf.cast(sim, tf.float32)
        a, c = self.alpha, self.alpha * self.cost
        w_pos = a * tf.sigmoid(-a * (sim - self.beta))
        w_neg = c * tf.sigmoid(c * (sim - self.beta))
        if self.pair_reduction == "mean":
            w_pos = tf.math.divide_no_nan(w_pos, per_anchor_count(pos_mask))
            w_neg = tf.math.divide_no_nan(w_neg, per_anchor_count(neg_mask))
        return finish(w_pos, w_neg, pos_mask, neg_mask)

    def get_config(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "cost": self.cost,
            "pair_reduction": self.pair_reduction,
        }
