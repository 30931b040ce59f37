"""Miners: (sim, pos_mask, neg_mask) -> narrower (pos_mask, neg_mask)."""

from tfdml import registry


class Miner:
    """Base miner. Subclasses implement ``__call__`` and ``get_config``.

    A miner never widens a mask: it returns subsets of the masks it receives.
    All arguments are ``[B, M]`` tensors (see :mod:`tfdml.ops`).
    """

    def __call__(self, sim, pos_mask, neg_mask):
        raise NotImplementedError

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def get(spec):
    """Builds a miner from a name, a dict or an instance (None stays None)."""
    return registry.build(Miner, spec)
