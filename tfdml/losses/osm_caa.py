"""Weighted contrastive loss with Online Soft Mining and Class-Aware
Attention (Wang, Wang, Li, Kodirov, Robertson, "Deep Metric Learning by
Online Soft Mining and Class-Aware Attention", AAAI 2019, arXiv 1811.01459;
official Caffe layer ``DistanceWeightedValidPairLossV5``, commit d9f516c).

With ``d_ij`` the Euclidean distance of the (L2-normalised) embeddings,
OSM scores ``s+ = exp(-d^2 / (2 sigma^2))``, ``s- = max(0, m - d)`` and CAA
attention ``a_ij = min(a_i, a_j)``, ``a_i = N(p_i; 1, 0.68)`` of the
true-class probability (see :mod:`tfdml.weighting.osm_caa`), the pair
weights ``w = s a`` are normalised per polarity (1e-12 guard, no gradient).

Paper form (default)::

  L = (1 - λ) ½ Σ_P w d² / Σ_P w  +  λ ½ Σ_N w (m - d)₊² / Σ_N w

Official code (``official_code=True``; Caffe rescales the gradient of its
contrastive loss, which divides by the number of pairs P)::

  L = (1/P) Σ_pairs sg(ŵ) ½ [y d² + (1 - y)(m - d)₊²],
  ŵ± = 0.5 w / Σ_± w     (= the paper form with λ = 0.5, divided by P)

(for another λ the code form is the paper form divided by P). Pairs are
unordered (i < j, counted once): with the batch as its own reference set the
``[B, B]`` matrix lists each pair twice, so every listed entry counts 1/2
(``P = listed / 2``). With a reference set (``DMLModel`` passes the batch
plus memory / synthetic rows) a reference whose example id is an anchor's id
counts 1/2 and any other reference (memory slot, synthetic row) counts 1.

Per-anchor values (``reduction=None``, :meth:`per_anchor`): each pair's
contribution is split equally between its two members (for a memory-bank
reference, the anchor takes it whole) and multiplied by B, so that the mean
over anchors is exactly ``L``.

The probabilities: ``per_anchor(emb, labels, probs=p, ref_probs=p_ref)`` with
``p`` ``[B]`` the true-class softmax probabilities, or, with Keras'
``model.fit``, ``y_pred`` a dict ``{"embeddings": [B, d], "logits": [B,
C]}`` (other keys ignored): ``p = softmax(logits)[y]`` is computed here,
without gradient. Keras gives a single loss to *each* output of a
dict-output model, so nest the dict one level::

  inputs = keras.Input((16,))
  h = keras.layers.Dense(32, activation="relu")(inputs)
  emb = keras.layers.UnitNormalization()(keras.layers.Dense(8)(h))
  logits = keras.layers.Dense(num_classes)(h)
  model = keras.Model(
      inputs, {"metric": {"embeddings": emb, "logits": logits},
               "logits": logits})
  model.compile("sgd", loss={
      "metric": WeightedContrastiveLoss(),
      "logits": keras.losses.SparseCategoricalCrossentropy(from_logits=True)})
  model.fit(x, {"metric": y, "logits": y})   # y: [B] int labels

(the official model trains its classification heads with their own
(weighted) cross-entropy, as the second loss above;
``tfdml.models.DMLModel(classification_loss_weight=...)`` does this and feeds
``probs`` to :meth:`per_anchor` itself.) Without probabilities,
``use_caa=False`` gives OSM alone; with ``use_caa=True`` missing
probabilities raise ``ValueError``.
"""

from __future__ import annotations

from typing import Any

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
from tfdml.validation import check_positive
from tfdml.weighting.osm_caa import CAAWeighting
from tfdml.weighting.osm_caa import OSMWeighting
from tfdml.weighting.osm_caa import gaussian_pdf


def weighted_contrastive(
    dist: tf.Tensor,
    pos_mask: tf.Tensor,
    neg_mask: tf.Tensor,
    attention: tf.Tensor | None = None,
    pair_weights: tf.Tensor | None = None,
    *,
    margin: float = 1.2,
    sigma: float = 0.8,
    lambda_: float = 0.5,
    official_code: bool = False,
    multiplicity: float = 1.0,
) -> tf.Tensor:
    """Per-anchor OSM(+CAA) weighted contrastive loss ``[B]``.

    ``dist`` ``[B, M]`` Euclidean distances, ``attention`` ``[B, M]`` CAA
    pair attention (None: uniform), ``pair_weights`` extra weights,
    ``multiplicity`` (scalar, ``[M]`` or ``[B, M]``): how many times each
    unordered pair is listed (2 when the reference is also an anchor, so
    that ``(j, i)`` is listed too; 1 for a memory-bank reference).
    """
    dist = tf.cast(dist, tf.float32)
    pos_mask = tf.cast(pos_mask, tf.bool)
    neg_mask = tf.cast(neg_mask, tf.bool)
    s_pos, s_neg = OSMWeighting(sigma, margin)(
        None, pos_mask, neg_mask, distance=dist
    )
    if attention is not None:
        att = tf.stop_gradient(tf.cast(attention, tf.float32))
        s_pos, s_neg = s_pos * att, s_neg * att
    if pair_weights is not None:
        pw = tf.stop_gradient(tf.cast(pair_weights, tf.float32))
        s_pos, s_neg = s_pos * pw, s_neg * pw
    # each unordered pair counts once: listed entries weigh 1 / multiplicity
    share = 1.0 / tf.broadcast_to(
        tf.cast(multiplicity, tf.float32), tf.shape(dist)
    )
    s_pos, s_neg = s_pos * share, s_neg * share
    w_pos = s_pos / tf.maximum(tf.reduce_sum(s_pos), 1e-12)
    w_neg = s_neg / tf.maximum(tf.reduce_sum(s_neg), 1e-12)
    f_pos = 0.5 * tf.square(dist)
    f_neg = 0.5 * tf.square(tf.nn.relu(margin - dist))
    contrib = (1.0 - lambda_) * tf.stop_gradient(w_pos) * tf.where(
        pos_mask, f_pos, 0.0
    ) + lambda_ * tf.stop_gradient(w_neg) * tf.where(neg_mask, f_neg, 0.0)
    if official_code:
        listed = tf.cast(tf.logical_or(pos_mask, neg_mask), tf.float32)
        pairs = tf.reduce_sum(listed * share)
        contrib = tf.math.divide_no_nan(contrib, pairs)
    batch = tf.cast(tf.shape(dist)[0], tf.float32)
    return batch * tf.reduce_sum(contrib, axis=1)


def gaussian_weighted_cross_entropy(
    labels, logits, sample_weight=None, mu=0.5, sigma=0.18
):
    """The official OSM + CAA classification loss (``WeightedSoftmaxWithLoss``).

    Sample weights ``u_i = N(p_i; mu, sigma)`` (Gaussian pdf) of the softmax
    probability of the true class, held constant (no gradient), times
    ``sample_weight`` and L1-normalised over the batch; the loss is
    ``-sum_i u_i log p_i``. The official CUB / Cars prototxt puts one on each
    of its three classifier heads with ``mu = 0.5, sigma = 0.18``: samples
    the head is unsure about (``p ~ 0.5``) get the most weight, confident
    ones and hopeless ones (outliers) little.

    Args:
      labels: int ``[B]`` class ids in ``[0, C)``.
      logits: ``[B, C]``.
      sample_weight: optional ``[B]``.
      mu, sigma: the Gaussian (official 0.5, 0.18).

    Returns:
      The scalar loss.
    """
    check_positive("sigma", sigma)
    logits = tf.cast(logits, tf.float32)
    labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
    log_p = tf.gather(
        tf.nn.log_softmax(logits, axis=-1), labels, axis=1, batch_dims=1
    )
    u = tf.stop_gradient(gaussian_pdf(tf.exp(log_p), float(mu), float(sigma)))
    if sample_weight is not None:
        u = u * tf.reshape(tf.cast(sample_weight, tf.float32), [-1])
    u = u / tf.maximum(tf.reduce_sum(u), 1e-12)
    return -tf.reduce_sum(u * log_p)


@registry.register
class WeightedContrastiveLoss(PairLoss):
    """OSM + CAA weighted contrastive loss (see the module docstring).

    Args:
      margin: the negative margin m (default 1.2).
      sigma: the OSM positive width (default 0.8).
      lambda_: the balance λ between the two polarities (default 0.5).
      caa_mu, caa_sigma: the CAA Gaussian (default 1.0, 0.68).
      caa_combine: ``"min"`` (official code) or ``"product"``.
      use_caa: multiply by the class-aware attention (needs probabilities).
      official_code: the Caffe form (paper form divided by P).
      normalize: L2-normalise embeddings before the distances (default
        True; the official embedding is L2-normalised).
      **kwargs: passed to :class:`tfdml.losses.PairLoss`.

    Reference: Wang et al., AAAI 2019, arXiv 1811.01459.
    """

    requires_probs = True

    def __init__(
        self,
        margin: float = 1.2,
        sigma: float = 0.8,
        lambda_: float = 0.5,
        caa_mu: float = 1.0,
        caa_sigma: float = 0.68,
        caa_combine: str = "min",
        use_caa: bool = True,
        official_code: bool = False,
        name: str = "weighted_contrastive_loss",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.margin = check_positive("margin", margin)
        self.sigma = check_positive("sigma", sigma)
        if lambda_ is None or not 0.0 <= lambda_ <= 1.0:
            raise ValueError(
                f"`lambda_` must be in [0, 1]; received lambda_={lambda_!r}."
            )
        self.lambda_ = float(lambda_)
        self.caa = CAAWeighting(caa_mu, caa_sigma, caa_combine)
        self.use_caa = bool(use_caa)
        self.official_code = bool(official_code)

    # -- Keras entry point: y_pred may be {"embeddings", "logits"} ----------
    def __call__(
        self,
        y_true: tf.Tensor | npt.ArrayLike,
        y_pred: tf.Tensor | npt.ArrayLike,
        sample_weight: tf.Tensor | npt.ArrayLike | None = None,
    ) -> tf.Tensor:
        if isinstance(y_pred, dict):
            if "embeddings" not in y_pred:
                raise ValueError(
                    "`y_pred` as a dict needs an 'embeddings' key; received "
                    f"keys {sorted(y_pred)}."
                )
            ops.check_labels_embeddings(y_true, y_pred["embeddings"])
            return super(PairLoss, self).__call__(
                y_true, y_pred, sample_weight=sample_weight
            )
        return super().__call__(y_true, y_pred, sample_weight=sample_weight)

    def call(
        self,
        y_true: tf.Tensor | npt.ArrayLike,
        y_pred: tf.Tensor | npt.ArrayLike,
    ) -> tf.Tensor:
        if not isinstance(y_pred, dict):
            return self.per_anchor(y_pred, y_true)
        emb = y_pred["embeddings"]
        probs = None
        if "logits" in y_pred:
            labels, _ = ops.check_labels_embeddings(y_true, emb)
            p = tf.nn.softmax(tf.cast(y_pred["logits"], tf.float32), axis=-1)
            probs = tf.stop_gradient(tf.gather(p, labels, axis=1, batch_dims=1))
        return self.per_anchor(emb, y_true, probs=probs)

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
        refs, ids, pair_weights = as_references(
            refs, ids, context, pair_weights, legacy
        )
        ref_embeddings, ref_labels, ref_ids, ref_valid = unpack_references(refs)
        embeddings, labels, ref_embeddings, ref_labels = check_inputs(
            embeddings, labels, ref_embeddings, ref_labels
        )
        multiplicity = 2.0
        a = (
            ops.l2_normalize(embeddings)
            if self.normalize
            else tf.cast(embeddings, tf.float32)
        )
        if ref_embeddings is None:
            b = a
        else:
            b = (
                ops.l2_normalize(ref_embeddings)
                if self.normalize
                else tf.cast(ref_embeddings, tf.float32)
            )
        sim = tf.matmul(a, b, transpose_b=True)
        dist = ops.pairwise_distance(a, b)
        pos, neg = self.pair_masks(
            labels, ref_labels, ids, ref_ids, ref_valid, relevance
        )
        if ref_embeddings is not None:
            multiplicity = 1.0
            if ids is not None and ref_ids is not None:
                # a reference with an anchor's id is that anchor: the pair
                # is listed twice, (i, j) and (j, i)
                is_anchor = tf.reduce_any(
                    tf.equal(
                        tf.cast(ref_ids, tf.int32)[:, None],
                        tf.cast(ids, tf.int32)[None, :],
                    ),
                    axis=1,
                )
                multiplicity = tf.where(is_anchor, 2.0, 1.0)[None, :]
        if self.miner is not None:
            pos, neg = self.miner(sim, pos, neg)
        loss = self.pair_loss(
            sim,
            pos,
            neg,
            pair_weights=pair_weights,
            distance=dist,
            multiplicity=multiplicity,
            **context,
        )
        return nan_if_not_finite(loss, embeddings, ref_embeddings)

    def pair_loss(
        self,
        sim: tf.Tensor,
        pos_mask: tf.Tensor,
        neg_mask: tf.Tensor,
        pair_weights: tf.Tensor | None = None,
        distance: tf.Tensor | None = None,
        multiplicity: float | None = None,
        probs: tf.Tensor | None = None,
        ref_probs: tf.Tensor | None = None,
        **context,
    ) -> tf.Tensor:
        if distance is None:
            distance = ops.distance_from_similarity(tf.cast(sim, tf.float32))
        square = sim.shape[0] is not None and sim.shape[0] == sim.shape[1]
        if multiplicity is None:  # the batch against itself, or a bank
            multiplicity = 2.0 if square else 1.0
        attention = None
        if self.use_caa:
            if probs is None:
                raise ValueError(
                    "WeightedContrastiveLoss(use_caa=True) needs the "
                    "true-class probabilities: pass `probs` (and "
                    "`ref_probs`) to per_anchor, or y_pred as a dict with "
                    "'logits'; received probs=None."
                )
            if ref_probs is None and not square:
                raise ValueError(
                    "`ref_probs` is required with a reference set; "
                    "received ref_probs=None."
                )
            attention, _ = self.caa(
                distance,
                tf.ones_like(pos_mask, tf.bool),
                tf.zeros_like(neg_mask, tf.bool),
                probs=probs,
                ref_probs=probs if ref_probs is None else ref_probs,
            )
        return weighted_contrastive(
            distance,
            pos_mask,
            neg_mask,
            attention,
            pair_weights,
            margin=self.margin,
            sigma=self.sigma,
            lambda_=self.lambda_,
            official_code=self.official_code,
            multiplicity=multiplicity,
        )

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            margin=self.margin,
            sigma=self.sigma,
            lambda_=self.lambda_,
            caa_mu=self.caa.mu,
            caa_sigma=self.caa.sigma,
            caa_combine=self.caa.combine,
            use_caa=self.use_caa,
            official_code=self.official_code,
        )
        return config
