"""Miners: masks -> narrower masks."""

from tfdml.mining.base import Miner  # noqa: F401
from tfdml.mining.base import get  # noqa: F401
from tfdml.mining.multi_similarity import MultiSimilarityMiner  # noqa: F401
