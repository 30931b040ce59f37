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
"""

import keras
import tensorflow as tf

from tfdml import ops
from tfdml.mining import base as mining_base


def check_non_negative(name, value):
    """Raises ``ValueError`` naming the argument when ``value < 0``."""
    if value is None or value < 0:
        raise ValueError(f"`{name}` must be >= 0; received {name}={value!r}.")
    return float(value)


def check_positive(name, value):
    """Raises ``ValueError`` naming the argument when ``value <= 0``."""
    if value is None or value <= 0:
        raise ValueError(f"`{name}` must be > 0; received {name}={value!r}.")
    return float(value)


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(
            f"`{name}` must be one of {sorted(choices)}; received "
            f"{name}={value!r}."
        )
    return value


def check_inputs(embeddings, labels, ref_embeddings=None, ref_labels=None):
    """Validates anchors and the optional reference set (ranks, dtypes).

    Returns ``(embeddings, int32 labels, ref_embeddings, int32 ref_labels)``.
    """
    labels, embeddings = ops.check_labels_embeddings(labels, embeddings)
    if ref_embeddings is not None:
        ref_labels, ref_embeddings = ops.check_labels_embeddings(
            ref_labels, ref_embeddings, name="ref_labels"
        )
    return embeddings, labels, ref_embeddings, ref_labels


class PairLoss(keras.losses.Loss):
    """Base class: builds the pair contract and calls :meth:`pair_loss`.

    Args:
      miner: optional :class:`tfdml.mining.Miner` (or its name / dict spec)
        applied to the masks before the loss.
      normalize: L2-normalise embeddings before the cosine similarity
        (idempotent for tfdml models, whose embeddings are already unit norm).
      **kwargs: passed to ``keras.losses.Loss`` (``name``, ``reduction``,
        ``dtype``).
    """

    def __init__(self, miner=None, normalize=True, **kwargs):
        super().__init__(**kwargs)
        self.miner = mining_base.get(miner)
        self.normalize = bool(normalize)

    # -- Keras entry point -------------------------------------------------
    def __call__(self, y_true, y_pred, sample_weight=None):
        # Validate before Keras converts y_true to the loss dtype.
        ops.check_labels_embeddings(y_true, y_pred)
        return super().__call__(y_true, y_pred, sample_weight=sample_weight)

    def call(self, y_true, y_pred):
        return self.per_anchor(y_pred, y_true)

    # -- functional entry point --------------------------------------------
    def per_anchor(
        self,
        embeddings,
        labels,
        ref_embeddings=None,
        ref_labels=None,
        ids=None,
        ref_ids=None,
        ref_valid=None,
        pair_weights=None,
        **context,
    ):
        """Per-anchor loss ``[B]`` against an optional reference set.

        Args:
          embeddings: ``[B, d]`` anchors.
          labels: ``[B]`` int class ids.
          ref_embeddings: ``[M, d]`` references (default: the batch itself).
          ref_labels: ``[M]`` class ids of the references.
          ids, ref_ids: example ids; a reference with the anchor's id is the
            anchor itself and is never a positive (see
            :func:`tfdml.ops.pair_masks`).
          ref_valid: ``[M]`` bool, False for empty memory slots.
          pair_weights: optional ``[B, M]`` external pair weights (MMSI).
          **context: extra per-example inputs for weightings (e.g. ``probs``).
        """
        embeddings, labels, ref_embeddings, ref_labels = check_inputs(
            embeddings, labels, ref_embeddings, ref_labels
        )
        sim = self.similarity(embeddings, ref_embeddings)
        pos, neg = ops.pair_masks(labels, ref_labels, ids, ref_ids, ref_valid)
        if self.miner is not None:
            pos, neg = self.miner(sim, pos, neg)
        loss = self.pair_loss(
            sim, pos, neg, pair_weights=pair_weights, **context
        )
        return nan_if_not_finite(loss, embeddings, ref_embeddings)

    def similarity(self, embeddings, ref_embeddings=None):
        """The ``[B, M]`` similarity matrix (cosine by default)."""
        return ops.cosine_similarity(
            embeddings, ref_embeddings, normalize=self.normalize
        )

    def pair_loss(self, sim, pos_mask, neg_mask, pair_weights=None, **context):
        """Per-anchor loss ``[B]`` from the pair contract."""
        raise NotImplementedError

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "miner": keras.saving.serialize_keras_object(self.miner),
                "normalize": self.normalize,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
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
