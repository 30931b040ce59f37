"""Retrieval evaluation: embedding, exact metrics, indexes, a Keras callback,
plots."""

from tfdml.eval.calibrate import CalibrationResult  # noqa: F401
from tfdml.eval.calibrate import PrecisionUnreachableError  # noqa: F401
from tfdml.eval.calibrate import calibrate  # noqa: F401
from tfdml.eval.calibrate import precision_recall_at  # noqa: F401
from tfdml.eval.callbacks import RetrievalEvaluationCallback  # noqa: F401
from tfdml.eval.embed import embed  # noqa: F401
from tfdml.eval.embed import embedding_function  # noqa: F401
from tfdml.eval.index import BruteForceIndex  # noqa: F401
from tfdml.eval.index import ScaNNIndex  # noqa: F401
from tfdml.eval.metrics import metrics_from_neighbors  # noqa: F401
from tfdml.eval.metrics import metrics_from_ranks  # noqa: F401
from tfdml.eval.metrics import nmi_ami  # noqa: F401
from tfdml.eval.metrics import retrieval_metrics  # noqa: F401
