"""Pair weightings: masks -> float pair weights (no gradient)."""

from tfdml.weighting.base import Weighting  # noqa: F401
from tfdml.weighting.base import get  # noqa: F401
