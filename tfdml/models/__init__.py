"""Embedding models and the DML training model."""

from tfdml.models.batchnorm import FusedBatchNormalization  # noqa: F401
from tfdml.models.batchnorm import batchnorm_layers  # noqa: F401
from tfdml.models.batchnorm import has_trainable_batchnorm  # noqa: F401
from tfdml.models.batchnorm import recalibrate_batchnorm  # noqa: F401
from tfdml.models.batchnorm import with_fused_batchnorm  # noqa: F401
from tfdml.models.dml_model import DMLModel  # noqa: F401
from tfdml.models.embedding import AvgMaxPooling  # noqa: F401
from tfdml.models.embedding import BackbonePreprocessing  # noqa: F401
from tfdml.models.embedding import GeneralizedMeanPooling  # noqa: F401
from tfdml.models.embedding import L2Normalization  # noqa: F401
from tfdml.models.embedding import build_embedding_model  # noqa: F401
from tfdml.models.embedding import freeze_batchnorm_layers  # noqa: F401
from tfdml.models.embedding import small_cnn  # noqa: F401
