"""MMSI's three forms of a pair loss: select (S), global (G), weighted (W).

Jiang et al., "Meta-Mining Strategy with Semi-global Information for Deep
Metric Learning", IEEE TNNLS 2024 (official code: ``losses/__init__.py``).
Every form works on the pair contract (:mod:`tfdml.ops`): ``sim [B, M]``,
``pos_mask`` / ``neg_mask [B, M]``.

* **S-form** :meth:`MMSIPairLoss.select` returns the pairs the base loss
  selects on the training batch as dense ``[B, M]`` masks (plus any fixed
  per-pair factors, ``sel["count"]``). MMSI's weights are a dense ``[B, M]``
  tensor aligned with these masks; the selection is computed once per step
  and reused by the real step, so weights can never mis-align (the official
  code re-selects pairs in the real step and aligns a flat list by position).
* **W-form** :meth:`MMSIPairLoss.weighted` is the training-batch loss with
  one weight per selected pair.
* **G-form** :meth:`MMSIPairLoss.pair_loss` (the ``PairLoss`` entry point,
  used for the meta loss against the class dictionary and for evaluation)
  is the base loss without mining where the official code has none.

For all three bases, ``g_k = dL_W / dw_k`` at ``w = 0`` is *affine in the
similarity* of pair ``k``, ``g_k = a_k * S_k + const`` with a coefficient
``a_k`` that depends only on the (fixed) selection;
:meth:`MMSIPairLoss.coefficients` returns ``a [B, M]`` already divided by
the number of anchors ``n``. This is what the fast path of
:mod:`tfdml.meta.mmsi` uses (docs/training_methods.md, MMSI, "Nested vs
fast path").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import tensorflow as tf

from tfdml import ops
from tfdml import registry
from tfdml.losses.base import PairLoss
from tfdml.losses.multi_similarity import multi_similarity
from tfdml.mining.multi_similarity import MultiSimilarityMiner
from tfdml.validation import check_non_negative
from tfdml.validation import check_positive

_DUPLICATE = 1.0 - 1e-5  # positives with S >= this are exact duplicates


def _f(mask):
    return tf.cast(mask, tf.float32)


class MMSIPairLoss(PairLoss):
    """Base of the MMSI base losses (S / W / G forms).

    The Keras / ``per_anchor`` entry point computes the G-form (used for the
    meta loss and for evaluation). Subclasses implement :meth:`select`,
    :meth:`weighted`, :meth:`coefficients` and :meth:`pair_loss`.
    """

    def __init__(self, name: str | None = None, **kwargs):
        kwargs.pop("miner", None)
        super().__init__(miner=None, name=name, **kwargs)

    def select(
        self, sim: tf.Tensor, pos_mask: tf.Tensor, neg_mask: tf.Tensor
    ) -> dict[str, tf.Tensor]:
        """S-form: ``dict(pos=[B, M] bool, neg=[B, M] bool, count=[B, M])``.

        Computed from a stop-gradient ``sim``; ``count`` holds fixed per-pair
        factors (1 except for the triplet base).
        """
        raise NotImplementedError

    def weighted(
        self,
        sim: tf.Tensor,
        sel: Mapping[str, tf.Tensor],
        pair_weights: tf.Tensor,
    ) -> tf.Tensor:
        """W-form per anchor ``[B]`` with weights ``[B, M]``."""
        raise NotImplementedError

    def coefficients(
        self, sim: tf.Tensor, sel: Mapping[str, tf.Tensor]
    ) -> tf.Tensor:
        """``a [B, M]`` with ``dL_W/dw_k |_{w=0} = a_k S_k + const``; the
        mean over the ``n`` anchors is included (``L_W = mean_i``)."""
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.pop("miner", None)
        return config


@registry.register
class MMSIContrastiveLoss(MMSIPairLoss):
    """Contrastive loss in MMSI's similarity code form.

    Per anchor, positives are same-class entries with ``S < 1`` (drops the
    anchor itself and exact duplicates) and negatives the other-class entries
    with ``S > margin``:

    * G-form: ``sum_P (1 - S) + sum_{N, S > m} S``,
    * W-form: ``sum_P -(S + 1) w + sum_{N, S > m} S w`` (official
      ``Contrastive_W.py``; note ``+1``: the value can be negative, the
      gradient equals that of ``(1 - S) w``).

    Args:
      margin: negative threshold ``m`` (official Cars script: 0.8).
    """

    def __init__(
        self, margin: float = 0.5, name: str = "mmsi_contrastive_loss", **kwargs
    ):
        super().__init__(name=name, **kwargs)
        self.margin = float(margin)
        if not -1.0 <= self.margin <= 1.0:
            raise ValueError(
                f"`margin` must be in [-1, 1]; received margin={margin!r}."
            )

    def select(
        self, sim: tf.Tensor, pos_mask: tf.Tensor, neg_mask: tf.Tensor
    ) -> dict[str, tf.Tensor]:
        sim = tf.stop_gradient(sim)
        pos = tf.logical_and(pos_mask, sim < _DUPLICATE)
        neg = tf.logical_and(neg_mask, sim > self.margin)
        return {"pos": pos, "neg": neg, "count": tf.ones_like(sim)}

    def pair_loss(
        self,
        sim: tf.Tensor,
        pos_mask: tf.Tensor,
        neg_mask: tf.Tensor,
        pair_weights: tf.Tensor | None = None,
        **context,
    ) -> tf.Tensor:
        sel = self.select(sim, pos_mask, neg_mask)
        w_p = _f(sel["pos"])
        w_n = _f(sel["neg"])
        if pair_weights is not None:
            w_p = w_p * pair_weights
            w_n = w_n * pair_weights
        return tf.reduce_sum(w_p * (1.0 - sim) + w_n * sim, axis=1)

    def weighted(
        self,
        sim: tf.Tensor,
        sel: Mapping[str, tf.Tensor],
        pair_weights: tf.Tensor,
    ) -> tf.Tensor:
        w = tf.cast(pair_weights, sim.dtype)
        pos = -(sim + 1.0) * w * _f(sel["pos"])
        neg = sim * w * _f(sel["neg"])
        return tf.reduce_sum(pos + neg, axis=1)

    def coefficients(
        self, sim: tf.Tensor, sel: Mapping[str, tf.Tensor]
    ) -> tf.Tensor:
        n = tf.cast(tf.shape(sim)[0], tf.float32)
        return (_f(sel["neg"]) - _f(sel["pos"])) / n

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(margin=self.margin)
        return config


@registry.register
class MMSIMultiSimilarityLoss(MMSIPairLoss):
    """Multi-Similarity loss in MMSI's code form.

    Uses the MS paper's names: ``alpha`` = positive scale, ``beta`` =
    negative scale (MMSI's code calls them ``beta = 2`` and ``alpha = 40``).

    * S-form: MS mining with ``epsilon`` (keep a negative if
      ``S_ik > min_P S_ij - eps``, a positive if ``S_ij < max_N S_ik + eps``);
      an anchor lacking a mined positive or negative selects nothing.
    * G-form: no mining; every positive with ``S < 1`` and every negative.
    * W-form: the weight multiplies the similarity **inside** the exponent:
      ``c/alpha log(1 + sum_P e^{-alpha (w S - base)}) + c/beta log(1 +
      sum_N e^{beta (w S - base)})``.

    Args:
      alpha, beta, base: positive scale (2), negative scale (40), margin λ
        (0.5, hard-coded in the official code).
      epsilon: S-form mining margin (0.05 CUB/Cars, 0.03 SOP).
      coefficient: ``c``; 2 as MMSI's code (default), 1 as the MS paper.
    """

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 40.0,
        base: float = 0.5,
        epsilon: float = 0.05,
        coefficient: float = 2.0,
        name: str = "mmsi_multi_similarity_loss",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.alpha = check_positive("alpha", alpha)
        self.beta = check_positive("beta", beta)
        self.base = float(base)
        self.epsilon = check_non_negative("epsilon", epsilon)
        self.coefficient = check_positive("coefficient", coefficient)
        self._miner = MultiSimilarityMiner(epsilon=self.epsilon)

    def _ms(self, sim, pos, neg, pair_weights=None):
        return multi_similarity(
            sim,
            pos,
            neg,
            pair_weights,
            alpha=self.alpha,
            beta=self.beta,
            base=self.base,
            coefficient=self.coefficient,
            weights_on_similarity=True,
        )

    def select(
        self, sim: tf.Tensor, pos_mask: tf.Tensor, neg_mask: tf.Tensor
    ) -> dict[str, tf.Tensor]:
        sim = tf.stop_gradient(sim)
        pos, neg = self._miner(sim, pos_mask, neg_mask)
        both = tf.logical_and(
            tf.reduce_any(pos, axis=1, keepdims=True),
            tf.reduce_any(neg, axis=1, keepdims=True),
        )
        pos = tf.logical_and(pos, both)
        neg = tf.logical_and(neg, both)
        return {"pos": pos, "neg": neg, "count": tf.ones_like(sim)}

    def pair_loss(
        self,
        sim: tf.Tensor,
        pos_mask: tf.Tensor,
        neg_mask: tf.Tensor,
        pair_weights: tf.Tensor | None = None,
        **context,
    ) -> tf.Tensor:
        pos = tf.logical_and(pos_mask, tf.stop_gradient(sim) < _DUPLICATE)
        return self._ms(sim, pos, neg_mask, pair_weights)

    def weighted(
        self,
        sim: tf.Tensor,
        sel: Mapping[str, tf.Tensor],
        pair_weights: tf.Tensor,
    ) -> tf.Tensor:
        return self._ms(sim, sel["pos"], sel["neg"], pair_weights)

    def coefficients(
        self, sim: tf.Tensor, sel: Mapping[str, tf.Tensor]
    ) -> tf.Tensor:
        n = tf.cast(tf.shape(sim)[0], tf.float32)
        p = _f(sel["pos"])
        q = _f(sel["neg"])
        n_p = tf.reduce_sum(p, axis=1, keepdims=True)
        n_n = tf.reduce_sum(q, axis=1, keepdims=True)
        # c+ = e^{a l} / (1 + |P| e^{a l}) = 1 / (e^{-a l} + |P|), stably.
        c_pos = 1.0 / (math.exp(-self.alpha * self.base) + n_p)
        c_neg = 1.0 / (math.exp(self.beta * self.base) + n_n)
        c = self.coefficient
        return c * (q * c_neg - p * c_pos) / n

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            alpha=self.alpha,
            beta=self.beta,
            base=self.base,
            epsilon=self.epsilon,
            coefficient=self.coefficient,
        )
        return config


@registry.register
class MMSITripletLoss(MMSIPairLoss):
    """Triplet loss (cosine similarity) in MMSI's pair framework.

    The paper claims the framework covers triplet losses; the official code
    has no triplet instance. tfdml's reading: for anchor ``i`` the active
    triplets are ``T_i = {(j, k): j in P_i, k in N_i, S_ik > S_ij - m}``
    (``S_ij < 1``), and the loss is their mean hinge
    ``1/|T_i| sum_{T_i} (m + S_ik - S_ij)``. On the active set the hinge is
    linear, so it decomposes into pair terms with fixed counts
    ``cnt_ij = #{k: (j, k) in T_i}`` and ``cnt_ik = #{j: (j, k) in T_i}``:

    * S-form: pairs in at least one active triplet, ``count = cnt / |T_i|``,
    * W-form: ``[|T_i| > 0] m + sum_N count w S - sum_P count w S``
      (weights on the similarities, like MMSI's MS, so ``w = 1`` gives back
      the triplet loss),
    * G-form: the triplet loss itself over all triplets of the reference set
      (dense ``[B, M, M]``: keep the dictionary small, e.g. ``d_size`` 1-10).

    Args:
      margin: the triplet margin ``m`` on cosine similarity.
    """

    def __init__(
        self, margin: float = 0.1, name: str = "mmsi_triplet_loss", **kwargs
    ):
        super().__init__(name=name, **kwargs)
        self.margin = check_non_negative("margin", margin)

    def _active(self, sim, pos_mask, neg_mask):
        pos = tf.logical_and(pos_mask, sim < _DUPLICATE)
        viol = sim[:, None, :] - sim[:, :, None] + self.margin  # [B, j, k]
        active = tf.logical_and(
            tf.logical_and(pos[:, :, None], neg_mask[:, None, :]), viol > 0.0
        )
        return active, viol

    def select(
        self, sim: tf.Tensor, pos_mask: tf.Tensor, neg_mask: tf.Tensor
    ) -> dict[str, tf.Tensor]:
        sim = tf.stop_gradient(sim)
        active, _ = self._active(sim, pos_mask, neg_mask)
        a = _f(active)
        total = tf.reduce_sum(a, axis=[1, 2])[:, None]
        cnt_p = tf.reduce_sum(a, axis=2)
        cnt_n = tf.reduce_sum(a, axis=1)
        count = tf.math.divide_no_nan(cnt_p + cnt_n, total)
        return {"pos": cnt_p > 0, "neg": cnt_n > 0, "count": count}

    def pair_loss(
        self,
        sim: tf.Tensor,
        pos_mask: tf.Tensor,
        neg_mask: tf.Tensor,
        pair_weights: tf.Tensor | None = None,
        **context,
    ) -> tf.Tensor:
        if pair_weights is not None:
            raise ValueError(
                f"{type(self).__name__}'s G-form has no per-pair weights "
                "(its terms are triplets); weight the selected pairs with "
                "`weighted(sim, sel, pair_weights)` (the W-form)."
            )
        active, viol = self._active(sim, pos_mask, neg_mask)
        a = _f(active)
        total = tf.reduce_sum(a, axis=[1, 2])
        return tf.math.divide_no_nan(
            tf.reduce_sum(tf.nn.relu(viol) * a, axis=[1, 2]), total
        )

    def weighted(
        self,
        sim: tf.Tensor,
        sel: Mapping[str, tf.Tensor],
        pair_weights: tf.Tensor,
    ) -> tf.Tensor:
        w = tf.cast(pair_weights, sim.dtype) * sel["count"]
        signed = (_f(sel["neg"]) - _f(sel["pos"])) * w * sim
        has = tf.reduce_any(tf.logical_or(sel["pos"], sel["neg"]), axis=1)
        return self.margin * _f(has) + tf.reduce_sum(signed, axis=1)

    def coefficients(
        self, sim: tf.Tensor, sel: Mapping[str, tf.Tensor]
    ) -> tf.Tensor:
        n = tf.cast(tf.shape(sim)[0], tf.float32)
        return (_f(sel["neg"]) - _f(sel["pos"])) * sel["count"] / n

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(margin=self.margin)
        return config


BASES = {
    "contrastive": MMSIContrastiveLoss,
    "multi_similarity": MMSIMultiSimilarityLoss,
    "ms": MMSIMultiSimilarityLoss,
    "triplet": MMSITripletLoss,
}


def get_base(spec):
    """An :class:`MMSIPairLoss` from an instance, a short name
    (``"contrastive" | "ms" | "multi_similarity" | "triplet"``) or a
    registry spec."""
    if isinstance(spec, MMSIPairLoss):
        return spec
    if isinstance(spec, str) and spec in BASES:
        return BASES[spec]()
    try:
        obj = registry.build(MMSIPairLoss, spec)
    except (TypeError, ValueError):
        obj = None
    if not isinstance(obj, MMSIPairLoss):
        raise ValueError(
            "`base_loss` must be an MMSIPairLoss, one of "
            f"{sorted(BASES)} or a registry spec; received base_loss={spec!r}."
        )
    return obj


def pair_masks(labels, ref_labels, ids=None, ref_ids=None, ref_valid=None):
    """Re-export of :func:`tfdml.ops.pair_masks` for the meta step."""
    return ops.pair_masks(labels, ref_labels, ids, ref_ids, ref_valid)
