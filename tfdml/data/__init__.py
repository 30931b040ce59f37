"""Data: sources, class-disjoint splits, the P x K sampler, augmentation,
and the offline TFDS builders (``tfdml.data.builders``, imported lazily)."""

from __future__ import annotations

from typing import Any

from tfdml.data.pipeline import balanced_dataset  # noqa: F401
from tfdml.data.pipeline import eval_dataset  # noqa: F401
from tfdml.data.pipeline import index_batches  # noqa: F401
from tfdml.data.pipeline import load_split_arrays  # noqa: F401
from tfdml.data.pipeline import make_augmentation  # noqa: F401
from tfdml.data.pipeline import preprocess  # noqa: F401
from tfdml.data.pipeline import split_indices  # noqa: F401
from tfdml.data.pipeline import steps_per_epoch  # noqa: F401
from tfdml.data.pipeline import to_uint8_arrays  # noqa: F401
from tfdml.data.pipeline import without_autotune  # noqa: F401
from tfdml.data.sources import ArraySource  # noqa: F401
from tfdml.data.sources import FolderSource  # noqa: F401
from tfdml.data.sources import NpzSource  # noqa: F401
from tfdml.data.sources import Source  # noqa: F401
from tfdml.data.sources import SyntheticSource  # noqa: F401
from tfdml.data.sources import TfdsSource  # noqa: F401
from tfdml.data.sources import source_from_config  # noqa: F401
from tfdml.data.splits import split_classes  # noqa: F401


def build_cjk_glyphs(
    data_dir: str | None = None, tiny: bool = False, install_fonts: bool = True
) -> str:
    """See :func:`tfdml.data.builders.build_cjk_glyphs`."""
    from tfdml.data.builders import build_cjk_glyphs as build

    return build(data_dir=data_dir, tiny=tiny, install_fonts=install_fonts)


def build_glyphs(*args: Any, **kwargs: Any) -> str:
    """See :func:`tfdml.data.builders.build_glyphs`."""
    from tfdml.data.builders import build_glyphs as build

    return build(*args, **kwargs)
