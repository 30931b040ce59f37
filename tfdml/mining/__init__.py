"""Miners: masks -> narrower masks."""

from tfdml.mining.base import Miner  # noqa: F401
from tfdml.mining.base import get  # noqa: F401
from tfdml.mining.basic import AllPairsMiner  # noqa: F401
from tfdml.mining.basic import ThresholdMiner  # noqa: F401
from tfdml.mining.hardest import HardestMiner  # noqa: F401
from tfdml.mining.multi_similarity import MultiSimilarityMiner  # noqa: F401
from tfdml.mining.semi_hard import SemiHardMiner  # noqa: F401
