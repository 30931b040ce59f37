"""Image sources: TFDS, image folders, ``.npz`` files, numpy arrays, synthetic.

A source holds ``labels`` (np.int64 ``[N]``) and gives uint8 images
``[H, W, C]`` (``C`` in {1, 3}; sizes may differ between examples) for
example indices, either one at a time (:meth:`Source.load`) or as a
``tf.data.Dataset`` of ``(image, label)`` (:meth:`Source.dataset`).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import tensorflow as tf

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

# data-section keys used by the sampler / splits, not by the source.
SAMPLER_KEYS = frozenset(
    {
        "classes_per_batch",
        "samples_per_class",
        "val_classes",
        "val_fraction",
        "test_fraction",
        "augmentation",
        "eval_max_per_class",
        "seed",
    }
)

# Arrays up to this size go into tf.data as constants (graph limit 2 GB).
MAX_CONSTANT_BYTES = 1 << 30

# TFDS images of a fixed shape are decoded into one array up to this size.
MAX_DECODED_BYTES = 3 << 30

# Label ids above this are remapped to 0..C-1 (the pipelines, the losses and
# the class tables hold int32 ids).
MAX_LABEL_ID = int(np.iinfo(np.int32).max) - 1

# Default label keys of TFDS data sets whose label is not called "label".
TFDS_LABEL_KEYS = {"stanford_online_products": "class_id"}


def dense_label_ids(labels, class_names=None):
    """``(int64 labels, class_names, label_ids)`` with ids that fit int32.

    Labels up to :data:`MAX_LABEL_ID` are kept as they are (``label_ids`` is
    None). Larger ids (e.g. 1e11-scale product ids) are replaced by their
    rank among the distinct ids (``np.unique``), so no table is ever sized
    by the largest id; ``label_ids[new_id]`` is the original id and, when no
    ``class_names`` are given, ``class_names[new_id]`` is its string.
    """
    labels = np.asarray(labels).astype(np.int64)
    if not len(labels) or labels.max() <= MAX_LABEL_ID:
        return labels, class_names, None
    ids, inverse = np.unique(labels, return_inverse=True)
    if class_names is None:
        class_names = [str(int(i)) for i in ids]
    return inverse.astype(np.int64).reshape(-1), class_names, ids


def _as_hwc(image, what="image"):
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8; received dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"{what} must be [H, W] or [H, W, C] with C in (1, 3, 4); "
            f"received shape {image.shape}"
        )
    if image.shape[-1] == 4:
        image = image[:, :, :3]
    return image


class Source:
    """Base class: ``labels`` plus random access to uint8 images.

    Subclasses set ``self.labels`` and implement :meth:`load`.
    ``class_names`` (optional) maps label id -> name.
    """

    labels = None
    class_names = None

    def __len__(self):
        return int(len(self.labels))

    @property
    def classes(self):
        """Sorted distinct label ids (np.int64)."""
        return np.unique(self.labels)

    def load(self, index: int) -> np.ndarray:
        """uint8 image ``[H, W, C]`` of example ``index``."""
        raise NotImplementedError

    def load_batch(
        self, indices: npt.ArrayLike
    ) -> list[np.ndarray] | np.ndarray:
        """List of uint8 images for ``indices``."""
        return [self.load(int(i)) for i in indices]

    def tf_load(self, index: tf.Tensor) -> tf.Tensor:
        """Graph-mode loader: int64 scalar -> uint8 ``[H, W, C]`` tensor."""
        import tensorflow as tf

        image = tf.numpy_function(
            lambda i: self.load(int(i)), [index], tf.uint8, stateful=False
        )
        image.set_shape([None, None, None])
        return image

    def dataset(self, indices: npt.ArrayLike) -> tf.data.Dataset:
        """``tf.data`` of ``(uint8 image [H, W, C], int64 label)``."""
        import tensorflow as tf

        indices = np.asarray(indices, np.int64)
        labels = self.labels[indices].astype(np.int64)
        ds = tf.data.Dataset.from_tensor_slices((indices, labels))
        return ds.map(
            lambda i, y: (self.tf_load(i), y),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )

    def indices_of(self, classes: npt.ArrayLike) -> np.ndarray:
        """Example indices (ascending) whose label is in ``classes``."""
        return np.flatnonzero(np.isin(self.labels, np.asarray(classes)))


class ArraySource(Source):
    """In-memory numpy images.

    Args:
      images: uint8 ``[N, H, W]`` or ``[N, H, W, C]`` (C in 1, 3, 4), or a
        list of uint8 ``[H, W(, C)]`` arrays of different sizes.
      labels: int ``[N]``, >= 0. Ids above :data:`MAX_LABEL_ID` are
        remapped to ``0..C-1`` in sorted order (``label_ids`` holds the
        originals), see :func:`dense_label_ids`.
      class_names: optional list, label id -> name.
    """

    label_ids = None

    def __init__(
        self,
        images: npt.ArrayLike,
        labels: npt.ArrayLike,
        class_names: Sequence[str] | None = None,
    ):
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                "labels must be a 1-D integer array; received dtype "
                f"{labels.dtype} shape {labels.shape}"
            )
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8:
                raise ValueError(
                    f"images must be uint8; received dtype {images.dtype}"
                )
            if images.ndim == 3:
                images = images[..., None]
            if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
                raise ValueError(
                    "images must be [N, H, W] or [N, H, W, C] with C in "
                    f"(1, 3, 4); received shape {images.shape}"
                )
            if images.shape[-1] == 4:
                images = images[..., :3]
        else:
            images = [
                _as_hwc(im, f"images[{i}]") for i, im in enumerate(images)
            ]
        if len(images) != len(labels):
            raise ValueError(
                f"images and labels differ in length: {len(images)} vs "
                f"{len(labels)}"
            )
        if len(labels) and labels.min() < 0:
            raise ValueError(f"labels must be >= 0; received {labels.min()}")
        self.images = images
        self.labels, self.class_names, self.label_ids = dense_label_ids(
            labels, class_names
        )

    def load(self, index: int) -> np.ndarray:
        return np.asarray(self.images[index])

    def load_batch(
        self, indices: npt.ArrayLike
    ) -> list[np.ndarray] | np.ndarray:
        if isinstance(self.images, np.ndarray):
            return self.images[np.asarray(indices, np.int64)]
        return super().load_batch(indices)

    def tf_load(self, index: tf.Tensor) -> tf.Tensor:
        if not isinstance(self.images, np.ndarray):
            return super().tf_load(index)
        import tensorflow as tf

        shape = self.images.shape[1:]
        image = tf.numpy_function(
            lambda i: self.images[int(i)], [index], tf.uint8, stateful=False
        )
        image.set_shape(shape)
        return image

    def dataset(self, indices: npt.ArrayLike) -> tf.data.Dataset:
        indices = np.asarray(indices, np.int64)
        if (
            not isinstance(self.images, np.ndarray)
            or self.images[:1].nbytes * len(indices) > MAX_CONSTANT_BYTES
        ):
            return super().dataset(indices)
        import tensorflow as tf

        return tf.data.Dataset.from_tensor_slices(
            (self.images[indices], self.labels[indices])
        )


class NpzSource(ArraySource):
    """``.npz`` file with ``X`` (uint8 images) and ``y`` (int labels)."""

    def __init__(self, path: str | os.PathLike[str]):
        if not os.path.isfile(path):
            raise ValueError(f"data.path: no such .npz file {path!r}")
        if not zipfile.is_zipfile(path):
            raise ValueError(
                f"data.path {path!r}: not an .npz file (a zip archive of "
                "arrays, as np.savez writes it, with uint8 images X and "
                "integer labels y)"
            )
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in ("X", "y") if k not in z.files]
                if missing:
                    raise ValueError(
                        f"data.path {path!r}: missing array(s) {missing}; "
                        f"found {sorted(z.files)}"
                    )
                arrays = {}
                for key in ("X", "y"):
                    try:
                        arrays[key] = z[key]
                    except ValueError as e:
                        what = f"cannot be read ({e})"
                        if "pickle" in str(e):
                            what = (
                                "holds Python objects (dtype object), which "
                                "are not loaded"
                            )
                        raise ValueError(
                            f"data.path {path!r}: array {key!r} {what}; "
                            "save X as uint8 images and y as integer labels"
                        ) from None
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            raise ValueError(
                f"data.path {path!r}: cannot read the .npz file: {e}"
            ) from None
        try:
            super().__init__(arrays["X"], arrays["y"])
        except ValueError as e:
            raise ValueError(f"data.path {path!r}: {e}") from None
        self.path = path


class FolderSource(Source):
    """One sub-folder per class; class ids follow the sorted folder names.

    Images may be grayscale or RGB(A) of any size; they are read with
    Pillow on access.
    """

    def __init__(self, path: str | os.PathLike[str]):
        if not os.path.isdir(path):
            raise ValueError(f"data.path: no such folder {path!r}")
        names = sorted(
            d
            for d in os.listdir(path)
            if os.path.isdir(os.path.join(path, d)) and not d.startswith(".")
        )
        files, labels = [], []
        for k, name in enumerate(names):
            folder = os.path.join(path, name)
            for f in sorted(os.listdir(folder)):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.join(folder, f))
                    labels.append(k)
        if not files:
            raise ValueError(
                f"data.path {path!r}: no images found in class sub-folders "
                f"(extensions {IMAGE_EXTENSIONS})"
            )
        self.path = path
        self.files = files
        self.labels = np.asarray(labels, np.int64)
        self.class_names = names

    def load(self, index: int) -> np.ndarray:
        from PIL import Image

        with Image.open(self.files[index]) as im:
            if im.mode not in ("L", "RGB"):
                im = im.convert("RGB" if len(im.getbands()) >= 3 else "L")
            return _as_hwc(np.asarray(im, np.uint8), self.files[index])


class SyntheticSource(ArraySource):
    """Small deterministic class-structured image set (tests, smoke runs).

    Every class has a random smooth prototype (a few Gaussian blobs);
    its examples are the prototype shifted by up to ``max_shift`` pixels,
    with random contrast and pixel noise. A CNN can learn the classes.

    Args:
      num_classes: number of classes.
      examples_per_class: examples per class (int) or ``(lo, hi)`` range.
      size: image height = width.
      channels: 1 (gray) or 3 (colour).
      seed: everything follows from it.
    """

    def __init__(
        self,
        num_classes: int = 24,
        examples_per_class: int = 16,
        size: int = 32,
        channels: int = 1,
        seed: int = 0,
        max_shift: int = 2,
    ):
        if num_classes < 2:
            raise ValueError(
                f"num_classes must be >= 2; received {num_classes}"
            )
        if size < 4:
            raise ValueError(f"size must be >= 4; received {size}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3; received {channels}")
        rng = np.random.default_rng(seed)
        if isinstance(examples_per_class, (list, tuple)):
            lo, hi = examples_per_class
            counts = rng.integers(lo, hi + 1, num_classes)
        else:
            counts = np.full(num_classes, int(examples_per_class))
        if counts.min() < 1:
            raise ValueError(
                "examples_per_class must be >= 1; received "
                f"{examples_per_class}"
            )
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        images, labels = [], []
        for c in range(num_classes):
            proto = np.zeros((size, size, channels), np.float32)
            for _ in range(3):
                cy, cx = rng.uniform(0.2, 0.8, 2) * size
                s = rng.uniform(0.08, 0.2) * size
                color = rng.uniform(0.3, 1.0, channels)
                blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
                proto += blob[:, :, None] * color
            proto /= proto.max()
            for _ in range(counts[c]):
                dy, dx = rng.integers(-max_shift, max_shift + 1, 2)
                im = np.roll(proto, (dy, dx), axis=(0, 1))
                im = im * rng.uniform(0.7, 1.0) + rng.normal(0, 0.08, im.shape)
                images.append(np.clip(im * 255, 0, 255).astype(np.uint8))
                labels.append(c)
        super().__init__(np.stack(images), np.asarray(labels))


class TfdsSource(Source):
    """A TFDS data set by name (all its splits, concatenated).

    The encoded images stay in memory (``SkipDecoding``); they are decoded
    on access. The builders of :mod:`tfdml.data.builders` (``cjk_glyphs``,
    ``hangul_glyphs``, ``fashion_mnist_deb``) are registered first, so
    they load (and build, when not prepared yet) by name.

    Args:
      name: TFDS name, optionally ``name/config:version``.
      image_key, label_key: feature keys (defaults: ``image`` and
        ``label``; ``class_id`` for ``stanford_online_products``).
      data_dir: TFDS data_dir.
      manual_dir: directory of manually downloaded files (SOP).
      split: TFDS split expression (default: every split).
      download: let TFDS download / build when not prepared.
      builder_kwargs: extra keyword arguments of the builder.
    """

    def __init__(
        self,
        name: str,
        image_key: str = "image",
        label_key: str | None = None,
        data_dir: str | None = None,
        manual_dir: str | None = None,
        split: str | None = None,
        download: bool = True,
        builder_kwargs: Mapping[str, Any] | None = None,
    ):
        import tensorflow_datasets as tfds

        from tfdml.data import builders  # noqa: F401  (registers them)

        if not name:
            raise ValueError("data.name: a TFDS name is required")
        base = name.split("/")[0].split(":")[0]
        label_key = label_key or TFDS_LABEL_KEYS.get(base, "label")
        builder = tfds.builder(
            name, data_dir=data_dir, **(builder_kwargs or {})
        )
        features = builder.info.features
        for key, what in ((image_key, "image_key"), (label_key, "label_key")):
            if key not in features:
                raise ValueError(
                    f"data.{what}: {name} has no feature {key!r}; features: "
                    f"{sorted(features.keys())}"
                )
        if download:
            config = tfds.download.DownloadConfig(manual_dir=manual_dir)
            builder.download_and_prepare(download_config=config)
        split = split or "+".join(sorted(builder.info.splits.keys()))
        self.name = name
        self.image_key = image_key
        self.label_key = label_key
        encoded, labels = self._read(tfds, builder, split)
        self.encoded = np.asarray(encoded, dtype=object)
        self.labels, _, self.label_ids = dense_label_ids(labels)
        self.images = None
        shape = getattr(features[image_key], "shape", None)
        if (
            shape
            and None not in shape
            and len(shape) == 3
            and int(np.prod(shape)) * len(encoded) <= MAX_DECODED_BYTES
        ):
            self.images = self._decode_all(shape)
        names = getattr(features[label_key], "names", None)
        if names:
            self.class_names = list(names)
        elif self.label_ids is not None:
            self.class_names = [str(int(i)) for i in self.label_ids]

    def _read(self, tfds, builder, split):
        import tensorflow as tf

        encoded, labels = [], []
        try:
            ds = builder.as_dataset(
                split=split,
                shuffle_files=False,
                decoders={self.image_key: tfds.decode.SkipDecoding()},
            )
            ds = ds.map(lambda e: (e[self.image_key], e[self.label_key]))
            for images, ys in ds.batch(1024).as_numpy_iterator():
                encoded.extend(bytes(b) for b in images)
                labels.extend(int(v) for v in ys)
        except (tf.errors.OpError, ValueError):
            # Some readers (e.g. tfds.testing.mock_data with bounding
            # boxes) cannot skip decoding: decode and re-encode as PNG.
            encoded, labels = [], []
            ds = builder.as_dataset(split=split, shuffle_files=False)
            for ex in ds:
                encoded.append(tf.io.encode_png(ex[self.image_key]).numpy())
                labels.append(int(ex[self.label_key]))
        return encoded, labels

    def _decode_all(self, shape):
        """Fixed-shape images (e.g. the glyph sets) -> one uint8 array."""
        import tensorflow as tf

        out = np.empty((len(self.encoded), *shape), np.uint8)
        ds = tf.data.Dataset.from_tensor_slices(
            tf.constant(list(self.encoded), tf.string)
        )
        ds = ds.map(
            lambda b: tf.io.decode_image(b, expand_animations=False),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        ).batch(4096)
        pos = 0
        for batch in ds.as_numpy_iterator():
            out[pos : pos + len(batch)] = batch.reshape(-1, *shape)
            pos += len(batch)
        self.encoded = None  # the array replaces the encoded bytes
        return out

    def load(self, index: int) -> np.ndarray:
        import tensorflow as tf

        if self.images is not None:
            return self.images[index]
        return tf.io.decode_image(
            self.encoded[index], expand_animations=False
        ).numpy()

    def tf_load(self, index: tf.Tensor) -> tf.Tensor:
        import tensorflow as tf

        if self.images is not None:
            image = tf.numpy_function(
                lambda i: self.images[int(i)], [index], tf.uint8, stateful=False
            )
            image.set_shape(self.images.shape[1:])
            return image
        data = tf.numpy_function(
            lambda i: self.encoded[int(i)], [index], tf.string, stateful=False
        )
        data.set_shape([])
        image = tf.io.decode_image(data, expand_animations=False)
        image.set_shape([None, None, None])
        return image


_GLYPH_SOURCES = {
    "cjk_glyphs": "cjk_glyphs",
    "hangul_glyphs": "hangul_glyphs",
    "fashion_mnist": "fashion_mnist_deb",
}


def _pop_known(cfg, allowed, source):
    unknown = sorted(set(cfg) - set(allowed) - SAMPLER_KEYS - {"source"})
    if unknown:
        raise ValueError(
            f"data: unknown key(s) {unknown} for source {source!r}; "
            f"allowed: {sorted(allowed)}"
        )


def _require(cfg, key, source):
    value = cfg.get(key)
    if value in (None, ""):
        raise ValueError(f"data.{key} is required for source {source!r}")
    return value


def source_from_config(
    data_cfg: Mapping[str, Any],
    image_size: int | tuple[int, int] | None = None,
    channels: int | None = None,
) -> Source:
    """Builds a :class:`Source` from a ``data`` config dict.

    ``data_cfg["source"]`` picks the kind:

    * ``tfds``: ``name``, ``image_key``, ``label_key``, ``data_dir``,
      ``manual_dir``, ``split``, ``download``;
    * ``folder``: ``path`` (one sub-folder per class);
    * ``npz``: ``path`` (``X`` uint8 images, ``y`` int labels);
    * ``synthetic``: ``num_classes``, ``examples_per_class``, ``size``,
      ``synthetic_channels``, ``synthetic_seed``;
    * ``cjk_glyphs`` / ``hangul_glyphs`` / ``fashion_mnist``: the offline
      TFDS builders; ``config`` (``small``, ``full``, ``tiny``),
      ``data_dir``.

    Sampler keys (``classes_per_batch``, ``samples_per_class``,
    ``val_classes``, ``test_fraction``, ``augmentation``, ...) are ignored
    here. ``image_size`` / ``channels`` are the model's input; sources do
    not need them (images are resized by :func:`preprocess`), they are
    accepted so callers can pass them.

    Raises:
      ValueError: unknown source, missing or unknown keys (naming them).
    """
    del image_size, channels
    if not isinstance(data_cfg, dict):
        raise ValueError(
            f"data must be a mapping; received {type(data_cfg).__name__}"
        )
    cfg = {k: v for k, v in data_cfg.items() if v is not None}
    kind = cfg.get("source", "synthetic")
    if kind == "tfds":
        keys = (
            "name",
            "image_key",
            "label_key",
            "data_dir",
            "manual_dir",
            "split",
            "download",
            "path",
        )
        _pop_known(cfg, keys, kind)
        return TfdsSource(
            _require(cfg, "name", kind),
            image_key=cfg.get("image_key", "image"),
            label_key=cfg.get("label_key"),
            data_dir=cfg.get("data_dir"),
            manual_dir=cfg.get("manual_dir"),
            split=cfg.get("split"),
            download=cfg.get("download", True),
        )
    if kind in ("folder", "npz"):
        _pop_known(cfg, ("path", "name", "data_dir"), kind)
        path = _require(cfg, "path", kind)
        return FolderSource(path) if kind == "folder" else NpzSource(path)
    if kind == "synthetic":
        keys = (
            "num_classes",
            "examples_per_class",
            "size",
            "synthetic_channels",
            "synthetic_seed",
            "name",
            "path",
            "data_dir",
        )
        _pop_known(cfg, keys, kind)
        return SyntheticSource(
            num_classes=cfg.get("num_classes", 24),
            examples_per_class=cfg.get("examples_per_class", 16),
            size=cfg.get("size", 32),
            channels=cfg.get("synthetic_channels", 1),
            seed=cfg.get("synthetic_seed", 0),
        )
    if kind in _GLYPH_SOURCES:
        _pop_known(cfg, ("config", "data_dir", "name", "download"), kind)
        name = _GLYPH_SOURCES[kind]
        if cfg.get("config"):
            name = f"{name}/{cfg['config']}"
        return TfdsSource(
            name,
            data_dir=cfg.get("data_dir"),
            download=cfg.get("download", True),
        )
    raise ValueError(
        f"data.source: unknown source {kind!r}; expected one of "
        f"{sorted(['tfds', 'folder', 'npz', 'synthetic', *_GLYPH_SOURCES])}"
    )
