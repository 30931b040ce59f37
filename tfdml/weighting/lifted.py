"""Lifted-structure pair weights: the gradient magnitudes ``|∂L_i/∂D|`` of
the generalised (per-anchor, smooth) lifted structure loss (Song et al.,
CVPR 2016; Hermans et al., arXiv 1703.07737;
``tfdml.losses.LiftedStructureLoss(form="generalized")``)::

  z_i  = log Σ_{j∈P_i} exp(D_ij - pos_margin)
       + log Σ_{k∈N_i} exp(neg_margin - D_ik)
  L_i  = max(0, z_i)
  w+_ij = 1[z_i > 0] softmax_{P_i}(D - pos_margin)_j
  w-_ik = 1[z_i > 0] softmax_{N_i}(neg_margin - D)_k

with ``D = sqrt(2 - 2 S)`` (distance space). Anchors without positives or
without negatives get zero weights.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from tfdml import ops
from tfdml import registry
from tfdml.weighting.base import Weighting
from tfdml.weighting.basic import check_number
from tfdml.weighting.basic import finish


def _masked_softmax(logits, mask):
    lse = ops.masked_logsumexp(logits, mask)[:, None]
    safe = tf.where(mask, logits - lse, tf.fill(tf.shape(logits), ops.NEG_INF))
    return tf.exp(safe), lse


@registry.register
class LiftedWeighting(Weighting):
    """Generalised lifted-structure weights (distance space).

    Args:
      neg_margin: the margin on negative distances (default 1).
      pos_margin: subtracted from positive distances (default 0).

    Example::

      w_pos, w_neg = LiftedWeighting(neg_margin=1.0)(sim, pos_mask, neg_mask)
    """

    space = "distance"

    def __init__(self, neg_margin: float = 1.0, pos_margin: float = 0.0):
        self.neg_margin = check_number("neg_margin", neg_margin, 0.0)
        self.pos_margin = check_number("pos_margin", pos_margin, 0.0)

    def __call__(
        self,
        sim: tf.Tensor,
        pos_mask: tf.Tensor,
        neg_mask: tf.Tensor,
        **context,
    ) -> tuple[tf.Tensor, tf.Tensor]:
        pos_mask = tf.cast(pos_mask, tf.bool)
        neg_mask = tf.cast(neg_mask, tf.bool)
        dist = ops.distance_from_similarity(tf.cast(sim, tf.float32))
        w_pos, lse_p = _masked_softmax(dist - self.pos_margin, pos_mask)
        w_neg, lse_n = _masked_softmax(self.neg_margin - dist, neg_mask)
        valid = tf.logical_and(
            tf.reduce_any(pos_mask, axis=1, keepdims=True),
            tf.reduce_any(neg_mask, axis=1, keepdims=True),
        )
        active = tf.logical_and(valid, lse_p + lse_n > 0.0)
        scale = tf.where(active, 1.0, 0.0)
        return finish(w_pos * scale, w_neg * scale, pos_mask, neg_mask)

    def get_config(self) -> dict[str, Any]:
        return {"neg_margin": self.neg_margin, "pos_margin": self.pos_margin}
