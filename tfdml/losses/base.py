"""The base of every pair loss: embeddings + labels -> the pair contract.

A :class:`PairLoss` is a ``keras.losses.Loss``. Used as
``loss(y_true=labels [B], y_pred=embeddings [B, d])`` it returns the mean over
anchors (``reduction="sum_over_batch_size"``, the default) or one value per
anchor (``reduction=None``). The memory bank, IAA and MMSI use the functional
entry point :meth:`PairLoss.per_anchor`, which accepts a reference set of
another size with its own labels and example ids.

Subclasses implement :meth:`PairLoss.pair_loss` on the pair contract
(``sim, pos_mask, neg_mask`` ``[B, M]``, see :mod:`tfdml.ops`) and extend
``get_config`` with every hyper-parameter.

Labels (:func:`check_labels`) are class ids: only their grouping matters.
Multi-hot labels ``[B, C]`` (``C > 1``, values 0/1, any numeric or bool
dtype) are accepted too: two examples are relevant (a positive pair) iff
their label sets intersect, and a negative pair iff they are disjoint (see
:func:`tfdml.ops.relevance`); an example with no label is a negative of
every other. ``[B, 1]`` is read as class ids.

* Integer dtypes are the contract. Float labels are accepted only when every
  value is an integer (Keras hands ``y_true`` over as floats, e.g. from
  ``model.fit`` on float arrays) and are then cast; a non-integral, NaN or
  Inf label is rejected (it has no grouping: rounding would merge 0.1 and
  0.2). Large integer ids stay exact: the Keras entry point passes each
  label's first position in the batch, never the id, through Keras' float
  conversion.
* ``labels`` must have one entry per embedding (``[B]`` or ``[B, 1]``).
* An empty batch gives a scalar 0 from the Keras entry point (a ``[0]``
  tensor per anchor from :meth:`PairLoss.per_anchor`).

Checks are static (``ValueError`` at call or trace time) where the value or
shape is known, otherwise ``tf.debugging`` asserts (``InvalidArgumentError``
at run time). XLA (``jit_compile=True``) compiles asserts away: there a
non-integral float label makes the loss NaN instead, which the training loop
reports as a non-finite loss.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import keras
import numpy as np
import numpy.typing as npt
import tensorflow as tf

from tfdml import ops
from tfdml.mining import base as mining_base
from tfdml.validation import check_choice  # noqa: F401 (re-export)
from tfdml.validation import check_non_negative  # noqa: F401
from tfdml.validation import check_positive  # noqa: F401


def _float_labels_message(name, bad=None):
    shown = ""
    if bad is not None:
        values = [float(f"{v:.6g}") for v in np.unique(bad)[:5]]
        shown = f" Received {values}."
    return (
        f"`{name}` must be integer class ids; float labels are accepted only "
        f"when every value is an integer (non-integral, NaN and Inf values "
        f"have no class).{shown}"
    )


def _multi_hot_message(name, bad=None):
    shown = ""
    if bad is not None:
        shown = f" Received {[float(v) for v in np.unique(bad)[:5]]}."
    return (
        f"`{name}` are multi-hot labels [batch, classes]: every value must "
        f"be 0 or 1.{shown}"
    )


def _check_multi_hot(labels, name):
    """``(None or a bool tensor "all values are 0/1", message)``; raises
    ``ValueError`` when the values are static and not all 0 or 1."""
    message = _multi_hot_message(name)
    if labels.dtype == tf.bool or not (
        labels.dtype.is_integer or labels.dtype.is_floating
    ):
        return None, message  # bool; other dtypes: ops names the dtype
    value = tf.get_static_value(labels)
    if value is not None:
        value = np.asarray(value, np.float64)
        ok = (value == 0) | (value == 1)
        if not ok.all():
            raise ValueError(_multi_hot_message(name, value[~ok]))
        return None, message
    x = tf.cast(labels, tf.float32)
    return tf.reduce_all(tf.equal(x, 0.0) | tf.equal(x, 1.0)), message


def check_labels(labels, embeddings, name="labels"):
    """Validated ``(int32 labels [B], embeddings [B, d])``.

    See the module docstring: integer ids (or integral floats), one per
    embedding row. Raises ``ValueError`` naming ``name`` (static values or
    shapes) or adds ``tf.debugging`` asserts (``InvalidArgumentError``).
    """
    labels = tf.convert_to_tensor(labels)
    integral = None
    message = _float_labels_message(name)
    if ops.is_multi_hot(labels, name):
        integral, message = _check_multi_hot(labels, name)
    elif labels.dtype.is_floating:
        value = tf.get_static_value(labels)
        if value is not None:
            value = np.asarray(value, np.float64)
            ok = np.isfinite(value) & (np.round(value) == value)
            if not ok.all():
                raise ValueError(_float_labels_message(name, value[~ok]))
        else:
            x = tf.cast(labels, tf.float32)
            integral = tf.reduce_all(
                tf.math.is_finite(x) & tf.equal(x, tf.round(x))
            )
    labels, embeddings = ops.check_labels_embeddings(
        labels, embeddings, name=name
    )
    n, b = labels.shape[0], embeddings.shape[0]
    if n is not None and b is not None:
        if n != b:
            raise ValueError(
                f"`{name}` has {n} entries but there are {b} embeddings; "
                "give one label per embedding row."
            )
    elif labels.shape.rank is not None and embeddings.shape.rank is not None:
        check = tf.debugging.assert_equal(
            tf.shape(labels)[0],
            tf.shape(embeddings)[0],
            message=f"`{name}` and the embeddings differ in length "
            f"(`{name}` entries, embedding rows):",
        )
        with tf.control_dependencies([check] if check is not None else []):
            labels = tf.identity(labels)
    if integral is not None:
        check = tf.debugging.Assert(integral, [message], name="integral_labels")
        with tf.control_dependencies([check] if check is not None else []):
            labels = tf.identity(labels)
        # XLA drops the assert: make the loss NaN instead.
        nan = tf.constant(float("nan"), embeddings.dtype)
        embeddings = embeddings + tf.where(
            integral, tf.zeros([], embeddings.dtype), nan
        )
    return labels, embeddings


def check_inputs(embeddings, labels, ref_embeddings=None, ref_labels=None):
    """Validates anchors and the optional reference set (ranks, dtypes,
    integral labels, one label per row; see :func:`check_labels`).

    Returns ``(embeddings, int32 labels, ref_embeddings, int32 ref_labels)``.
    """
    labels, embeddings = check_labels(labels, embeddings)
    if ref_embeddings is not None:
        ref_labels, ref_embeddings = check_labels(
            ref_labels, ref_embeddings, name="ref_labels"
        )
    return embeddings, labels, ref_embeddings, ref_labels


class References(NamedTuple):
    """The reference set of :meth:`PairLoss.per_anchor` (``M`` rows).

    Attributes:
      embeddings: ``[M, d]`` reference embeddings.
      labels: ``[M]`` class ids (or ``[M, C]`` multi-hot) of the references.
      ids: optional ``[M]`` example ids; a reference with an anchor's id is
        that anchor itself and never its positive (see
        :func:`tfdml.ops.pair_masks`).
      valid: optional ``[M]`` bool, False for empty memory slots.

    A tuple: ``emb, labels, ids, valid = refs`` unpacks it.
    """

    embeddings: Any
    labels: Any
    ids: Any = None
    valid: Any = None


LEGACY_REFERENCE_ARGS = ("ref_embeddings", "ref_labels", "ref_ids", "ref_valid")


def as_references(refs, ids, context, pair_weights=None, legacy=()):
    """``(refs, ids, pair_weights)`` from :meth:`PairLoss.per_anchor`'s
    arguments; ``refs`` is a :class:`References` or None.

    The deprecated forms are mapped onto a :class:`References` with a
    ``DeprecationWarning``: the old positional order ``per_anchor(emb,
    labels, ref_embeddings, ref_labels, ids, ref_ids, ref_valid,
    pair_weights)`` (``legacy`` holds the positional arguments after
    ``pair_weights``) and the keywords ``ref_embeddings``, ``ref_labels``,
    ``ref_ids``, ``ref_valid`` (popped from ``context``).
    """
    old = {k: context.pop(k) for k in LEGACY_REFERENCE_ARGS if k in context}
    if refs is not None and not isinstance(refs, References):
        # The old positional order: ref_embeddings, ref_labels, ids,
        # ref_ids, ref_valid, pair_weights after (embeddings, labels).
        positional = [refs, ids]
        if legacy or (pair_weights is not None and _rank(pair_weights) == 1):
            # (a rank-1 `pair_weights` is the old fifth argument, `ids`)
            positional += [pair_weights, *legacy]
            pair_weights = None
        names = (*LEGACY_REFERENCE_ARGS[:2], "ids", *LEGACY_REFERENCE_ARGS[2:])
        if len(positional) > len(names) + 1:
            raise TypeError(
                "per_anchor takes at most 8 positional arguments in the "
                f"deprecated order; received {len(positional) + 2}."
            )
        if len(positional) == len(names) + 1:
            pair_weights = positional.pop()
        ids = None
        for name, value in zip(names, positional):
            if name == "ids":
                ids = value
            elif name in old:
                raise TypeError(f"per_anchor got multiple values for `{name}`.")
            else:
                old[name] = value
        refs = None
    elif legacy:
        raise TypeError(
            "per_anchor(embeddings, labels, refs, ids, pair_weights) takes "
            f"{len(legacy)} positional arguments too many."
        )
    if old:
        if refs is not None:
            raise ValueError(
                "Pass the reference set either as `refs` (a References) or "
                "with the deprecated ref_* arguments, not both; received "
                f"refs and {sorted(old)}."
            )
        warnings.warn(
            "per_anchor(embeddings, labels, ref_embeddings, ref_labels, ids, "
            "ref_ids, ref_valid) is deprecated; pass "
            "refs=tfdml.losses.References(embeddings, labels, ids, valid).",
            DeprecationWarning,
            stacklevel=3,
        )
        if old.get("ref_embeddings") is not None:
            refs = References(
                old["ref_embeddings"],
                old.get("ref_labels"),
                old.get("ref_ids"),
                old.get("ref_valid"),
            )
    if refs is not None and (refs.embeddings is None or refs.labels is None):
        raise ValueError(
            "`refs` needs embeddings and labels; received "
            f"refs.embeddings={_describe(refs.embeddings)}, "
            f"refs.labels={_describe(refs.labels)}."
        )
    return refs, ids, pair_weights


def unpack_references(refs):
    """``(embeddings, labels, ids, valid)`` of ``refs``; all None for None
    (the batch is its own reference set)."""
    if refs is None:
        return None, None, None, None
    return tuple(refs)


def _rank(x):
    shape = getattr(x, "shape", None)
    if shape is None:
        shape = np.shape(x)
    try:
        return len(shape)
    except TypeError:  # unknown rank
        return None


def _describe(x):
    return "None" if x is None else f"<{type(x).__name__}>"


def first_position(labels):
    """``[B]`` int32: the first batch position of each label's class.

    The same grouping as ``labels`` with values below ``B``, exact in
    float32 (Keras converts ``y_true`` to the loss dtype). Multi-hot labels
    ``[B, C]`` (0/1, exact in any float dtype) are returned as they are.
    """
    if labels.shape.rank == 2:
        return labels
    n = tf.shape(labels)[0]
    same = tf.equal(labels[:, None], labels[None, :])
    pos = tf.where(same, tf.range(n)[None, :], n)
    return tf.reduce_min(pos, axis=1)


class PairLoss(keras.losses.Loss):
    """Base class: builds the pair contract and calls :meth:`pair_loss`.

    Args:
      miner: optional :class:`tfdml.mining.Miner` (or its name / dict spec)
        applied to the masks before the loss.
      normalize: L2-normalise embeddings before the cosine similarity
        (idempotent for tfdml models, whose embeddings are already unit norm).
      relevance: optional function ``(labels, ref_labels) -> bool [B, M]``
        deciding which pairs are relevant (positives) instead of "same class
        id" / "intersecting label sets" (:func:`tfdml.ops.relevance`); it
        receives the validated labels (int32 class ids ``[B]`` / ``[M]``, or
        multi-hot rows). E.g. a class hierarchy: ``lambda a, b:
        tf.equal(tf.gather(parent, a)[:, None], tf.gather(parent, b)[None,
        :])``. Serialised with ``keras.saving.serialize_keras_object`` (use
        a function registered with ``keras.saving.register_keras_serializable``
        to save and load the loss). ``per_anchor(relevance=)`` takes a matrix
        for one call instead.
      **kwargs: passed to ``keras.losses.Loss`` (``name``, ``reduction``,
        ``dtype``).
    """

    def __init__(
        self,
        miner: mining_base.Miner | str | Mapping[str, Any] | None = None,
        normalize: bool = True,
        relevance: Callable[[tf.Tensor, tf.Tensor], tf.Tensor] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.miner = mining_base.get(miner)
        self.normalize = bool(normalize)
        if isinstance(relevance, (str, dict)):
            relevance = keras.saving.deserialize_keras_object(relevance)
        if relevance is not None and not callable(relevance):
            raise ValueError(
                "`relevance` must be a function (labels, ref_labels) -> bool "
                "[batch, references] or None (a matrix goes to "
                f"per_anchor(relevance=)); received {relevance!r}."
            )
        self.relevance = relevance

    # -- Keras entry point -------------------------------------------------
    def __call__(
        self,
        y_true: tf.Tensor | npt.ArrayLike,
        y_pred: tf.Tensor | npt.ArrayLike,
        sample_weight: tf.Tensor | npt.ArrayLike | None = None,
    ) -> tf.Tensor:
        # Validate before Keras converts y_true to the loss dtype; pass the
        # grouping (first positions < B), which float32 holds exactly.
        labels, checked = check_labels(y_true, y_pred)
        if labels.shape[0] == 0 and self.reduction not in (None, "none"):
            # Keras returns the [0] per-anchor tensor for an empty batch.
            return tf.cast(tf.reduce_sum(checked), self.dtype)
        # A relevance function reads the class ids themselves (exact in
        # float32 below 2**24); otherwise only the grouping matters.
        if self.relevance is None:
            labels = first_position(labels)
        return super().__call__(labels, checked, sample_weight=sample_weight)

    def call(
        self,
        y_true: tf.Tensor | npt.ArrayLike,
        y_pred: tf.Tensor | npt.ArrayLike,
    ) -> tf.Tensor:
        return self.per_anchor(y_pred, y_true)

    # -- functional entry point --------------------------------------------
    def per_anchor(
        self,
        embeddings: tf.Tensor | npt.ArrayLike,
        labels: tf.Tensor | npt.ArrayLike,
        refs: References | None = None,
        ids: tf.Tensor | npt.ArrayLike | None = None,
        pair_weights: tf.Tensor | None = None,
        *legacy,
        relevance: tf.Tensor | npt.ArrayLike | None = None,
        **context,
    ) -> tf.Tensor:
        """Per-anchor loss ``[B]`` against an optional reference set.

        Args:
          embeddings: ``[B, d]`` anchors.
          labels: ``[B]`` int class ids.
          refs: optional :class:`References` ``(embeddings [M, d], labels
            [M], ids [M], valid [M])`` (default: the batch itself).
          ids: ``[B]`` example ids of the anchors; a reference with the
            anchor's id is the anchor itself and is never a positive (see
            :func:`tfdml.ops.pair_masks`).
          pair_weights: optional ``[B, M]`` external pair weights (MMSI).
          relevance: optional bool ``[B, M]`` relevance matrix for this call
            (True: a positive pair), instead of the labels' relevance and of
            the loss's ``relevance`` function; self pairs and invalid
            references stay excluded.
          **context: extra per-example inputs for weightings (e.g. ``probs``,
            ``ref_probs``).

        The old form ``per_anchor(emb, labels, ref_embeddings, ref_labels,
        ref_ids=..., ref_valid=...)`` still works with a
        ``DeprecationWarning`` (see :func:`as_references`).
        """
        refs, ids, pair_weights = as_references(
            refs, ids, context, pair_weights, legacy
        )
        ref_embeddings, ref_labels, ref_ids, ref_valid = unpack_references(refs)
        embeddings, labels, ref_embeddings, ref_labels = check_inputs(
            embeddings, labels, ref_embeddings, ref_labels
        )
        sim = self.similarity(embeddings, ref_embeddings)
        pos, neg = self.pair_masks(
            labels, ref_labels, ids, ref_ids, ref_valid, relevance
        )
        if self.miner is not None:
            pos, neg = self.miner(sim, pos, neg)
        loss = self.pair_loss(
            sim, pos, neg, pair_weights=pair_weights, **context
        )
        return nan_if_not_finite(loss, embeddings, ref_embeddings)

    def pair_masks(
        self,
        labels: tf.Tensor,
        ref_labels: tf.Tensor | None = None,
        ids: tf.Tensor | None = None,
        ref_ids: tf.Tensor | None = None,
        ref_valid: tf.Tensor | None = None,
        relevance: tf.Tensor | npt.ArrayLike | None = None,
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """``(pos_mask, neg_mask) [B, M]`` (:func:`tfdml.ops.pair_masks`)
        with ``relevance`` (a matrix) or else the loss's ``relevance``
        function deciding which pairs are relevant."""
        return ops.pair_masks(
            labels,
            ref_labels,
            ids,
            ref_ids,
            ref_valid,
            relevance=relevance if relevance is not None else self.relevance,
        )

    def similarity(
        self,
        embeddings: tf.Tensor | npt.ArrayLike,
        ref_embeddings: tf.Tensor | npt.ArrayLike | None = None,
    ) -> tf.Tensor:
        """The ``[B, M]`` similarity matrix (cosine by default)."""
        return ops.cosine_similarity(
            embeddings, ref_embeddings, normalize=self.normalize
        )

    def pair_loss(
        self,
        sim: tf.Tensor,
        pos_mask: tf.Tensor,
        neg_mask: tf.Tensor,
        pair_weights: tf.Tensor | None = None,
        **context,
    ) -> tf.Tensor:
        """Per-anchor loss ``[B]`` from the pair contract."""
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "miner": keras.saving.serialize_keras_object(self.miner),
                "normalize": self.normalize,
            }
        )
        if self.relevance is not None:
            config["relevance"] = keras.saving.serialize_keras_object(
                self.relevance
            )
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PairLoss:
        config = dict(config)
        if isinstance(config.get("miner"), dict):
            config["miner"] = keras.saving.deserialize_keras_object(
                config["miner"]
            )
        return cls(**config)


def apply_pair_weights(values, pair_weights):
    """Multiplies ``[B, M]`` pair values by optional external weights."""
    if pair_weights is None:
        return values
    return values * tf.cast(pair_weights, values.dtype)


def nan_if_not_finite(loss, *tensors):
    """Turns ``loss`` into NaN when any input holds NaN or Inf.

    The pair masks silently drop NaN similarities (every comparison with NaN
    is False), which would hide a diverged model behind a loss of 0. A NaN
    loss lets ``TerminateOnNaN`` and the training loop stop the run.
    """
    finite = tf.constant(True)
    for t in tensors:
        if t is not None:
            finite = tf.logical_and(
                finite, tf.reduce_all(tf.math.is_finite(tf.cast(t, "float32")))
            )
    return tf.where(finite, loss, tf.fill(tf.shape(loss), float("nan")))
