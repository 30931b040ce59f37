"""Constant pair weighting and the helpers shared by every weighting.

A weighting returns ``(w_pos, w_neg)``: float32 ``[B, M]``, zero outside its
mask, without gradient. Each class states the *space* its weights live in
(``space``): ``"similarity"`` weights are ``|∂L/∂S|`` of the loss they come
from; ``"distance"`` weights are ``|∂L/∂D|`` for the Euclidean distance of
L2-normalised embeddings ``D = sqrt(2 - 2 S)``.
:class:`tfdml.losses.GeneralPairWeightingLoss` converts between the two with
the chain rule (``dS/dD = -D``).
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from tfdml import registry
from tfdml.validation import check_choice
from tfdml.weighting.base import Weighting

SPACES = ("similarity", "distance")
REDUCTIONS = ("sum", "avg")


def finish(w_pos, w_neg, pos_mask, neg_mask):
    """Zeroes weights outside the masks, casts to float32, stops gradients."""
    pos_mask = tf.cast(pos_mask, tf.bool)
    neg_mask = tf.cast(neg_mask, tf.bool)
    w_pos = tf.cast(w_pos, tf.float32)
    w_neg = tf.cast(w_neg, tf.float32)
    w_pos = tf.where(pos_mask, w_pos, tf.zeros_like(w_pos))
    w_neg = tf.where(neg_mask, w_neg, tf.zeros_like(w_neg))
    return tf.stop_gradient(w_pos), tf.stop_gradient(w_neg)


def per_anchor_count(mask):
    """``[B, 1]`` float32 number of pairs of each anchor in ``mask``."""
    return tf.reduce_sum(tf.cast(mask, tf.float32), axis=1, keepdims=True)


def check_number(name, value, low=None, strict=False):
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"`{name}` must be a number; received {name}={value!r}."
        ) from None
    if low is not None and (value <= low if strict else value < low):
        op = ">" if strict else ">="
        raise ValueError(
            f"`{name}` must be {op} {low}; received {name}={value!r}."
        )
    return value


@registry.register
class ConstantWeighting(Weighting):
    """Every mined pair gets the same weight (contrastive-style weighting).

    Args:
      pos_weight: weight of every positive pair (default 1).
      neg_weight: weight of every negative pair (default 1).
      reduction: ``"sum"`` (default) keeps the constants; ``"avg"`` divides
        each anchor's weights by its number of mined pairs of that polarity
        (what PML's ``AvgNonZeroReducer`` does when the miner keeps exactly
        the pairs with a non-zero hinge).
      space: ``"similarity"`` or ``"distance"`` (default): the space in which
        the weights are constant.

    Example::

      loss = tfdml.losses.GeneralPairWeightingLoss(
          miner=tfdml.mining.ThresholdMiner(0.0, 1.0, form="distance"),
          weighting=ConstantWeighting(), distance="euclidean")
    """

    def __init__(
        self,
        pos_weight: float = 1.0,
        neg_weight: float = 1.0,
        reduction: str = "sum",
        space: str = "distance",
    ):
        self.pos_weight = check_number("pos_weight", pos_weight, 0.0)
        self.neg_weight = check_number("neg_weight", neg_weight, 0.0)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        self.space = check_choice("space", space, SPACES)

    def __call__(
        self,
        sim: tf.Tensor,
        pos_mask: tf.Tensor,
        neg_mask: tf.Tensor,
        **context,
    ) -> tuple[tf.Tensor, tf.Tensor]:
        ones = tf.ones_like(tf.cast(sim, tf.float32))
        w_pos = self.pos_weight * ones
        w_neg = self.neg_weight * ones
        if self.reduction == "avg":
            w_pos = tf.math.divide_no_nan(w_pos, per_anchor_count(pos_mask))
            w_neg = tf.math.divide_no_nan(w_neg, per_anchor_count(neg_mask))
        return finish(w_pos, w_neg, pos_mask, neg_mask)

    def get_config(self) -> dict[str, Any]:
        return {
            "pos_weight": self.pos_weight,
            "neg_weight": self.neg_weight,
            "reduction": self.reduction,
            "space": self.space,
        }
