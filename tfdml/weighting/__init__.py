"""Pair weightings: masks -> float pair weights (no gradient)."""

from tfdml.weighting.base import Weighting  # noqa: F401
from tfdml.weighting.base import get  # noqa: F401
from tfdml.weighting.basic import ConstantWeighting  # noqa: F401
from tfdml.weighting.binomial import BinomialWeighting  # noqa: F401
from tfdml.weighting.lifted import LiftedWeighting  # noqa: F401
from tfdml.weighting.multi_similarity import (  # noqa: F401
    MultiSimilarityWeighting,
)
from tfdml.weighting.osm_caa import CAAWeighting  # noqa: F401
from tfdml.weighting.osm_caa import OSMWeighting  # noqa: F401
