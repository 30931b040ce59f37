"""Circle loss (Sun et al., "Circle Loss: A Unified Perspective of Pair
Similarity Optimization", CVPR 2020, Eq. 6) on cosine similarities::

  alpha_p = [1 + m - s_p]_+      alpha_n = [s_n + m]_+     (no gradient)
  L_i = softplus( log Σ_{N_i} exp( gamma alpha_n (s_n - m))
                + log Σ_{P_i} exp(-gamma alpha_p (s_p - (1 - m))) )

The paper's defaults for face/retrieval: ``m = 0.25``, ``gamma = 256``. The
self-adaptive weights ``alpha`` are constants in the paper's gradient
analysis, so they are stopped (as PML does). ``keras.losses.Circle`` gives the
same values (it does not stop the gradient through ``alpha``, masks the
self-pair by the diagonal and its mean reduction only averages anchors with a
non-zero loss). An anchor without positives or negatives gives 0.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from tfdml import ops
from tfdml import registry
from tfdml.losses.base import PairLoss
from tfdml.validation import check_non_negative
from tfdml.validation import check_positive


def circle(
    sim: tf.Tensor,
    pos_mask: tf.Tensor,
    neg_mask: tf.Tensor,
    pair_weights: tf.Tensor | None = None,
    *,
    margin: float = 0.25,
    gamma: float = 256.0,
    stop_weight_gradient: bool = True,
) -> tf.Tensor:
    """Per-anchor circle loss ``[B]``; ``pair_weights`` multiply each
    pair's ``exp`` term (added as ``log w`` to the logits)."""
    sim = tf.cast(sim, tf.float32)
    pos_mask = tf.cast(pos_mask, tf.bool)
    neg_mask = tf.cast(neg_mask, tf.bool)
    alpha_p = tf.nn.relu(1.0 + margin - sim)
    alpha_n = tf.nn.relu(sim + margin)
    if stop_weight_gradient:
        alpha_p = tf.stop_gradient(alpha_p)
        alpha_n = tf.stop_gradient(alpha_n)
    pos_logits = -gamma * alpha_p * (sim - (1.0 - margin))
    neg_logits = gamma * alpha_n * (sim - margin)
    if pair_weights is not None:
        w = tf.cast(pair_weights, tf.float32)
        log_w = tf.math.log(tf.maximum(w, 1e-30))
        pos_mask = tf.logical_and(pos_mask, w > 0)
        neg_mask = tf.logical_and(neg_mask, w > 0)
        pos_logits += log_w
        neg_logits += log_w
    z = ops.masked_logsumexp(pos_logits, pos_mask) + ops.masked_logsumexp(
        neg_logits, neg_mask
    )
    valid = tf.logical_and(
        tf.reduce_any(pos_mask, axis=1), tf.reduce_any(neg_mask, axis=1)
    )
    z = tf.where(valid, z, tf.zeros_like(z))
    return tf.where(valid, tf.nn.softplus(z), tf.zeros_like(z))


@registry.register
class CircleLoss(PairLoss):
    """Circle loss.

    Args:
      margin: the relaxation m (default 0.25, the paper's).
      gamma: the scale γ (default 256, the paper's).
      stop_weight_gradient: treat ``alpha_p, alpha_n`` as constants (paper
        and PML; default True). False is ``keras.losses.Circle``'s gradient.
      **kwargs: passed to :class:`tfdml.losses.PairLoss`.

    Example::

      model.compile(optimizer="adam", loss=tfdml.losses.CircleLoss())

    Reference: Sun et al., CVPR 2020, arXiv 2002.10857.
    """

    def __init__(
        self,
        margin: float = 0.25,
        gamma: float = 256.0,
        stop_weight_gradient: bool = True,
        name: str = "circle_loss",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.margin = check_non_negative("margin", margin)
        self.gamma = check_positive("gamma", gamma)
        self.stop_weight_gradient = bool(stop_weight_gradient)

    def pair_loss(
        self,
        sim: tf.Tensor,
        pos_mask: tf.Tensor,
        neg_mask: tf.Tensor,
        pair_weights: tf.Tensor | None = None,
        **context,
    ) -> tf.Tensor:
        return circle(
            sim,
            pos_mask,
            neg_mask,
            pair_weights,
            margin=self.margin,
            gamma=self.gamma,
            stop_weight_gradient=self.stop_weight_gradient,
        )

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            margin=self.margin,
            gamma=self.gamma,
            stop_weight_gradient=self.stop_weight_gradient,
        )
        return config
