"""TensorFlow Addons-compatible metric losses (tfa 0.23, which does not import
under Keras 3): same numbers as tfa's definitions with tfa's defaults.

* :class:`TripletSemiHardLoss` / :func:`triplet_semihard_loss` (Schroff et
  al., CVPR 2015): for every ordered positive pair (a, p) the negative is the
  closest one farther than ``d_ap``; if none is farther, the farthest
  negative; ``L = Σ_{(a,p)} max(0, d_ap - d_an + margin) / |P|``.
* :class:`TripletHardLoss` / :func:`triplet_hard_loss` (Hermans et al.,
  arXiv 1703.07737): ``mean_a max(0, max_p d_ap - min_n d_an + margin)`` or,
  with ``soft=True``, ``log1p(exp(max_p d_ap - min_n d_an))``.
* :class:`LiftedStructLoss` / :func:`lifted_struct_loss` (Song et al., CVPR
  2016, Eq. 4) on the Euclidean distance of the raw embeddings.
* :class:`NpairsLoss` / :func:`npairs_loss` (Sohn, NeurIPS 2016): ``y_pred``
  is a **similarity matrix** ``[B, B]`` (tfa's contract), the targets are the
  same-label columns (the diagonal included), normalised per row.
* :class:`TfaContrastiveLoss` / :func:`tfa_contrastive_loss` (Hadsell et al.,
  CVPR 2006): ``y_true`` are 0/1 pair labels, ``y_pred`` pair distances.

Distances (``distance_metric``, tfa 0.23's names and meanings, on the raw,
*not* normalised embeddings): ``"L2"`` (tfa's default) is the Euclidean
distance, ``"squared-L2"`` the squared Euclidean distance, ``"angular"`` is
``1 - cos`` (floored at 1e-16). Callables (tfa accepts them) are not supported
(they do not serialise).

Reduction. tfa returns a scalar. Here the Keras entry point returns a
per-anchor vector and the default reduction (``"sum_over_batch_size"``) gives
exactly tfa's scalar. With ``reduction=None`` you get that vector: for the
triplet-hard loss and npairs it is the natural per-anchor loss; for the
semi-hard and lifted losses (tfa divides by the number of positive pairs in
the batch) anchor ``i`` gets ``B * (its sum) / |P|``, so the vector's mean is
tfa's scalar.

Where tfa returns NaN or -inf (a batch with no positive pair: 0/0; a lifted
positive pair without any negative: log 0), these return 0 with a finite
gradient. A triplet anchor without negatives follows tfa: the semi-hard
negative distance is then 0 (tfa's masked maximum falls back to the row
minimum, the zero self-distance) and the hard negative distance equals the
hardest positive distance (tfa's masked minimum falls back to the row
maximum). An anchor without positives in the hard loss uses ``d_ap = 0``.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy.typing as npt
import tensorflow as tf

from tfdml import ops
from tfdml import registry
from tfdml.losses.base import PairLoss
from tfdml.losses.base import References
from tfdml.losses.base import as_references
from tfdml.losses.base import check_inputs
from tfdml.losses.base import nan_if_not_finite
from tfdml.losses.base import unpack_references
from tfdml.losses.lifted import lifted_structure_song
from tfdml.mining.semi_hard import smallest_greater
from tfdml.validation import check_non_negative

METRICS = {
    "L2": "L2",
    "squared-L2": "squared-L2",
    "angular": "angular",
}


def check_metric(distance_metric):
    if not isinstance(distance_metric, str) or distance_metric not in METRICS:
        raise ValueError(
            f"`distance_metric` must be one of {sorted(METRICS)}; received "
            f"distance_metric={distance_metric!r}."
        )
    return distance_metric


def tfa_distance(embeddings, ref_embeddings=None, distance_metric="L2"):
    """``[B, M]`` float32 distances with tfa's metric names."""
    metric = METRICS[check_metric(distance_metric)]
    if metric == "angular":
        sim = ops.cosine_similarity(embeddings, ref_embeddings, normalize=True)
        return tf.maximum(1.0 - sim, 1e-16)
    return ops.pairwise_distance(
        embeddings, ref_embeddings, squared=metric == "squared-L2"
    )


# -- per-anchor cores on distances -------------------------------------------


def triplet_semihard_per_anchor(dist, pos_mask, neg_mask, margin=1.0):
    """Per-anchor share ``[B]`` of tfa's semi-hard triplet loss."""
    dist = tf.cast(dist, tf.float32)
    pos_mask = tf.cast(pos_mask, tf.bool)
    neg_mask = tf.cast(neg_mask, tf.bool)
    outside, exists = smallest_greater(dist, neg_mask, dist)
    inside = ops.masked_max(dist, neg_mask)
    has_neg = tf.reduce_any(neg_mask, axis=1)
    inside = tf.where(has_neg, inside, tf.zeros_like(inside))[:, None]
    d_an = tf.where(exists, outside, inside)
    hinge = tf.nn.relu(margin + dist - d_an)
    hinge = tf.where(pos_mask, hinge, tf.zeros_like(hinge))
    num_pos = tf.reduce_sum(tf.cast(pos_mask, tf.float32))
    batch = tf.cast(tf.shape(dist)[0], tf.float32)
    return tf.math.divide_no_nan(tf.reduce_sum(hinge, axis=1) * batch, num_pos)


def triplet_hard_per_anchor(dist, pos_mask, neg_mask, margin=1.0, soft=False):
    """Per-anchor tfa batch-hard triplet loss ``[B]``."""
    dist = tf.cast(dist, tf.float32)
    pos_mask = tf.cast(pos_mask, tf.bool)
    neg_mask = tf.cast(neg_mask, tf.bool)
    d_ap = ops.masked_max(dist, pos_mask)
    d_ap = tf.where(tf.reduce_any(pos_mask, axis=1), d_ap, tf.zeros_like(d_ap))
    d_an = ops.masked_min(dist, neg_mask)
    d_an = tf.where(tf.reduce_any(neg_mask, axis=1), d_an, d_ap)
    if soft:
        return tf.math.softplus(d_ap - d_an)
    return tf.nn.relu(d_ap - d_an + margin)


def _labels_1d(y_true):
    y_true = tf.convert_to_tensor(y_true)
    if y_true.shape.rank == 2 and y_true.shape[-1] == 1:
        y_true = tf.squeeze(y_true, -1)
    return y_true


# -- functions with tfa's signatures


def triplet_semihard_loss(
    y_true: tf.Tensor | npt.ArrayLike,
    y_pred: tf.Tensor | npt.ArrayLike,
    margin: float = 1.0,
    distance_metric: str = "L2",
) -> tf.Tensor:
    """tfa's ``triplet_semihard_loss``: scalar, dtype of ``y_pred``."""
    return _scalar(TripletSemiHardLoss(margin, distance_metric), y_true, y_pred)


def triplet_hard_loss(
    y_true: tf.Tensor | npt.ArrayLike,
    y_pred: tf.Tensor | npt.ArrayLike,
    margin: float = 1.0,
    soft: bool = False,
    distance_metric: str = "L2",
) -> tf.Tensor:
    """tfa's ``triplet_hard_loss``: scalar, dtype of ``y_pred``."""
    loss = TripletHardLoss(margin, soft, distance_metric)
    return _scalar(loss, y_true, y_pred)


def lifted_struct_loss(
    labels: tf.Tensor | npt.ArrayLike,
    embeddings: tf.Tensor | npt.ArrayLike,
    margin: float = 1.0,
) -> tf.Tensor:
    """tfa's ``lifted_struct_loss``: scalar."""
    return _scalar(LiftedStructLoss(margin), labels, embeddings)


def _scalar(loss, y_true, y_pred):
    y_pred = tf.convert_to_tensor(y_pred)
    per = loss.per_anchor(y_pred, y_true)
    return tf.cast(tf.reduce_mean(per), tf.as_dtype(y_pred.dtype))


def npairs_loss(
    y_true: tf.Tensor | npt.ArrayLike, y_pred: tf.Tensor | npt.ArrayLike
) -> tf.Tensor:
    """tfa's ``npairs_loss``: ``y_pred`` is a ``[B, B]`` similarity matrix."""
    return tf.reduce_mean(_npairs_per_row(y_true, y_pred))


def _npairs_per_row(y_true, y_pred):
    y_pred = tf.convert_to_tensor(y_pred)
    y_true = _labels_1d(y_true)
    if y_pred.shape.rank is not None and y_pred.shape.rank != 2:
        raise ValueError(
            "`y_pred` must be a rank-2 [batch, batch] similarity matrix; "
            f"received shape {y_pred.shape}."
        )
    if y_true.shape.rank is not None and y_true.shape.rank != 1:
        raise ValueError(
            "`y_true` must have rank 1 [batch] (or [batch, 1]); received "
            f"shape {y_true.shape}."
        )
    if not (y_true.dtype.is_integer or y_true.dtype.is_floating):
        raise ValueError(
            "`y_true` must be integer class ids; received dtype "
            f"{y_true.dtype.name}."
        )
    if (
        y_pred.shape[0] is not None
        and y_pred.shape[1] is not None
        and y_pred.shape[0] != y_pred.shape[1]
    ):
        raise ValueError(
            "`y_pred` must be a square [batch, batch] similarity matrix; "
            f"received shape {y_pred.shape}."
        )
    logits = tf.cast(y_pred, tf.float32)
    y = tf.cast(y_true, tf.float32)
    target = tf.cast(tf.equal(y[:, None], y[None, :]), tf.float32)
    target /= tf.reduce_sum(target, axis=1, keepdims=True)
    return tf.nn.softmax_cross_entropy_with_logits(labels=target, logits=logits)


def tfa_contrastive_loss(
    y_true: tf.Tensor | npt.ArrayLike,
    y_pred: tf.Tensor | npt.ArrayLike,
    margin: float = 1.0,
) -> tf.Tensor:
    """tfa's ``contrastive_loss``: per-pair ``y d^2 + (1-y) max(0, m-d)^2``.

    Args:
      y_true: ``[batch]`` 0/1 labels (1 = same class).
      y_pred: ``[batch]`` distances between the two embeddings of each pair.
      margin: the margin ``m`` (default 1).
    """
    check_non_negative("margin", margin)
    y_pred = tf.convert_to_tensor(y_pred)
    y_true = tf.cast(y_true, y_pred.dtype)
    return y_true * tf.square(y_pred) + (1.0 - y_true) * tf.square(
        tf.maximum(margin - y_pred, 0.0)
    )


# -- classes


class _TfaEmbeddingLoss(PairLoss):
    """Base of the tfa losses on embeddings: distances of raw embeddings.

    ``normalize=True`` L2-normalises the embeddings before the distance
    (tfa never does). Miners are not supported (tfa has none).
    """

    def __init__(self, miner=None, normalize=False, **kwargs):
        if miner is not None:
            raise ValueError(
                f"{type(self).__name__} does not take a miner (tfa's losses "
                f"mine internally); received miner={miner!r}."
            )
        super().__init__(miner=None, normalize=normalize, **kwargs)

    def distance_metric_name(self) -> str:
        return "L2"

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
        """Per-anchor loss ``[B]`` (see the module docstring)."""
        refs, ids, pair_weights = as_references(
            refs, ids, context, pair_weights, legacy
        )
        ref_embeddings, ref_labels, ref_ids, ref_valid = unpack_references(refs)
        if pair_weights is not None:
            raise ValueError(
                f"{type(self).__name__} does not support pair_weights."
            )
        embeddings, labels, ref_embeddings, ref_labels = check_inputs(
            embeddings, labels, ref_embeddings, ref_labels
        )
        if self.normalize:
            embeddings = ops.l2_normalize(embeddings)
            if ref_embeddings is not None:
                ref_embeddings = ops.l2_normalize(ref_embeddings)
        dist = tfa_distance(
            embeddings, ref_embeddings, self.distance_metric_name()
        )
        pos, neg = self.pair_masks(
            labels, ref_labels, ids, ref_ids, ref_valid, relevance
        )
        return nan_if_not_finite(
            self.distance_loss(dist, pos, neg), embeddings, ref_embeddings
        )

    def distance_loss(self, dist, pos_mask, neg_mask):
        raise NotImplementedError

    def pair_loss(
        self,
        sim: tf.Tensor,
        pos_mask: tf.Tensor,
        neg_mask: tf.Tensor,
        pair_weights: tf.Tensor | None = None,
        **context,
    ) -> tf.Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} works on distances: call per_anchor."
        )


@registry.register
class TripletSemiHardLoss(_TfaEmbeddingLoss):
    """tfa's ``TripletSemiHardLoss`` (FaceNet semi-hard mining).

    Args:
      margin: margin (default 1.0, tfa's), >= 0.
      distance_metric: ``"L2"`` (Euclidean, default), ``"squared-L2"``
        (squared Euclidean) or ``"angular"`` (see the module docstring).
      **kwargs: ``normalize`` (default False) and ``keras.losses.Loss``
        arguments.

    Example::

      model.compile(optimizer="adam", loss=TripletSemiHardLoss())

    Reference: Schroff et al., CVPR 2015; tfa ``losses/triplet.py``.
    """

    def __init__(
        self,
        margin: float = 1.0,
        distance_metric: str = "L2",
        name: str = "triplet_semihard_loss",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.margin = check_non_negative("margin", margin)
        self.distance_metric = check_metric(distance_metric)

    def distance_metric_name(self) -> str:
        return self.distance_metric

    def distance_loss(
        self, dist: tf.Tensor, pos_mask: tf.Tensor, neg_mask: tf.Tensor
    ) -> tf.Tensor:
        return triplet_semihard_per_anchor(
            dist, pos_mask, neg_mask, self.margin
        )

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(margin=self.margin, distance_metric=self.distance_metric)
        return config


@registry.register
class TripletHardLoss(_TfaEmbeddingLoss):
    """tfa's ``TripletHardLoss`` (batch-hard mining).

    Args:
      margin: margin (default 1.0), >= 0.
      soft: use ``log1p(exp(d_ap - d_an))`` instead of the hinge.
      distance_metric: ``"L2"`` (Euclidean, default), ``"squared-L2"``
        or ``"angular"``.
      **kwargs: ``normalize`` (default False) and ``keras.losses.Loss``
        arguments.

    Reference: Hermans et al., arXiv 1703.07737; tfa ``losses/triplet.py``.
    """

    def __init__(
        self,
        margin: float = 1.0,
        soft: bool = False,
        distance_metric: str = "L2",
        name: str = "triplet_hard_loss",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.margin = check_non_negative("margin", margin)
        self.soft = bool(soft)
        self.distance_metric = check_metric(distance_metric)

    def distance_metric_name(self) -> str:
        return self.distance_metric

    def distance_loss(
        self, dist: tf.Tensor, pos_mask: tf.Tensor, neg_mask: tf.Tensor
    ) -> tf.Tensor:
        return triplet_hard_per_anchor(
            dist, pos_mask, neg_mask, self.margin, self.soft
        )

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            margin=self.margin,
            soft=self.soft,
            distance_metric=self.distance_metric,
        )
        return config


@registry.register
class LiftedStructLoss(_TfaEmbeddingLoss):
    """tfa's ``LiftedStructLoss`` (Song et al. Eq. 4, Euclidean distance of
    the raw embeddings, no positive margin).

    Args:
      margin: the negative margin α (default 1.0), >= 0.
      **kwargs: ``normalize`` (default False) and ``keras.losses.Loss``
        arguments.

    Reference: Song et al., CVPR 2016; tfa ``losses/lifted.py``. With a
    reference set, see :mod:`tfdml.losses.lifted` for the negatives of a
    reference.
    """

    def __init__(
        self, margin: float = 1.0, name: str = "lifted_struct_loss", **kwargs
    ):
        super().__init__(name=name, **kwargs)
        self.margin = check_non_negative("margin", margin)

    def distance_loss(
        self, dist: tf.Tensor, pos_mask: tf.Tensor, neg_mask: tf.Tensor
    ) -> tf.Tensor:
        return lifted_structure_song(
            dist, pos_mask, neg_mask, neg_margin=self.margin
        )

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(margin=self.margin)
        return config


@registry.register
class NpairsLoss(keras.losses.Loss):
    """tfa's ``NpairsLoss``: ``y_pred`` is a ``[B, B]`` similarity matrix.

    ``y_true`` ``[B]`` class ids; ``y_pred[i, j]`` the similarity of anchor
    ``i`` and positive ``j`` (e.g. ``anchors @ positives^T``). Each row is a
    softmax over the columns with the same-label columns as (normalised)
    targets. Returns the per-row cross-entropy ``[B]``; the default Keras
    reduction gives tfa's scalar. For a loss on embeddings (the pair
    contract, memory banks) use :class:`tfdml.losses.NPairsLoss`.

    Reference: Sohn, NeurIPS 2016; tfa ``losses/npairs.py``.
    """

    def __init__(self, name: str = "npairs_loss", **kwargs):
        super().__init__(name=name, **kwargs)

    def __call__(
        self,
        y_true: tf.Tensor | npt.ArrayLike,
        y_pred: tf.Tensor | npt.ArrayLike,
        sample_weight: tf.Tensor | npt.ArrayLike | None = None,
    ) -> tf.Tensor:
        _npairs_per_row(y_true, y_pred)  # validates before Keras casts
        return super().__call__(y_true, y_pred, sample_weight=sample_weight)

    def call(
        self,
        y_true: tf.Tensor | npt.ArrayLike,
        y_pred: tf.Tensor | npt.ArrayLike,
    ) -> tf.Tensor:
        return _npairs_per_row(y_true, y_pred)


@registry.register
class TfaContrastiveLoss(keras.losses.Loss):
    """tfa's ``ContrastiveLoss`` on (pair label, pair distance).

    Args:
      margin: the margin ``m`` (default 1.0), >= 0.
      **kwargs: passed to ``keras.losses.Loss``.

    ``y_true`` ``[B]`` 0/1 (1 = similar pair), ``y_pred`` ``[B]`` distances.
    Returns ``y d^2 + (1 - y) max(0, m - d)^2`` per pair; the default
    reduction is the mean (tfa's).

    Reference: Hadsell et al., CVPR 2006; tfa ``losses/contrastive.py``.
    """

    def __init__(
        self, margin: float = 1.0, name: str = "tfa_contrastive_loss", **kwargs
    ):
        super().__init__(name=name, **kwargs)
        self.margin = check_non_negative("margin", margin)

    def __call__(
        self,
        y_true: tf.Tensor | npt.ArrayLike,
        y_pred: tf.Tensor | npt.ArrayLike,
        sample_weight: tf.Tensor | npt.ArrayLike | None = None,
    ) -> tf.Tensor:
        y_true = _labels_1d(y_true)
        y_pred = _labels_1d(y_pred)
        for name, value in (("y_true", y_true), ("y_pred", y_pred)):
            if value.shape.rank is not None and value.shape.rank != 1:
                raise ValueError(
                    f"`{name}` must have rank 1 [batch] (or [batch, 1]); "
                    f"received shape {value.shape}."
                )
        if not y_pred.dtype.is_floating:
            raise ValueError(
                "`y_pred` must be floating distances; received dtype "
                f"{y_pred.dtype.name}."
            )
        if not (
            y_true.dtype.is_integer
            or y_true.dtype.is_floating
            or y_true.dtype.is_bool
        ):
            raise ValueError(
                "`y_true` must be 0/1 pair labels; received dtype "
                f"{y_true.dtype.name}."
            )
        return super().__call__(y_true, y_pred, sample_weight=sample_weight)

    def call(
        self,
        y_true: tf.Tensor | npt.ArrayLike,
        y_pred: tf.Tensor | npt.ArrayLike,
    ) -> tf.Tensor:
        return tfa_contrastive_loss(y_true, y_pred, self.margin)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(margin=self.margin)
        return config
