"""Multi-similarity relative mining (Wang et al., CVPR 2019, §3.3).

Keep a negative if ``S_ik > min_{pos} S_ij - epsilon`` and a positive if
``S_ij < max_{neg} S_ik + epsilon``; positives with ``S >= 1 - 1e-5`` (exact
duplicates) are dropped as in the msight code.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from tfdml import ops
from tfdml import registry
from tfdml.mining.base import Miner
from tfdml.validation import check_non_negative


@registry.register
class MultiSimilarityMiner(Miner):
    """MS relative-similarity mining.

    Args:
      epsilon: the margin ε of the relative test (msight code: 0.1).
      drop_duplicate_positives: drop positives with ``S >= 1 - 1e-5``.
    """

    def __init__(
        self, epsilon: float = 0.1, drop_duplicate_positives: bool = True
    ):
        self.epsilon = check_non_negative("epsilon", epsilon)
        self.drop_duplicate_positives = bool(drop_duplicate_positives)

    def __call__(
        self, sim: tf.Tensor, pos_mask: tf.Tensor, neg_mask: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        if self.drop_duplicate_positives:
            pos_mask = tf.logical_and(pos_mask, sim < 1.0 - 1e-5)
        min_pos = ops.masked_min(sim, pos_mask)[:, None]
        max_neg = ops.masked_max(sim, neg_mask)[:, None]
        neg = tf.logical_and(neg_mask, sim > min_pos - self.epsilon)
        pos = tf.logical_and(pos_mask, sim < max_neg + self.epsilon)
        return pos, neg

    def get_config(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon,
            "drop_duplicate_positives": self.drop_duplicate_positives,
        }
