"""Offline TFDS builders: CJK ideographs x fonts, Hangul x fonts, and
Fashion-MNIST from its Debian package.

Class = one character; instance = that character drawn by one typeface
from a Debian ``fonts-*`` package (these are typefaces, not photos or
handwriting). Builder configs: ``small`` (default; a few hundred classes
from a handful of small packages, about a minute on 2 cores), ``full``
(every package of :data:`fonts.CJK_PACKAGES`) and ``tiny`` (tests).

Usage::

  import tensorflow_datasets as tfds
  import tfdml.data.builders  # registers the builders
  ds = tfds.load("cjk_glyphs/small", data_dir=DIR, split="train")
"""

import dataclasses
import gzip
import os
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from tfdml.data.builders import fonts as fonts_lib

_CITATION = "Debian fonts-* packages; see the copyright file of each."


@dataclasses.dataclass(eq=False)
class GlyphConfig(tfds.core.BuilderConfig):
    """Which fonts and characters a glyph data set holds.

    Attributes:
      packages: Debian font packages (checked with dpkg).
      codepoints: ``(start, stop)`` code point range.
      min_font_coverage: a face is used if it covers at least this many
        (int) or this fraction (float) of the range.
      min_fonts_per_char: a character is a class if at least this many
        (int) or this fraction (float) of the kept faces draw it.
      max_classes: cap on the number of classes (seeded sample).
      size: image height = width.
      seed: seeds the face probe and the class sample.
    """

    packages: tuple = ()
    codepoints: tuple = fonts_lib.CJK_RANGE
    min_font_coverage: object = 3000
    min_fonts_per_char: object = 0.9
    max_classes: object = None
    size: int = 64
    seed: int = 0


class _GlyphBuilder(tfds.core.GeneratorBasedBuilder):
    """Shared logic of the CJK and Hangul builders."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def __init__(self, *, install_fonts=True, font_paths=None, **kwargs):
        """Args: ``install_fonts`` (apt-get missing packages when root),
        ``font_paths`` (use these font files instead of dpkg's lists),
        ``**kwargs`` (``tfds.core.GeneratorBasedBuilder``)."""
        self._install_fonts = install_fonts
        self._font_paths = list(font_paths) if font_paths else None
        super().__init__(**kwargs)

    def _info(self):
        size = self.builder_config.size
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 1)),
                    "label": tfds.features.ClassLabel(),
                    "character": tfds.features.Text(),
                    "codepoint": tfds.features.Scalar(dtype=np.int64),
                    "font_id": tfds.features.Scalar(dtype=np.int64),
                    "font_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            citation=_CITATION,
        )

    def font_paths(self):
        """Font files of the config's packages (installed if needed)."""
        if self._font_paths is not None:
            return self._font_paths
        pkgs = list(self.builder_config.packages)
        fonts_lib.ensure_packages(pkgs, install=self._install_fonts)
        return fonts_lib.fonts_of_packages(pkgs)

    def render(self):
        cfg = self.builder_config
        return fonts_lib.render_glyph_set(
            self.font_paths(),
            range(*cfg.codepoints),
            min_font_coverage=cfg.min_font_coverage,
            min_fonts_per_char=cfg.min_fonts_per_char,
            size=cfg.size,
            max_classes=cfg.max_classes,
            seed=cfg.seed,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        data = self.render()
        self.info.features["label"].names = data["chars"]
        return {"train": self._generate_examples(data)}

    def _generate_examples(self, data):
        for i in range(len(data["labels"])):
            label = int(data["labels"][i])
            font_id = int(data["font_ids"][i])
            yield (
                i,
                {
                    "image": data["images"][i][:, :, None],
                    "label": label,
                    "character": data["chars"][label],
                    "codepoint": ord(data["chars"][label]),
                    "font_id": font_id,
                    "font_name": data["fonts"][font_id],
                },
            )


class CjkGlyphs(_GlyphBuilder):
    """CJK Unified Ideographs x Debian fonts (``cjk_glyphs``)."""

    BUILDER_CONFIGS = [
        GlyphConfig(
            name="small",
            description="400 classes from 15 small font packages",
            packages=tuple(fonts_lib.SMALL_CJK_PACKAGES),
            max_classes=400,
        ),
        GlyphConfig(
            name="full",
            description="every character drawn by >= 90% of 54 packages",
            packages=tuple(fonts_lib.CJK_PACKAGES),
        ),
        GlyphConfig(
            name="tiny",
            description="tests: 3 faces, 24 classes, 32 x 32",
            packages=tuple(fonts_lib.TINY_CJK_PACKAGES),
            max_classes=24,
            min_fonts_per_char=1.0,
            size=32,
        ),
    ]


class HangulGlyphs(_GlyphBuilder):
    """Hangul syllables x Debian fonts (``hangul_glyphs``)."""

    BUILDER_CONFIGS = [
        GlyphConfig(
            name="small",
            description="400 syllables from 4 small font packages",
            packages=tuple(fonts_lib.SMALL_HANGUL_PACKAGES),
            codepoints=fonts_lib.HANGUL_RANGE,
            min_font_coverage=2000,
            max_classes=400,
        ),
        GlyphConfig(
            name="full",
            description="2000 syllables from every package",
            packages=tuple(fonts_lib.CJK_PACKAGES),
            codepoints=fonts_lib.HANGUL_RANGE,
            min_font_coverage=2000,
            max_classes=2000,
        ),
    ]


FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def read_idx(path):
    """Array from an (optionally gzipped) IDX file."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [
        int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    ]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


class FashionMnistDeb(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST from the Debian package ``dataset-fashion-mnist``.

    Xiao et al., "Fashion-MNIST: a Novel Image Dataset for Benchmarking
    Machine Learning Algorithms", arXiv:1708.07747 (MIT licence).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    PACKAGE = "dataset-fashion-mnist"

    def __init__(self, *, root=None, install=True, **kwargs):
        """Args: ``root`` (folder of the ``*-idx?-ubyte.gz`` files; default
        the Debian package's), ``install`` (apt-get it when root)."""
        self._root = root
        self._install = install
        super().__init__(**kwargs)

    def _info(self):
        return self.dataset_info_from_configs(
            description=self.__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, 1)),
                    "label": tfds.features.ClassLabel(
                        names=FASHION_MNIST_NAMES
                    ),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        root = self._root
        if root is None:
            fonts_lib.ensure_packages([self.PACKAGE], install=self._install)
            root = FASHION_MNIST_ROOT
        return {
            "train": self._generate_examples(root, "train"),
            "test": self._generate_examples(root, "t10k"),
        }

    def _generate_examples(self, root, prefix):
        x = read_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"))
        y = read_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"))
        for i in range(len(y)):
            yield i, {"image": x[i][:, :, None], "label": int(y[i])}


def build_glyphs(
    name: str = "cjk_glyphs",
    config: str | GlyphConfig = "small",
    data_dir: str | None = None,
    install_fonts: bool = True,
    font_paths: Sequence[str] | None = None,
) -> str:
    """Builds (if needed) a glyph data set; returns its TFDS name.

    Args:
      name: ``cjk_glyphs`` or ``hangul_glyphs``.
      config: ``small``, ``full``, ``tiny`` or a :class:`GlyphConfig`.
      data_dir: TFDS data_dir.
      install_fonts: apt-get missing font packages when root.
      font_paths: font files to use instead of the packages' files.
    """
    kwargs = {"config": config} if isinstance(config, GlyphConfig) else {}
    full = name if kwargs else f"{name}/{config}"
    builder = tfds.builder(
        full,
        data_dir=data_dir,
        install_fonts=install_fonts,
        font_paths=font_paths,
        **kwargs,
    )
    builder.download_and_prepare()
    return f"{name}/{builder.builder_config.name}"


def build_cjk_glyphs(
    data_dir: str | None = None, tiny: bool = False, install_fonts: bool = True
) -> str:
    """The CJK set for ``make demo``: config ``tiny`` or ``small``.

    Returns the TFDS name to load (``cjk_glyphs/small`` or
    ``cjk_glyphs/tiny``).
    """
    return build_glyphs(
        "cjk_glyphs",
        "tiny" if tiny else "small",
        data_dir=data_dir,
        install_fonts=install_fonts,
    )
