"""One embedding loop for evaluation, export, benchmarks and IAA.

:func:`embed` runs a model over images in batches with one cached
``tf.function`` per (model, mode, output, input signature) and a prefetched
``tf.data`` pipeline, and returns float32 numpy embeddings (and the labels
when the data carries them). :func:`embedding_function` is the same
compiled forward pass for callers that stream their own batches.

Retracing: the function of a model is traced with an input signature
whose batch dimension is ``None``, so a last partial batch, a different
``N`` and repeated calls reuse one graph; a new trace happens only for a
new image shape / dtype, mode or output key. The functions are kept in a
``WeakKeyDictionary`` keyed by the model and hold the model only through a
weak reference, so they do not keep it alive.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import keras
import numpy as np
import numpy.typing as npt
import tensorflow as tf

from tfdml.data.pipeline import without_autotune

# model -> {(training, output, shape, dtype): tf.function}
_FUNCTIONS = weakref.WeakKeyDictionary()


def _select(out, output):
    """The ``output`` entry of a dict output; a tensor output as is."""
    if isinstance(out, dict):
        if output not in out:
            raise ValueError(
                f"The model output dict has no {output!r} key; received "
                f"keys {sorted(out)}."
            )
        return out[output]
    if output != "embeddings":
        raise ValueError(
            f"`output={output!r}` needs a model that returns a dict; this "
            "model returns a single tensor (its embeddings)."
        )
    return out


def _spec_of(example):
    """``TensorSpec([None, ...])`` of a batch, a TensorSpec or an array."""
    if isinstance(example, tf.TensorSpec):
        shape, dtype = example.shape, example.dtype
    else:
        if not isinstance(example, (tf.Tensor, np.ndarray)):
            example = np.asarray(example)
        shape, dtype = tf.TensorShape(example.shape), tf.as_dtype(example.dtype)
    if shape.rank is None or shape.rank < 1:
        raise ValueError(
            "Batches of images need a known rank >= 1 (batch first); "
            f"received shape {shape}."
        )
    return tf.TensorSpec([None, *shape.as_list()[1:]], dtype)


def _build(model_ref, spec, training, output):
    def forward(x):
        model = model_ref()
        if training:
            # Training-mode pass; the updated non-trainable state (BN moving
            # statistics, seed generators) is discarded, the model's
            # variables are not touched.
            out, _ = model.stateless_call(
                [v.value for v in model.trainable_variables],
                [v.value for v in model.non_trainable_variables],
                x,
                training=True,
            )
        else:
            out = model(x, training=False)
        return tf.cast(_select(out, output), tf.float32)

    return tf.function(forward, input_signature=[spec])


def embedding_function(
    model: keras.Model,
    example: npt.ArrayLike | tf.Tensor | tf.TensorSpec,
    training: bool = False,
    output: str = "embeddings",
) -> Callable[[tf.Tensor], tf.Tensor]:
    """The cached compiled forward pass ``images [B, ...] -> float32 [B, d]``.

    Args:
      model: a Keras model returning a tensor or a dict of tensors.
      example: a batch of images, or a ``tf.TensorSpec`` of one; only its
        shape after the batch dimension and its dtype matter (the function
        accepts any batch size without retracing).
      training: False: ``model(x, training=False)`` (BatchNorm uses its
        moving statistics). True: a training-mode pass through
        ``model.stateless_call`` whose state updates (BatchNorm moving
        statistics, dropout seeds) are discarded, so the model is unchanged;
        its results depend on the composition of each batch.
      output: the key of the output dict to return (``"embeddings"``,
        ``"raw"``, ...); a model that returns a single tensor only allows
        ``"embeddings"``.

    Returns:
      A ``tf.function`` taking one batch tensor; the same object for the
      same (model, training, output, image shape, dtype).
    """
    spec = _spec_of(example)
    key = (bool(training), str(output), tuple(spec.shape.as_list()), spec.dtype)
    per_model = _FUNCTIONS.get(model)
    if per_model is None:
        per_model = _FUNCTIONS[model] = {}
    fn = per_model.get(key)
    if fn is None:
        fn = per_model[key] = _build(
            weakref.ref(model), spec, bool(training), str(output)
        )
    return fn


def _is_batched(model, spec, batched):
    if batched is not None:
        return bool(batched)
    rank = spec.shape.rank
    inputs = getattr(model, "inputs", None)
    try:
        model_rank = len(inputs[0].shape) if inputs else None
    except (AttributeError, TypeError, ValueError):
        model_rank = None
    if model_rank is not None and rank is not None:
        if rank == model_rank:
            return True
        if rank == model_rank - 1:
            return False
        raise ValueError(
            f"The dataset yields images of rank {rank}; the model takes "
            f"batches of rank {model_rank}."
        )
    if rank is not None and rank >= 1 and spec.shape[0] is None:
        return True
    raise ValueError(
        "Cannot tell whether the dataset is batched (the model has no "
        "static input shape); pass `batched=True` or `batched=False`."
    )


def _array_dataset(x, batch_size):
    """Batches of an in-memory array, prefetched (numpy is sliced lazily,
    not copied whole)."""
    if isinstance(x, tf.Tensor):
        return tf.data.Dataset.from_tensor_slices(x).batch(batch_size)
    n = len(x)

    def batches():
        for i in range(0, n, batch_size):
            yield x[i : i + batch_size]

    spec = _spec_of(x)
    return tf.data.Dataset.from_generator(batches, output_signature=spec)


def _split(data):
    """``(images, labels or None)`` of an array input."""
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise ValueError(
                "Pass images, `(images, labels)` or a tf.data.Dataset; "
                f"received a sequence of {len(data)}."
            )
        x, y = data
        if not isinstance(x, tf.Tensor):
            x = np.asarray(x)
        y = np.asarray(y)
        if len(y) != len(x):
            raise ValueError(
                f"`labels` must have {len(x)} entries (one per image); "
                f"received {len(y)}."
            )
        return x, y
    if not isinstance(data, tf.Tensor):
        data = np.asarray(data)
    return data, None


def embed(
    model: keras.Model,
    data: npt.ArrayLike | tf.Tensor | tf.data.Dataset,
    batch_size: int = 256,
    *,
    training: bool = False,
    output: str = "embeddings",
    return_labels: bool | None = None,
    batched: bool | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Embeds images with one compiled, non-retracing forward pass.

    Args:
      model: a Keras model whose output is the embedding tensor or a dict
        holding it under ``output``.
      data: one of
        - images: a numpy array or ``tf.Tensor`` ``[N, ...]`` (embedded in
          batches of ``batch_size``; numpy is fed lazily through
          ``tf.data`` with prefetching, not copied whole);
        - ``(images, labels)``: the same, with ``[N, ...]`` labels that are
          returned unchanged (as numpy);
        - a finite ``tf.data.Dataset`` yielding images or ``(images,
          labels[, weights, ...])`` (extra components are ignored).
          Batched datasets are embedded batch by batch as they come
          (``batch_size`` is ignored, so the composition of training-mode
          batches is kept); unbatched ones are batched by ``batch_size``.
          Which one it is comes from ``batched`` or, when None, from the
          model's input rank (elements of the same rank are batches), or,
          for a model without a static input, from a ``None`` leading
          dimension (what ``Dataset.batch`` gives).
      batch_size: batch size for arrays and unbatched datasets.
      training: False (default): inference mode, BatchNorm uses its moving
        statistics. True: training-mode outputs without updating the model
        (see :func:`embedding_function`).
      output: the key of the output dict (e.g. ``"raw"``).
      return_labels: None: return labels iff the data has them. True:
        require them. False: return the embeddings only.
      batched: whether a dataset yields batches (None: inferred, above).

    Returns:
      ``embeddings`` float32 numpy ``[N, d]``, or ``(embeddings, labels)``
      where ``labels`` is the numpy concatenation of the data's labels
      (their dtype and shape, ``[N, ...]``).

    Raises:
      ValueError: empty data (no image at all: there is no ``d`` to give
        an empty ``[0, d]`` array, and an empty evaluation set is always a
        mistake), missing labels with ``return_labels=True``, a dict output
        without ``output``, or labels whose length differs from the images'.
    """
    if int(batch_size) < 1:
        raise ValueError(f"`batch_size` must be >= 1; received {batch_size}.")
    batch_size = int(batch_size)
    labels = None
    if isinstance(data, tf.data.Dataset):
        spec = data.element_spec
        has_labels = isinstance(spec, (tuple, list))
        if has_labels:
            if len(spec) < 2:
                raise ValueError(
                    "The dataset must yield images or (images, labels[, "
                    f"...]); received a {len(spec)}-tuple."
                )
            image_spec = spec[0]
        else:
            image_spec = spec
        if not isinstance(image_spec, tf.TensorSpec):
            raise ValueError(
                "The dataset must yield image tensors or (images, labels); "
                f"received element spec {spec}."
            )
        ds = data
        if not _is_batched(model, image_spec, batched):
            ds = ds.batch(batch_size)
            image_spec = ds.element_spec[0] if has_labels else ds.element_spec
    else:
        x, labels = _split(data)
        has_labels = labels is not None
        if len(x) == 0:
            raise ValueError("No images to embed; received 0.")
        ds = _array_dataset(x, batch_size)
        image_spec = _spec_of(x)
    if return_labels and not has_labels:
        raise ValueError(
            "`return_labels=True` but the data has no labels; pass "
            "`(images, labels)` or a dataset of (images, labels)."
        )
    want_labels = has_labels if return_labels is None else bool(return_labels)
    fn = embedding_function(model, image_spec, training, output)
    # Labels of arrays are returned as given, not fed through the pipeline;
    # a dataset's extra components (weights, ...) are dropped.
    from_ds = has_labels and labels is None
    if from_ds:
        if want_labels:
            ds = ds.map(lambda *e: (e[0], e[1]))
        else:
            ds = ds.map(lambda *e: e[0])
    # No autotune model thread: its back-off sleep would stall the end of
    # every call (tfdml.data.without_autotune).
    ds = without_autotune(ds.prefetch(tf.data.AUTOTUNE))
    embs, ys = [], []
    for element in ds:
        if from_ds and want_labels:
            element, y = element
            ys.append(y.numpy())
        embs.append(fn(element).numpy())
    if not embs or sum(len(e) for e in embs) == 0:
        raise ValueError("No images to embed; the dataset is empty.")
    emb = np.concatenate(embs)
    if not want_labels:
        return emb
    return emb, (np.concatenate(ys) if from_ds else labels)
