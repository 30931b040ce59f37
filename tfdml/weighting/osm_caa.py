"""Online Soft Mining and Class-Aware Attention weights (Wang et al., "Deep
Metric Learning by Online Soft Mining and Class-Aware Attention", AAAI 2019,
arXiv 1811.01459; official Caffe layer
``DistanceWeightedValidPairLossV5``, commit d9f516c).

* OSM (distance space, ``D`` the Euclidean distance of L2-normalised
  embeddings): positive score ``exp(-D^2 / (2 sigma^2))`` (sigma 0.8),
  negative score ``max(0, margin - D)`` (margin 1.2).
* CAA: ``a_i = N(p_i; mu=1, sigma=0.68)`` (Gaussian pdf) of the true-class
  probability ``p_i`` (no gradient); pair attention ``min(a_i, a_j)`` (the
  official code; the product is commented out there, ``combine="product"``).

The raw scores are returned; the per-polarity normalisation of
``OSM x CAA`` belongs to :class:`tfdml.losses.WeightedContrastiveLoss`.
"""

from __future__ import annotations

import math
from typing import Any

import tensorflow as tf

from tfdml import ops
from tfdml import registry
from tfdml.validation import check_choice
from tfdml.weighting.base import Weighting
from tfdml.weighting.basic import check_number
from tfdml.weighting.basic import finish


@registry.register
class OSMWeighting(Weighting):
    """Online soft mining scores (distance space).

    Args:
      sigma: width of the Gaussian positive score (default 0.8).
      margin: the negative margin m (default 1.2).

    A ``distance=[B, M]`` context entry replaces ``sqrt(2 - 2 S)`` (e.g. the
    distances of unnormalised features).

    Example::

      s_pos, s_neg = OSMWeighting()(sim, pos_mask, neg_mask)
    """

    space = "distance"

    def __init__(self, sigma: float = 0.8, margin: float = 1.2):
        self.sigma = check_number("sigma", sigma, 0.0, strict=True)
        self.margin = check_number("margin", margin, 0.0, strict=True)

    def __call__(
        self,
        sim: tf.Tensor,
        pos_mask: tf.Tensor,
        neg_mask: tf.Tensor,
        distance: tf.Tensor | None = None,
        **context,
    ) -> tuple[tf.Tensor, tf.Tensor]:
        if distance is None:
            distance = ops.distance_from_similarity(tf.cast(sim, tf.float32))
        d = tf.cast(distance, tf.float32)
        s_pos = tf.exp(-tf.square(d) / (2.0 * self.sigma**2))
        s_neg = tf.nn.relu(self.margin - d)
        return finish(s_pos, s_neg, pos_mask, neg_mask)

    def get_config(self) -> dict[str, Any]:
        return {"sigma": self.sigma, "margin": self.margin}


def gaussian_pdf(x, mu, sigma):
    x = tf.cast(x, tf.float32)
    norm = 1.0 / (sigma * math.sqrt(2.0 * math.pi))
    return norm * tf.exp(-tf.square(x - mu) / (2.0 * sigma**2))


@registry.register
class CAAWeighting(Weighting):
    """Class-aware attention ``min(a_i, a_j)`` on both masks.

    Needs ``probs`` ``[B]`` (true-class probabilities of the anchors) in the
    context and, when the references are not the batch, ``ref_probs``
    ``[M]``.

    Args:
      mu: mean of the Gaussian (default 1.0).
      sigma: its standard deviation (default 0.68).
      combine: ``"min"`` (official code, default) or ``"product"``.

    Example::

      a_pos, a_neg = CAAWeighting()(sim, pos, neg, probs=p, ref_probs=p)
    """

    space = "distance"

    def __init__(
        self, mu: float = 1.0, sigma: float = 0.68, combine: str = "min"
    ):
        self.mu = check_number("mu", mu)
        self.sigma = check_number("sigma", sigma, 0.0, strict=True)
        self.combine = check_choice("combine", combine, ("min", "product"))

    def attention(self, probs: tf.Tensor) -> tf.Tensor:
        """``a = N(p; mu, sigma)`` without gradient."""
        return tf.stop_gradient(gaussian_pdf(probs, self.mu, self.sigma))

    def __call__(
        self,
        sim: tf.Tensor,
        pos_mask: tf.Tensor,
        neg_mask: tf.Tensor,
        probs: tf.Tensor | None = None,
        ref_probs: tf.Tensor | None = None,
        **context,
    ) -> tuple[tf.Tensor, tf.Tensor]:
        if probs is None:
            raise ValueError(
                "CAAWeighting needs the true-class probabilities: pass "
                "`probs` [B] (and `ref_probs` [M]); received probs=None."
            )
        if ref_probs is None:
            if sim.shape[0] != sim.shape[1] and None not in sim.shape:
                raise ValueError(
                    "`ref_probs` is required when the reference set has "
                    f"another size; received ref_probs=None for sim of "
                    f"shape {sim.shape}."
                )
            ref_probs = probs
        a = self.attention(tf.reshape(probs, [-1]))
        b = self.attention(tf.reshape(ref_probs, [-1]))
        if self.combine == "min":
            att = tf.minimum(a[:, None], b[None, :])
        else:
            att = a[:, None] * b[None, :]
        return finish(att, att, pos_mask, neg_mask)

    def get_config(self) -> dict[str, Any]:
        return {"mu": self.mu, "sigma": self.sigma, "combine": self.combine}
