"""``tf.data`` pipelines: P x K class-balanced batches, evaluation batches.

The class-balanced ("m per class") sampler draws ``P`` distinct classes per
batch and ``K`` examples of each (Hermans et al., "In Defense of the Triplet
Loss for Person Re-Identification", 2017). Classes are visited in seeded
random permutations, so every class of the split is drawn once before any
class repeats.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from typing import TYPE_CHECKING
from typing import Any

import numpy as np
import numpy.typing as npt

from tfdml.data.splits import split_classes

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

    from tfdml.data.sources import Source


def without_autotune(ds: tf.data.Dataset) -> tf.data.Dataset:
    """``ds`` with tf.data's autotuning model thread off.

    With autotune on (TensorFlow's default, even for a pipeline that asks
    for no ``AUTOTUNE`` value) an iterator owns a model thread that sleeps
    10 ms, 20 ms, 40 ms, ... (up to 60 s) between optimisation rounds, and
    destroying the iterator waits for the current sleep to end. Every
    finite pass over a dataset (an ``embed`` call, the end of
    ``model.fit``, a BatchNorm recalibration, an IAA refresh) then stalls
    until the next power-of-two boundary since the iterator was created:
    measured, TF 2.20 CPU: ``fit`` of 30 steps (12 s of steps) returned
    after 20.48 s in half of the runs. Without autotune, ``num_parallel_calls
    =AUTOTUNE`` uses one call per CPU core and ``prefetch(AUTOTUNE)`` TF's
    legacy buffer autotuner, with no model thread.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def preprocess(
    image: tf.Tensor | npt.ArrayLike,
    image_size: int | tuple[int, int],
    channels: int,
) -> tf.Tensor:
    """uint8 image(s) -> float32 in [0, 1] at the model's input size.

    Args:
      image: uint8 ``[H, W, C]`` or ``[B, H, W, C]`` with C in (1, 3).
      image_size: int (square) or ``(height, width)``.
      channels: 1 (grayscale) or 3 (RGB) output channels.

    Returns:
      float32 ``[image_size, image_size, channels]`` (or batched).
    """
    import tensorflow as tf

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3; received {channels}")
    if isinstance(image_size, (list, tuple)):
        size = [int(s) for s in image_size]
    else:
        size = [int(image_size), int(image_size)]
    if min(size) < 1:
        raise ValueError(f"image_size must be >= 1; received {image_size}")
    x = tf.convert_to_tensor(image)
    x = tf.image.convert_image_dtype(x, tf.float32)
    c = x.shape[-1]
    if c is None:
        c_dyn = tf.shape(x)[-1]
        if channels == 1:
            x = tf.cond(
                c_dyn == 1,
                lambda: x[..., :1],
                lambda: tf.image.rgb_to_grayscale(x[..., :3]),
            )
        else:
            x = tf.cond(
                c_dyn == 1,
                lambda: tf.image.grayscale_to_rgb(x[..., :1]),
                lambda: x[..., :3],
            )
    elif c != channels:
        if channels == 1:
            x = tf.image.rgb_to_grayscale(x[..., :3])
        else:
            x = tf.image.grayscale_to_rgb(x[..., :1])
    x = tf.image.resize(x, size, antialias=True)
    x = tf.clip_by_value(x, 0.0, 1.0)
    return tf.ensure_shape(x, [*x.shape[:-3], *size, channels])


def make_augmentation(
    cfg: str | Mapping[str, Any] | None, seed: int | None = None
) -> keras.Sequential | None:
    """Keras preprocessing layers for training images (or ``None``).

    Args:
      cfg: ``None`` / ``"none"`` (no augmentation), ``"flip"``,
        ``"crop"``, ``"crop_flip"``, or a dict ``{"crop": bool,
        "crop_scale": float (max fraction of each side cut away, default
        0.25), "flip": bool}``. Glyphs must not be flipped: use ``"crop"``.
      seed: seeds the layers.

    Returns:
      A ``keras.Sequential`` applied to float32 ``[B, H, W, C]`` batches in
      [0, 1], or ``None``.
    """
    import keras

    presets = {
        "none": {},
        "flip": {"flip": True},
        "crop": {"crop": True},
        "crop_flip": {"crop": True, "flip": True},
    }
    if cfg is None or cfg is False:
        return None
    if isinstance(cfg, str):
        if cfg not in presets:
            raise ValueError(
                f"augmentation: unknown preset {cfg!r}; expected one of "
                f"{sorted(presets)} or a dict"
            )
        cfg = presets[cfg]
    if not isinstance(cfg, dict):
        raise ValueError(
            f"augmentation must be a string or a dict; received {cfg!r}"
        )
    unknown = sorted(set(cfg) - {"crop", "crop_scale", "flip"})
    if unknown:
        raise ValueError(f"augmentation: unknown key(s) {unknown}")
    scale = float(cfg.get("crop_scale", 0.25))
    if not 0.0 < scale < 1.0:
        raise ValueError(f"augmentation.crop_scale must be in (0, 1); {scale}")
    layers = []
    if cfg.get("crop"):
        # Random resized crop: zoom in by up to `scale` per side (aspect
        # jitter from independent factors), back at the input size.
        layers.append(
            keras.layers.RandomZoom(
                height_factor=(-scale, 0.0),
                width_factor=(-scale, 0.0),
                fill_mode="reflect",
                seed=seed,
            )
        )
    if cfg.get("flip"):
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if not layers:
        return None
    return keras.Sequential(layers, name="augmentation")


def _check_pk(classes, classes_per_batch, samples_per_class):
    for key, value in (
        ("classes_per_batch", classes_per_batch),
        ("samples_per_class", samples_per_class),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{key} must be an int; received {value!r}")
    if samples_per_class < 2:
        raise ValueError(
            f"samples_per_class must be >= 2 (K >= 2 gives positives); "
            f"received {samples_per_class}"
        )
    if classes_per_batch < 1:
        raise ValueError(
            f"classes_per_batch must be >= 1; received {classes_per_batch}"
        )
    if classes_per_batch > len(classes):
        raise ValueError(
            f"classes_per_batch={classes_per_batch} exceeds the "
            f"{len(classes)} classes of the split"
        )


def index_batches(
    labels: npt.ArrayLike,
    classes: npt.ArrayLike,
    classes_per_batch: int,
    samples_per_class: int,
    seed: int,
) -> Iterator[np.ndarray]:
    """Infinite generator of example-index batches ``[P * K]`` (numpy).

    Each batch has ``P`` distinct classes (taken in order from seeded
    class permutations) and ``K`` examples of each, drawn without
    replacement unless the class has fewer than ``K`` examples.
    """
    classes = np.asarray(classes, np.int64)
    _check_pk(classes, classes_per_batch, samples_per_class)
    labels = np.asarray(labels)
    pools = {int(c): np.flatnonzero(labels == c) for c in classes}
    empty = [c for c, p in pools.items() if len(p) == 0]
    if empty:
        raise ValueError(f"classes without examples: {empty[:10]}")
    rng = np.random.default_rng(seed)
    order = []
    while True:
        if len(order) < classes_per_batch:
            pending = set(order)
            order = order + [
                int(c) for c in rng.permutation(classes) if c not in pending
            ]
        chosen, order = order[:classes_per_batch], order[classes_per_batch:]
        batch = []
        for c in chosen:
            pool = pools[c]
            batch.append(
                rng.choice(
                    pool,
                    samples_per_class,
                    replace=len(pool) < samples_per_class,
                )
            )
        yield np.concatenate(batch).astype(np.int64)


def steps_per_epoch(
    source: Source | npt.ArrayLike,
    classes: npt.ArrayLike,
    classes_per_batch: int,
    samples_per_class: int,
) -> int:
    """``N_split // (P * K)`` (at least 1): batches per pass over a split."""
    labels = source.labels if hasattr(source, "labels") else source
    n = int(np.isin(np.asarray(labels), np.asarray(classes)).sum())
    return max(1, n // (classes_per_batch * samples_per_class))


def _fixed_size_arrays(source):
    return isinstance(getattr(source, "images", None), np.ndarray)


def balanced_dataset(
    source: Source,
    classes: npt.ArrayLike,
    classes_per_batch: int,
    samples_per_class: int,
    image_size: int | tuple[int, int],
    channels: int,
    seed: int = 0,
    augment: Callable[..., Any] | None = None,
    example_ids: bool = False,
) -> tf.data.Dataset:
    """Infinite P x K batches ``(float32 [P*K, H, W, C], int32 [P*K])``.

    Args:
      source: a :class:`~tfdml.data.sources.Source`.
      classes: class ids of the split to draw from.
      classes_per_batch: P (distinct classes per batch).
      samples_per_class: K (>= 2).
      image_size, channels: the model's input (see :func:`preprocess`).
      seed: same seed -> same batches.
      augment: ``None``, a Keras layer / callable applied to the batch with
        ``training=True``, or a config for :func:`make_augmentation`.
      example_ids: yield ``y = {"labels": int32 [P*K], "example_ids":
        int32 [P*K]}`` with each image's index in ``source`` (a stable key:
        the same image has the same id in every batch, which
        :class:`tfdml.models.DMLModel` uses for the ``xbm_drift`` metric).

    Raises:
      ValueError: K < 2 or P larger than the number of classes (naming
        ``samples_per_class`` / ``classes_per_batch``).
    """
    import tensorflow as tf

    classes = np.asarray(classes, np.int64)
    _check_pk(classes, classes_per_batch, samples_per_class)
    batch = classes_per_batch * samples_per_class
    labels = source.labels

    def gen():
        yield from index_batches(
            labels, classes, classes_per_batch, samples_per_class, seed
        )

    ds = tf.data.Dataset.from_generator(
        gen, output_signature=tf.TensorSpec([batch], tf.int64)
    )
    label_table = tf.constant(labels.astype(np.int32))

    def target(idx):
        y = tf.gather(label_table, idx)
        if not example_ids:
            return y
        return {"labels": y, "example_ids": tf.cast(idx, tf.int32)}

    if _fixed_size_arrays(source):
        shape = source.images.shape[1:]

        def load(idx):
            x = tf.numpy_function(
                lambda i: source.images[i], [idx], tf.uint8, stateful=False
            )
            x.set_shape([batch, *shape])
            return preprocess(x, image_size, channels), target(idx)

        ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.unbatch().map(
            lambda i: (
                preprocess(source.tf_load(i), image_size, channels),
                target(i),
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        ds = ds.batch(batch, drop_remainder=True)
    if augment is not None and not callable(augment):
        augment = make_augmentation(augment, seed=seed)
    if augment is not None:
        ds = ds.map(
            lambda x, y: (augment(x, training=True), y),
            num_parallel_calls=1,
        )
    return without_autotune(ds)


def eval_dataset(
    source: Source,
    classes: npt.ArrayLike,
    batch_size: int,
    image_size: int | tuple[int, int],
    channels: int,
    max_per_class: int | None = None,
) -> tf.data.Dataset:
    """Finite batches ``(float32 images, int32 labels)`` of a split.

    Examples come in ascending index order; ``max_per_class`` keeps the
    first that many of each class.
    """
    import tensorflow as tf

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; received {batch_size}")
    idx = split_indices(source, classes, max_per_class)
    ds = source.dataset(idx).map(
        lambda x, y: (
            preprocess(x, image_size, channels),
            tf.cast(y, tf.int32),
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return without_autotune(ds.batch(batch_size))


def split_indices(
    source: Source, classes: npt.ArrayLike, max_per_class: int | None = None
) -> np.ndarray:
    """Example indices of ``classes`` (ascending), optionally capped."""
    idx = source.indices_of(classes)
    if max_per_class is not None:
        if max_per_class < 1:
            raise ValueError(
                f"max_per_class must be >= 1; received {max_per_class}"
            )
        labels = source.labels[idx]
        keep = np.zeros(len(idx), bool)
        for c in np.unique(labels):
            keep[np.flatnonzero(labels == c)[:max_per_class]] = True
        idx = idx[keep]
    return idx


def to_uint8_arrays(ds: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Float [0, 1] batches -> (uint8 ``[N, H, W, C]``, int64 ``[N]``)."""
    xs, ys = [], []
    for x, y in ds.as_numpy_iterator():
        xs.append(np.round(x * 255.0).astype(np.uint8))
        ys.append(y.astype(np.int64))
    if not xs:
        raise ValueError("the split has no examples")
    return np.concatenate(xs), np.concatenate(ys)


def load_split_arrays(
    config: Mapping[str, Any],
    split: str,
    source: Source | None = None,
    batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images ``[N, H, W, C]`` at the model size, labels) of a split.

    Args:
      config: resolved config dict with ``data``, ``model`` (``image_size``,
        ``channels``) and ``train`` (``seed``) sections, as in a run
        folder's ``config.yaml``.
      split: ``"train"``, ``"val"`` or ``"test"``.
      source: reuse an already built source.
    """
    from tfdml.data.sources import source_from_config

    if split not in ("train", "val", "test"):
        raise ValueError(
            f"split must be 'train', 'val' or 'test'; received {split!r}"
        )
    data = dict(config.get("data") or {})
    model = config.get("model") or {}
    image_size = model.get("image_size", 64)
    channels = model.get("channels", 3)
    seed = (config.get("train") or {}).get("seed", 0)
    if source is None:
        source = source_from_config(data, image_size, channels)
    val = data.get("val_classes")
    splits = split_classes(
        source.labels,
        test_fraction=data.get("test_fraction", 0.5),
        val_fraction=data.get("val_fraction") if val is None else None,
        val_classes=val,
        seed=seed,
    )
    ds = eval_dataset(
        source,
        splits[split],
        batch_size,
        image_size,
        channels,
        max_per_class=data.get("eval_max_per_class"),
    )
    return to_uint8_arrays(ds)
