"""Pair weightings: (sim, pos_mask, neg_mask) -> float weights (no gradient)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tensorflow as tf

from tfdml import registry


class Weighting:
    """Base pair weighting.

    ``__call__(sim, pos_mask, neg_mask, **context)`` returns
    ``(w_pos, w_neg)``, float32 ``[B, M]`` tensors that are zero outside their
    mask and carry no gradient (``tf.stop_gradient``). ``context`` carries
    optional per-example inputs such as ``probs`` / ``ref_probs`` (the
    true-class probabilities that CAA needs).

    Subclasses also set ``space``: ``"similarity"`` when the weights are
    ``|∂L/∂S|`` of the loss they come from (MS, binomial), ``"distance"``
    when they are ``|∂L/∂D|`` for ``D = sqrt(2 - 2 S)`` (lifted, OSM, CAA);
    :class:`tfdml.losses.GeneralPairWeightingLoss` converts with the chain
    rule.
    """

    def __call__(
        self,
        sim: tf.Tensor,
        pos_mask: tf.Tensor,
        neg_mask: tf.Tensor,
        **context,
    ) -> tuple[tf.Tensor, tf.Tensor]:
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Weighting:
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def get(spec: Weighting | str | Mapping[str, Any] | None) -> Weighting | None:
    """Builds a weighting from a name, a dict or an instance."""
    return registry.build(Weighting, spec)
