"""SavedModel export for TF-Serving: embedding and retrieval endpoints.

:func:`export_saved_model` writes a TF-Serving model base path
``OUT_DIR/<name>/<version>/`` with one SavedModel (``keras.export.
ExportArchive``) whose gallery (embeddings + string ids) is stored inside.

Signatures (input names in brackets; ``K`` = the export's default k):

==========================  ==============================================
``serving_default``         ``images`` float32 [B, H, W, C] in [0, 1]
                            -> ``embeddings`` [B, d]
``embed_bytes``             ``image_bytes`` string [B] (JPEG/PNG) ->
                            ``embeddings`` (decode, C channels, bilinear
                            resize to H x W, / 255)
``search``                  ``embeddings`` [B, d], ``k`` int32 scalar ->
                            ``ids`` string [B, k], ``scores`` float32
``search_default``          ``embeddings`` -> top ``K``
``embed_and_search``        ``images``, ``k`` -> ``ids``, ``scores``
``embed_and_search_default``  ``images`` -> top ``K``
==========================  ==============================================

With a ``threshold`` (a cosine similarity, e.g. from
:func:`tfdml.eval.calibrate`), every search signature also returns
``matched`` bool [B, k]: ``scores >= threshold`` (the same item / class
for verification). The threshold is stored in the SavedModel as the
variable ``threshold`` of the gallery.

Inputs are declared with unknown shape so that every check runs in the graph
and a bad request gets an ``InvalidArgument`` error whose message names the
input: wrong rank, wrong image size or channels, wrong embedding size,
NaN or Inf in ``images`` or ``embeddings``, undecodable bytes (not
JPEG/PNG), ``k`` not a scalar or outside ``[1, max_k]``. An encoder output
that is not finite is ``InvalidArgument`` naming ``embeddings`` too, so no
signature ever answers ids with NaN scores. Wrong dtypes are rejected by the
signature itself.

Index variants:

* ``"brute_force"``: exact ``matmul`` + ``top_k`` over the gallery; only
  stock TensorFlow ops, so the stock ``tensorflow/serving`` image loads it.
* ``"scann"``: ScaNN's TF ops (``Scann>*``, written with
  ``namespace_whitelist=["Scann"]``); loading needs ``import scann`` first
  in Python, or a ScaNN-linked model server. The searcher is rebuilt from
  the saved tensors on the first call: send a warm-up request.

Scores are dot products of L2-normalised embeddings (cosine); ties are
broken by the lower gallery index (brute force).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any

import numpy as np
import numpy.typing as npt
import tensorflow as tf

if TYPE_CHECKING:
    import keras

INDEX_CHOICES = ("brute_force", "scann", "both")
_ALIASES = {"bruteforce": "brute_force", "brute-force": "brute_force"}
_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG = b"\xff\xd8\xff"


def _encoder_geometry(encoder):
    shape = encoder.inputs[0].shape
    if len(shape) != 4 or None in tuple(shape[1:]):
        raise ValueError(
            "The encoder input must be [None, H, W, C] with static H, W, C; "
            f"received {tuple(shape)}."
        )
    return int(shape[1]), int(shape[2]), int(shape[3])


def _embeddings_of(out):
    if isinstance(out, dict):
        return out["embeddings"]
    return out


def _embedding_dim(encoder):
    """The static size of the encoder's ``embeddings`` output, or None."""
    try:
        shape = _embeddings_of(encoder.output).shape
    except Exception:
        return None
    d = shape[-1] if len(shape) else None
    return None if d is None else int(d)


def embed_images(encoder, images, batch_size=128):
    """Embeds float32 images [N, H, W, C] in [0, 1] in batches
    (:func:`tfdml.eval.embed`, inference mode)."""
    from tfdml.eval.embed import embed

    if not len(images):
        raise ValueError("The gallery is empty; received 0 images.")
    return embed(encoder, images, batch_size)


def _first(mask, limit=5):
    """The first ``limit`` indices (along axis 0) where ``mask`` is true."""
    rows = np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))
    return rows[:limit].tolist()


def _check_pixels(x, name="gallery"):
    """``x`` as an array; ValueError for an empty, non-numeric, non-finite
    or out-of-range batch of images ([N, H, W] or [N, H, W, C])."""
    x = np.asarray(x)
    if x.ndim not in (3, 4):
        raise ValueError(
            f"{name}: images must be [N, H, W] or [N, H, W, C]; received "
            "shape "
            f"{x.shape}."
        )
    if len(x) == 0 or x.size == 0:
        raise ValueError(
            f"The gallery is empty: {name} has shape {x.shape}; give at "
            "least one image."
        )
    if x.dtype == bool or not (
        np.issubdtype(x.dtype, np.integer)
        or np.issubdtype(x.dtype, np.floating)
    ):
        raise ValueError(
            f"{name}: images must be uint8 (0..255) or float in [0, 1]; "
            "received "
            f"dtype {x.dtype}."
        )
    if np.issubdtype(x.dtype, np.integer):
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise ValueError(
                f"{name}: integer images must be in 0..255 (uint8); found "
                "values in "
                f"[{lo}, {hi}]."
            )
        return x
    bad = ~np.isfinite(x)
    if bad.any():
        raise ValueError(
            f"{name}: NaN or Inf in {int(bad.sum())} pixel values (images "
            f"{_first(bad)}...); every pixel must be finite."
        )
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{name}: float images must be in [0, 1]; found values in "
            f"[{lo:g}, "
            f"{hi:g}]. Pass uint8 images (0..255, scaled here), or scale "
            "float images to [0, 1] (e.g. x / 255)."
        )
    return x


def _check_labels(labels, n, name="database_labels"):
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"`{name}` must be 1-D [N]; received shape {y.shape}.")
    if y.dtype == bool or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"`{name}` (gallery labels) must be integers; received dtype "
            f"{y.dtype}. Pass class ids as ints (string names go in the "
            "ids)."
        )
    if len(y) != n:
        raise ValueError(
            f"`{name}` (gallery labels) have {len(y)} entries for {n} "
            "gallery items; give exactly one label per item."
        )
    return y


def _check_ids(ids, n, name="database_ids"):
    a = np.asarray(ids)
    if a.ndim != 1:
        raise ValueError(
            f"`{name}` (gallery ids) must be 1-D [N]; received shape {a.shape}."
        )
    if len(a) != n:
        raise ValueError(
            f"`{name}` (gallery ids) have {len(a)} entries for {n} gallery "
            "items; give exactly one id per item."
        )
    return a.astype(str)


def _check_database(database, d=None, name="database"):
    """Gallery embeddings [N, d] as float32, finite, non-empty."""
    try:
        db = np.asarray(database, np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"`{name}` must be a float [N, d] array of embeddings ({e})."
        ) from None
    if db.ndim != 2 or db.size == 0:
        raise ValueError(
            f"`{name}` must be a non-empty [N, d] array; received shape "
            f"{db.shape}."
        )
    bad = ~np.isfinite(db)
    if bad.any():
        raise ValueError(
            f"`{name}` embeddings contain NaN or Inf ({int(bad.sum())} "
            f"values; rows {_first(bad)}...)."
        )
    if d is not None and db.shape[1] != d:
        raise ValueError(
            f"`{name}` embeddings have size {db.shape[1]}; the encoder "
            f"outputs size {d}."
        )
    return db


def validate_gallery(
    images: npt.ArrayLike,
    labels: npt.ArrayLike | None = None,
    ids: npt.ArrayLike | None = None,
    names: Sequence[str] = (
        "gallery_images",
        "database_labels",
        "database_ids",
    ),
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Checks a gallery before anything is embedded or written.

    Raises ValueError, naming the argument, for: an empty gallery; images
    that are not ``[N, H, W]`` / ``[N, H, W, C]``; integer images outside
    0..255; float images with NaN / Inf or outside ``[0, 1]`` (0..255
    floats: pass uint8, or scale to [0, 1]); labels that are not integers
    or not one per image; ids that are not one per image.

    Args:
      images: the gallery images, uint8 or float.
      labels: optional ``[N]`` integer labels.
      ids: optional ``[N]`` ids.
      names: the names of images, labels and ids used in the messages.

    Returns:
      ``(images, labels, ids)`` as arrays (ids as str; None stays None).
    """
    images = _check_pixels(images, f"`{names[0]}`")
    n = len(images)
    if labels is not None:
        labels = _check_labels(labels, n, names[1])
    if ids is not None:
        ids = _check_ids(ids, n, names[2])
    return images, labels, ids


def images_to_float(
    x: npt.ArrayLike,
    height: int,
    width: int,
    channels: int,
    name: str = "gallery",
) -> np.ndarray:
    """uint8 [N, H, W] / [N, H, W, C] (or float in [0, 1]) -> float32
    [N, height, width, C] in [0, 1].

    Raises ValueError for an empty batch, NaN / Inf, integers outside
    0..255 or floats outside [0, 1] (see :func:`validate_gallery`).
    """
    x = _check_pixels(x, name)
    if x.ndim == 3:
        x = x[..., None]
    integer = np.issubdtype(x.dtype, np.integer)
    if x.shape[-1] != channels:
        if x.shape[-1] == 1 and channels == 3:
            x = np.repeat(x, 3, axis=-1)
        elif x.shape[-1] == 3 and channels == 1:
            x = (x.astype(np.float32) @ np.array([0.2989, 0.587, 0.114]))[
                ..., None
            ]
            if integer:
                x = np.round(x)
        else:
            raise ValueError(
                f"Gallery images have {x.shape[-1]} channels; the model "
                f"needs {channels}."
            )
    x = x.astype(np.float32)
    if integer:  # uint8 0..255 -> [0, 1]
        x = x / 255.0
    if x.shape[1:3] != (height, width):
        x = tf.image.resize(x, [height, width]).numpy()
    return x.astype(np.float32)


class _Gallery(tf.Module):
    """Gallery embeddings and ids, tracked by the archive."""

    def __init__(self, embeddings, ids, threshold=None):
        super().__init__()
        self.embeddings = tf.Variable(embeddings, trainable=False)
        self.ids = tf.Variable(ids, trainable=False, dtype=tf.string)
        if threshold is not None:
            self.threshold = tf.Variable(
                float(threshold), trainable=False, dtype=tf.float32
            )


class _ScannHolder(tf.Module):
    def __init__(self, state):
        super().__init__()
        self.state = state


def _after(checks, x):
    """``x`` once every check has run (data ops are not auto-ordered)."""
    with tf.control_dependencies(checks):
        return tf.identity(x)


def _shape_is(x, expected):
    """Rank and dims as one boolean, safe for any rank of ``x``."""
    s = tf.shape(x)
    same_rank = tf.size(s) == len(expected)
    padded = tf.concat([s, tf.zeros([len(expected)], tf.int32)], 0)
    head = padded[: len(expected)]
    ok = [tf.equal(head[i], e) for i, e in enumerate(expected) if e is not None]
    return tf.logical_and(same_rank, tf.reduce_all(tf.stack(ok)))


def _check_images(images, h, w, c):
    rank = tf.debugging.assert_rank(
        images,
        4,
        message=f"images: expected rank 4 [batch, {h}, {w}, {c}]",
    )
    with tf.control_dependencies([rank]):
        size = tf.debugging.Assert(
            _shape_is(images, [None, h, w, c]),
            [
                f"images: expected shape [batch, {h}, {w}, {c}]; got",
                tf.shape(images),
            ],
        )
    images = _after([rank, size], images)
    images = _finite(images, "images")
    return tf.ensure_shape(images, [None, h, w, c])


def _finite(x, name, what="must be finite (no NaN or Inf)"):
    """``x``, or InvalidArgument ``"<name>: ... Tensor had NaN values"``.

    ``CheckNumerics`` is a stock op: it survives SavedModel export and runs
    in the stock model server.
    """
    return tf.debugging.check_numerics(x, f"{name}: {what}")


def _check_embeddings(emb, d):
    ok = tf.debugging.Assert(
        _shape_is(emb, [None, d]),
        [f"embeddings: expected shape [batch, {d}]; got", tf.shape(emb)],
    )
    emb = _finite(_after([ok], emb), "embeddings")
    return tf.ensure_shape(emb, [None, d])


def _check_k(k, max_k):
    scalar = tf.debugging.Assert(
        tf.equal(tf.rank(k), 0),
        ["k: expected an int32 scalar; got shape", tf.shape(k)],
    )
    with tf.control_dependencies([scalar]):
        kk = tf.reshape(k, [-1])[0]
        rng = tf.debugging.Assert(
            (kk >= 1) & (kk <= max_k),
            [f"k: must be in [1, {max_k}] (gallery / index limit); got", kk],
        )
    return _after([scalar, rng], tf.reshape(kk, []))


def _decoder(h, w, c):
    def decode(b):
        img = tf.io.decode_image(b, channels=c, expand_animations=False)
        img = tf.image.resize(tf.cast(img, tf.float32), [h, w]) / 255.0
        return tf.ensure_shape(img, [h, w, c])

    def embed_input(image_bytes):
        rank = tf.debugging.Assert(
            tf.equal(tf.rank(image_bytes), 1),
            [
                "image_bytes: expected rank 1 [batch] of encoded images; got "
                "shape",
                tf.shape(image_bytes),
            ],
        )
        with tf.control_dependencies([rank]):
            flat = tf.reshape(image_bytes, [-1])
            png = tf.strings.substr(flat, 0, len(_PNG)) == _PNG
            jpg = tf.strings.substr(flat, 0, len(_JPEG)) == _JPEG
            fmt = tf.debugging.Assert(
                tf.reduce_all(png | jpg),
                [
                    "image_bytes: every element must be a JPEG or PNG image; "
                    "bad positions",
                    tf.where(~(png | jpg))[:, 0],
                ],
            )
        image_bytes = _after([rank, fmt], flat)
        return tf.map_fn(
            decode,
            image_bytes,
            fn_output_signature=tf.TensorSpec([h, w, c], tf.float32),
        )

    return embed_input


def build_archive(
    encoder: keras.Model,
    gallery_embeddings: npt.ArrayLike,
    gallery_ids: npt.ArrayLike,
    index: str = "brute_force",
    k: int = 10,
    scann_options: Mapping[str, Any] | None = None,
    threshold: float | None = None,
) -> tuple[keras.export.ExportArchive, tf.saved_model.SaveOptions]:
    """(ExportArchive, SaveOptions) for one index variant (``threshold``:
    see :func:`check_threshold`; adds ``matched`` to the searches)."""
    import keras

    h, w, c = _encoder_geometry(encoder)
    emb = np.asarray(gallery_embeddings, np.float32)
    n, d = emb.shape
    k_default = int(k)
    if not 1 <= k_default <= n:
        raise ValueError(f"`k` must be in [1, {n}]; received {k}.")
    threshold = check_threshold(threshold)
    gallery = _Gallery(
        emb, np.asarray(gallery_ids).astype(str).astype(bytes), threshold
    )
    archive = keras.export.ExportArchive()
    archive.track(encoder)
    archive.track(gallery)

    if index == "brute_force":
        max_k = n

        def raw_search(q, kk):
            s = tf.matmul(q, gallery.embeddings, transpose_b=True)
            scores, idx = tf.math.top_k(s, k=kk)
            return idx, scores

        options = tf.saved_model.SaveOptions()
    elif index == "scann":
        from tfdml.eval.index import import_scann_ops
        from tfdml.eval.index import scann_builder

        scann_ops = import_scann_ops()
        opts = dict(scann_options or {})
        builder = scann_builder(emb, k_default, **opts)
        searcher = builder.build()
        holder = _ScannHolder(searcher.serialize_to_module())
        archive.track(holder)
        # Tree + reordering keeps the best `reorder` candidates only.
        tree = n >= opts.get("brute_force_below", 20000)
        max_k = min(n, opts.get("reorder") or max(100, 10 * k_default))
        max_k = max_k if tree else n

        def raw_search(q, kk):
            s = scann_ops.searcher_from_module(holder.state)
            idx, scores = s.search_batched(q, final_num_neighbors=kk)
            idx = tf.ensure_shape(idx, [None, None])
            scores = tf.ensure_shape(scores, [None, None])
            tf.debugging.assert_equal(
                tf.shape(idx)[1],
                kk,
                message="k: the ScaNN index returned fewer neighbours",
            )
            return idx, scores

        options = tf.saved_model.SaveOptions(namespace_whitelist=["Scann"])
    else:
        raise ValueError(
            f"`index` must be 'brute_force' or 'scann'; received {index!r}."
        )

    def search(q, kk):
        q = _check_embeddings(q, d)
        kk = _check_k(kk, max_k)
        idx, scores = raw_search(q, kk)
        out = {"ids": tf.gather(gallery.ids, idx), "scores": scores}
        if threshold is not None:
            out["matched"] = scores >= gallery.threshold
        return out

    def search_fixed(q):
        out = search(q, tf.constant(k_default, tf.int32))
        return {
            key: tf.ensure_shape(v, [None, k_default]) for key, v in out.items()
        }

    def embed(images):
        images = _check_images(images, h, w, c)
        e = _embeddings_of(encoder(images, training=False))
        e = _finite(
            tf.cast(e, tf.float32),
            "embeddings",
            "the encoder output is not finite (NaN or Inf)",
        )
        return tf.ensure_shape(e, [None, d])

    decode = _decoder(h, w, c)

    def serving_default(images):
        return {"embeddings": embed(images)}

    def embed_bytes(image_bytes):
        return {"embeddings": embed(decode(image_bytes))}

    def embed_and_search(images, kk):
        return search(embed(images), kk)

    def embed_and_search_default(images):
        return search_fixed(embed(images))

    img_spec = tf.TensorSpec(None, tf.float32, name="images")
    emb_spec = tf.TensorSpec(None, tf.float32, name="embeddings")
    k_spec = tf.TensorSpec(None, tf.int32, name="k")
    archive.add_endpoint("serving_default", serving_default, [img_spec])
    archive.add_endpoint(
        "embed_bytes",
        embed_bytes,
        [tf.TensorSpec(None, tf.string, name="image_bytes")],
    )
    archive.add_endpoint("search", search, [emb_spec, k_spec])
    archive.add_endpoint("search_default", search_fixed, [emb_spec])
    archive.add_endpoint(
        "embed_and_search", embed_and_search, [img_spec, k_spec]
    )
    archive.add_endpoint(
        "embed_and_search_default", embed_and_search_default, [img_spec]
    )
    return archive, options


def check_threshold(threshold):
    """``threshold`` as a float, or None; ValueError unless it is a finite
    cosine similarity in [-1, 1]."""
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(
        threshold, (int, float, np.integer, np.floating)
    ):
        raise ValueError(
            "`threshold` must be a number in [-1, 1] (a cosine similarity) "
            f"or None; received {threshold!r}."
        )
    if not -1.0 <= float(threshold) <= 1.0:  # NaN fails too
        raise ValueError(
            "`threshold` must be a finite cosine similarity in [-1, 1]; "
            f"received {threshold!r}."
        )
    return float(threshold)


def default_ids(n, labels=None):
    """``"<index>"`` or, with labels, ``"<index>/<label>"``."""
    if labels is None:
        return np.array([str(i) for i in range(n)])
    labels = np.asarray(labels).reshape(-1)
    return np.array([f"{i}/{labels[i]}" for i in range(n)])


_RENAMED = {
    "database": "gallery",
    "database_labels": "gallery_labels",
    "database_ids": "gallery_ids",
}


def export_saved_model(
    encoder: keras.Model,
    out_dir: str | os.PathLike[str],
    gallery: npt.ArrayLike | None = None,
    gallery_labels: npt.ArrayLike | None = None,
    gallery_ids: npt.ArrayLike | None = None,
    gallery_images: npt.ArrayLike | None = None,
    index: str = "brute_force",
    name: str = "tfdml",
    version: int = 1,
    k: int = 10,
    batch_size: int = 128,
    scann_options: Mapping[str, Any] | None = None,
    threshold: float | None = None,
    **renamed,
) -> dict[str, str]:
    """Writes ``out_dir/<name>/<version>/`` (and ``<name>_scann`` for both).

    Args:
      encoder: functional Keras model, float32 images [None, H, W, C] in
        [0, 1] -> dict with ``"embeddings"``.
      out_dir: TF-Serving model base folder.
      gallery: ``[N, d]`` gallery embeddings (already embedded with
        ``encoder``), or None to embed ``gallery_images``.
      gallery_labels: optional ``[N]`` labels, used for the default ids.
      gallery_ids: optional ``[N]`` string ids.
      gallery_images: ``[N, H, W, C]`` float32 in [0, 1] or uint8 0..255
        (if no ``gallery`` embeddings), converted with
        :func:`images_to_float`.
      **renamed: the old names ``database``, ``database_labels`` and
        ``database_ids`` (same meaning; ``DeprecationWarning``).
      index: ``"brute_force"``, ``"scann"`` or ``"both"``.
      name: model name (``<name>_scann`` for the ScaNN variant of "both").
      version: integer version folder.
      k: default k of the ``*_default`` signatures.
      batch_size: embedding batch size.
      scann_options: keyword arguments of ``tfdml.eval.index.scann_builder``.
      threshold: optional similarity threshold in [-1, 1] (e.g.
        ``tfdml.eval.calibrate(...).threshold``): the search signatures
        then also return ``matched = scores >= threshold``.

    Returns:
      ``{variant: path}`` of the written SavedModels.

    Raises:
      ValueError: before anything is embedded or written, for a bad
        gallery (see :func:`validate_gallery`), ``gallery`` embeddings
        that are empty, not finite or not the encoder's size, labels or
        ids that are not one per item, or a bad ``index`` / ``version`` /
        ``k`` / ``threshold``.
    """
    # Internally (and in the messages when the old names were given) the
    # gallery keeps the names the caller used.
    names = dict(zip(_RENAMED, _RENAMED.values()))
    given = {"gallery": gallery, "gallery_labels": gallery_labels}
    given["gallery_ids"] = gallery_ids
    for old, value in renamed.items():
        new = _RENAMED.get(old)
        if new is None:
            raise TypeError(
                f"export_saved_model() got an unexpected keyword argument "
                f"{old!r}."
            )
        if given[new] is not None:
            raise ValueError(f"Give `{new}` or `{old}` (deprecated), not both.")
        warnings.warn(
            f"export_saved_model({old}=...) is deprecated; use {new}=.",
            DeprecationWarning,
            stacklevel=2,
        )
        given[new] = value
        names[old] = old
    database = given["gallery"]
    database_labels = given["gallery_labels"]
    database_ids = given["gallery_ids"]
    threshold = check_threshold(threshold)
    index = _ALIASES.get(index, index)
    if index not in INDEX_CHOICES:
        raise ValueError(
            f"`index` must be one of {INDEX_CHOICES}; received {index!r}."
        )
    if int(version) < 1:
        raise ValueError(f"`version` must be >= 1; received {version}.")
    # Every check runs before the gallery is embedded or anything written.
    h, w, c = _encoder_geometry(encoder)
    if database is None:
        if gallery_images is None:
            raise ValueError(
                f"Give `{names['database']}` (embeddings) or `gallery_images`."
            )
        gallery_images = images_to_float(
            gallery_images, h, w, c, name="`gallery_images`"
        )
        n = len(gallery_images)
    else:
        database = _check_database(
            database, _embedding_dim(encoder), name=names["database"]
        )
        n = len(database)
    if database_labels is not None:
        database_labels = _check_labels(
            database_labels, n, name=names["database_labels"]
        )
    ids = database_ids
    if ids is not None:
        ids = _check_ids(ids, n, name=names["database_ids"])
    if not 1 <= int(k) <= n:
        raise ValueError(f"`k` must be in [1, {n}]; received {k}.")
    if database is None:
        database = embed_images(encoder, gallery_images, batch_size)
        bad = ~np.isfinite(database)
        if bad.any():
            raise ValueError(
                "The encoder's embeddings of the gallery images contain NaN "
                f"or Inf (images {_first(bad)}...); nothing was written."
            )
    if ids is None:
        ids = default_ids(n, database_labels)
    variants = ["brute_force", "scann"] if index == "both" else [index]
    written = {}
    for v in variants:
        model_name = name + (
            "_scann" if index == "both" and v == "scann" else ""
        )
        path = os.path.join(out_dir, model_name, str(int(version)))
        archive, options = build_archive(
            encoder, database, ids, v, k, scann_options, threshold
        )
        archive.write_out(path, options=options, verbose=False)
        written[v] = path
    return written
