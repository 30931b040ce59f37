"""Hardest-pair mining ("batch hard", Hermans et al., "In Defense of the
Triplet Loss for Person Re-Identification", arXiv 1703.07737, Sec. 2).

Per anchor keep exactly one positive, the least similar one, and one negative,
the most similar one, as one-hot masks. Ties go to the lowest reference index
(deterministic on every device, unlike ``argmax``). An anchor with no positive
(or no negative) keeps none.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from tfdml import ops
from tfdml import registry
from tfdml.mining.base import Miner


def first_one_hot(candidates):
    """One-hot of the first True entry per row (all False if none)."""
    candidates = tf.cast(candidates, tf.bool)
    m = tf.shape(candidates)[1]
    index = tf.range(m, dtype=tf.int32)[None, :]
    first = tf.reduce_min(
        tf.where(candidates, index, tf.fill(tf.shape(candidates), m)), axis=1
    )
    return tf.logical_and(candidates, tf.equal(index, first[:, None]))


@registry.register
class HardestMiner(Miner):
    """Keeps the hardest positive and the hardest negative of each anchor.

    Args:
      positives: mine the hardest positive (otherwise keep all positives).
      negatives: mine the hardest negative (otherwise keep all negatives).

    Example::

      loss = tfdml.losses.ContrastiveLoss(miner=HardestMiner())
    """

    def __init__(self, positives: bool = True, negatives: bool = True):
        self.positives = bool(positives)
        self.negatives = bool(negatives)

    def __call__(
        self, sim: tf.Tensor, pos_mask: tf.Tensor, neg_mask: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        pos_mask = tf.cast(pos_mask, tf.bool)
        neg_mask = tf.cast(neg_mask, tf.bool)
        sim = tf.stop_gradient(tf.cast(sim, tf.float32))
        if self.positives:
            low = ops.masked_min(sim, pos_mask)[:, None]
            pos_mask = first_one_hot(tf.logical_and(pos_mask, sim <= low))
        if self.negatives:
            high = ops.masked_max(sim, neg_mask)[:, None]
            neg_mask = first_one_hot(tf.logical_and(neg_mask, sim >= high))
        return pos_mask, neg_mask

    def get_config(self) -> dict[str, Any]:
        return {"positives": self.positives, "negatives": self.negatives}
