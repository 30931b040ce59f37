"""Basic miners: all pairs and similarity / distance thresholds.

* :class:`AllPairsMiner` keeps every pair (the identity).
* :class:`ThresholdMiner` keeps positives that are still "far" and negatives
  that are still "close" (PML's ``PairMarginMiner`` reading): in similarity
  form a positive is kept when ``S < pos_threshold`` and a negative when
  ``S > neg_threshold``; in distance form (Euclidean distance of unit vectors,
  ``d = sqrt(2 - 2 S)``) a positive is kept when ``d > pos_threshold`` and a
  negative when ``d < neg_threshold``. ``None`` disables a side.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from tfdml import ops
from tfdml import registry
from tfdml.mining.base import Miner


def check_form(form):
    if form not in ("similarity", "distance"):
        raise ValueError(
            "`form` must be 'similarity' or 'distance'; received "
            f"form={form!r}."
        )
    return form


@registry.register
class AllPairsMiner(Miner):
    """Keeps every positive and negative pair (the identity miner)."""

    def __call__(
        self, sim: tf.Tensor, pos_mask: tf.Tensor, neg_mask: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        return tf.cast(pos_mask, tf.bool), tf.cast(neg_mask, tf.bool)


@registry.register
class ThresholdMiner(Miner):
    """Keeps the pairs that violate fixed thresholds.

    Args:
      pos_threshold: similarity form: keep positives with ``S <
        pos_threshold``; distance form: keep positives with ``d >
        pos_threshold``. ``None`` keeps every positive.
      neg_threshold: similarity form: keep negatives with ``S >
        neg_threshold``; distance form: keep negatives with ``d <
        neg_threshold``. ``None`` keeps every negative.
      form: ``"similarity"`` (cosine, the default) or ``"distance"``
        (Euclidean distance of L2-normalised embeddings).

    Example::

      miner = ThresholdMiner(pos_threshold=0.8, neg_threshold=0.5)

    Reference: PML ``PairMarginMiner`` (Musgrave et al., ECCV 2020).
    """

    def __init__(
        self,
        pos_threshold: float | None = None,
        neg_threshold: float | None = None,
        form: str = "similarity",
    ):
        self.form = check_form(form)
        self.pos_threshold = _opt_float("pos_threshold", pos_threshold)
        self.neg_threshold = _opt_float("neg_threshold", neg_threshold)
        if form == "distance":
            for name in ("pos_threshold", "neg_threshold"):
                value = getattr(self, name)
                if value is not None and value < 0:
                    raise ValueError(
                        f"`{name}` must be >= 0 in distance form; received "
                        f"{name}={value!r}."
                    )

    def __call__(
        self, sim: tf.Tensor, pos_mask: tf.Tensor, neg_mask: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        pos = tf.cast(pos_mask, tf.bool)
        neg = tf.cast(neg_mask, tf.bool)
        sim = tf.cast(sim, tf.float32)
        if self.form == "similarity":
            if self.pos_threshold is not None:
                pos = tf.logical_and(pos, sim < self.pos_threshold)
            if self.neg_threshold is not None:
                neg = tf.logical_and(neg, sim > self.neg_threshold)
        else:
            dist = ops.distance_from_similarity(sim)
            if self.pos_threshold is not None:
                pos = tf.logical_and(pos, dist > self.pos_threshold)
            if self.neg_threshold is not None:
                neg = tf.logical_and(neg, dist < self.neg_threshold)
        return pos, neg

    def get_config(self) -> dict[str, Any]:
        return {
            "pos_threshold": self.pos_threshold,
            "neg_threshold": self.neg_threshold,
            "form": self.form,
        }


def _opt_float(name, value):
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"`{name}` must be a number or None; received {name}={value!r}."
        ) from None
