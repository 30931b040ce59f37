"""Miners: (sim, pos_mask, neg_mask) -> narrower (pos_mask, neg_mask)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tensorflow as tf

from tfdml import registry


class Miner:
    """Base miner. Subclasses implement ``__call__`` and ``get_config``.

    A miner never widens a mask: it returns subsets of the masks it receives.
    All arguments are ``[B, M]`` tensors (see :mod:`tfdml.ops`).
    """

    def __call__(
        self, sim: tf.Tensor, pos_mask: tf.Tensor, neg_mask: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Miner:
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def get(spec: Miner | str | Mapping[str, Any] | None) -> Miner | None:
    """Builds a miner from a name, a dict or an instance (None stays None)."""
    return registry.build(Miner, spec)
