"""Offline TFDS builders (importing this module registers them)."""

from tfdml.data.builders.fonts import CJK_PACKAGES  # noqa: F401
from tfdml.data.builders.fonts import SMALL_CJK_PACKAGES  # noqa: F401
from tfdml.data.builders.fonts import SMALL_HANGUL_PACKAGES  # noqa: F401
from tfdml.data.builders.fonts import TINY_CJK_PACKAGES  # noqa: F401
from tfdml.data.builders.fonts import MissingPackagesError  # noqa: F401
from tfdml.data.builders.fonts import ensure_packages  # noqa: F401
from tfdml.data.builders.glyphs import CjkGlyphs  # noqa: F401
from tfdml.data.builders.glyphs import FashionMnistDeb  # noqa: F401
from tfdml.data.builders.glyphs import GlyphConfig  # noqa: F401
from tfdml.data.builders.glyphs import HangulGlyphs  # noqa: F401
from tfdml.data.builders.glyphs import build_cjk_glyphs  # noqa: F401
from tfdml.data.builders.glyphs import build_glyphs  # noqa: F401
