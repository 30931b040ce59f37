"""SavedModel export for TF-Serving (embedding + retrieval endpoints)."""

from tfdml.export.saved_model import build_archive  # noqa: F401
from tfdml.export.saved_model import export_saved_model  # noqa: F401
from tfdml.export.saved_model import images_to_float  # noqa: F401
from tfdml.export.saved_model import validate_gallery  # noqa: F401
