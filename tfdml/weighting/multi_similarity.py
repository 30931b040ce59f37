"""Multi-Similarity pair weights (Wang et al., CVPR 2019, §3 "General Pair
Weighting"), obtained by differentiating the MS loss (docs/losses.md,
"MultiSimilarityLoss" and "Weightings")::

  w+_ij = c / (exp(-alpha (base - S_ij)) + Σ_{k∈P_i} exp(-alpha (S_ik - S_ij)))
  w-_ij = c / (exp( beta (base - S_ij)) + Σ_{k∈N_i} exp( beta (S_ik - S_ij)))

(the sums include ``k = j``), i.e. ``|∂L_i/∂S_ij|`` of
``L_i = c/alpha log(1 + Σ_P e^{-alpha(S-base)}) + c/beta log(1 + Σ_N
e^{beta(S-base)})``. Both are softmaxes over the anchor's mined pairs plus a
constant-zero logit, which is how they are computed (stable for ``beta=40``).
An anchor without a mined positive or without a mined negative gets zero
weights, as the MS loss skips it.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from tfdml import ops
from tfdml import registry
from tfdml.weighting.base import Weighting
from tfdml.weighting.basic import check_number
from tfdml.weighting.basic import finish


def _softmax_plus_one(logits, mask):
    """exp(x_j) / (1 + Σ_{k∈mask} exp(x_k)) on the mask, 0 elsewhere."""
    lse = ops.masked_logsumexp(logits, mask, add_one=True)[:, None]
    safe = tf.where(mask, logits - lse, tf.fill(tf.shape(logits), ops.NEG_INF))
    return tf.exp(safe)


@registry.register
class MultiSimilarityWeighting(Weighting):
    """``|∂L_MS/∂S|`` on the masks it receives (similarity space).

    Args:
      alpha: positive scale (default 2).
      beta: negative scale (default 40).
      base: the similarity margin λ (default 0.5).
      coefficient: 1 (MS code) or 2 (MMSI code), multiplies both weights.

    Example::

      w_pos, w_neg = MultiSimilarityWeighting()(sim, pos_mask, neg_mask)
    """

    space = "similarity"

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 40.0,
        base: float = 0.5,
        coefficient: float = 1.0,
    ):
        self.alpha = check_number("alpha", alpha, 0.0, strict=True)
        self.beta = check_number("beta", beta, 0.0, strict=True)
        self.base = check_number("base", base)
        self.coefficient = check_number(
            "coefficient", coefficient, 0.0, strict=True
        )

    def __call__(
        self,
        sim: tf.Tensor,
        pos_mask: tf.Tensor,
        neg_mask: tf.Tensor,
        **context,
    ) -> tuple[tf.Tensor, tf.Tensor]:
        sim = tf.cast(sim, tf.float32)
        pos_mask = tf.cast(pos_mask, tf.bool)
        neg_mask = tf.cast(neg_mask, tf.bool)
        w_pos = _softmax_plus_one(-self.alpha * (sim - self.base), pos_mask)
        w_neg = _softmax_plus_one(self.beta * (sim - self.base), neg_mask)
        has_both = tf.logical_and(
            tf.reduce_any(pos_mask, axis=1, keepdims=True),
            tf.reduce_any(neg_mask, axis=1, keepdims=True),
        )
        scale = tf.where(has_both, self.coefficient, 0.0)
        return finish(w_pos * scale, w_neg * scale, pos_mask, neg_mask)

    def get_config(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "base": self.base,
            "coefficient": self.coefficient,
        }
