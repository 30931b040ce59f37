"""MMSI: meta-mined pair weights with semi-global information."""

from tfdml.meta.forms import MMSIContrastiveLoss  # noqa: F401
from tfdml.meta.forms import MMSIMultiSimilarityLoss  # noqa: F401
from tfdml.meta.forms import MMSIPairLoss  # noqa: F401
from tfdml.meta.forms import MMSITripletLoss  # noqa: F401
from tfdml.meta.mmsi import MMSIModel  # noqa: F401
from tfdml.meta.mmsi import fast_raw_weights  # noqa: F401
from tfdml.meta.mmsi import meta_dataset  # noqa: F401
from tfdml.meta.mmsi import nested_raw_weights  # noqa: F401
from tfdml.meta.mmsi import normalize_weights  # noqa: F401
from tfdml.meta.mmsi import validation_dataset  # noqa: F401
