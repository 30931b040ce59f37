"""Pair losses as Keras Loss subclasses."""

from tfdml.losses.base import PairLoss  # noqa: F401
from tfdml.losses.multi_similarity import MultiSimilarityLoss  # noqa: F401
from tfdml.losses.multi_similarity import multi_similarity  # noqa: F401
