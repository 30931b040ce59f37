"""Embedding-space augmentation: IAA (intra-class adaptive augmentation)."""

from tfdml.augment.iaa import IAAEstimator  # noqa: F401
from tfdml.augment.iaa import IAARefresh  # noqa: F401
from tfdml.augment.iaa import IAAugmenter  # noqa: F401
from tfdml.augment.iaa import adaptive_weight  # noqa: F401
from tfdml.augment.iaa import neighbor_correction  # noqa: F401
from tfdml.augment.iaa import official_lambda  # noqa: F401
