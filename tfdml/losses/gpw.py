"""General Pair Weighting loss: mining + weighting of pair distances.

Liu, Cheng, Wang and Su, "The General Pair-based Weighting Loss for Deep
Metric Learning", arXiv 1905.12837, built on the General Pair Weighting
framework of the MS paper (Wang et al., CVPR 2019, §3). tfdml's reading
(only the paper's abstract could be read; docs/losses.md,
"GeneralPairWeightingLoss")::

  L = (1/B) Σ_i [ Σ_{j∈P̂_i} sg(w+_ij) D_ij - Σ_{k∈N̂_i} sg(w-_ik) D_ik ]

``P̂, N̂`` come from a pluggable :class:`tfdml.mining.Miner`, ``w±`` from a
pluggable :class:`tfdml.weighting.Weighting` and ``D`` is ``1 - S``
(``distance="cosine"``) or the Euclidean distance of L2-normalised
embeddings ``sqrt(2 - 2 S)`` (``"euclidean"``). Weights defined in another
space are converted with the chain rule (``dS/dD = -D`` for Euclidean), so a
weighting that returns ``|∂L/∂S|`` of a loss ``L`` gives a surrogate with
**the same gradient as L** w.r.t. the embeddings.

**Values differ, gradients match.** The presets
:meth:`GeneralPairWeightingLoss.multi_similarity`,
:meth:`~GeneralPairWeightingLoss.contrastive`,
:meth:`~GeneralPairWeightingLoss.binomial` and
:meth:`~GeneralPairWeightingLoss.lifted` reproduce the gradients of
:class:`MultiSimilarityLoss`, :class:`ContrastiveLoss` (power 1),
:class:`BinomialDevianceLoss` and :class:`LiftedStructureLoss`
(``form="generalized"``); the loss value is a weighted distance sum, not the
original loss (it can be negative).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import tensorflow as tf

from tfdml import ops
from tfdml import registry
from tfdml import weighting as weighting_lib
from tfdml.losses.base import PairLoss
from tfdml.mining.base import Miner
from tfdml.mining.basic import ThresholdMiner
from tfdml.mining.multi_similarity import MultiSimilarityMiner
from tfdml.validation import check_choice
from tfdml.weighting.base import Weighting
from tfdml.weighting.basic import ConstantWeighting
from tfdml.weighting.binomial import BinomialWeighting
from tfdml.weighting.lifted import LiftedWeighting
from tfdml.weighting.multi_similarity import MultiSimilarityWeighting

DISTANCES = ("cosine", "euclidean")


def convert_weights(w, dist, source, target):
    """Maps weights ``|∂L/∂·|`` from one space to another (chain rule).

    Spaces: ``"similarity"`` (S), ``"cosine"`` (1 - S, same weights as S)
    and ``"distance"``/``"euclidean"`` (``d = sqrt(2 - 2 S)``, ``dS/dd =
    -d``). ``dist`` is the Euclidean distance ``[B, M]``.
    """
    to_s = {"similarity": "s", "cosine": "s", "distance": "e", "euclidean": "e"}
    source, target = to_s[source], to_s[target]
    if source == target:
        return w
    if source == "s":  # |dL/dd| = |dL/dS| * d
        return w * dist
    return tf.math.divide_no_nan(w, dist)  # |dL/dS| = |dL/dd| / d


def general_pair_weighting(
    sim: tf.Tensor,
    pos_mask: tf.Tensor,
    neg_mask: tf.Tensor,
    w_pos: tf.Tensor,
    w_neg: tf.Tensor,
    *,
    distance: str = "cosine",
) -> tf.Tensor:
    """Per-anchor GPW surrogate ``[B]`` for given (already stopped) weights
    expressed in the space of ``distance``."""
    sim = tf.cast(sim, tf.float32)
    if distance == "cosine":
        dist = 1.0 - sim
    else:
        dist = ops.distance_from_similarity(sim)
    w_pos = tf.where(pos_mask, tf.stop_gradient(w_pos), 0.0)
    w_neg = tf.where(neg_mask, tf.stop_gradient(w_neg), 0.0)
    return tf.reduce_sum(w_pos * dist, axis=1) - tf.reduce_sum(
        w_neg * dist, axis=1
    )


@registry.register
class GeneralPairWeightingLoss(PairLoss):
    """Mined, weighted pair distances whose gradient is the pair loss's.

    Args:
      miner: a :class:`tfdml.mining.Miner` (instance, name or spec); None
        keeps every pair.
      weighting: a :class:`tfdml.weighting.Weighting` (instance, name or
        spec); default ``ConstantWeighting()``.
      distance: ``"cosine"`` (``1 - S``, default) or ``"euclidean"``.
      **kwargs: passed to :class:`tfdml.losses.PairLoss`.

    ``pair_weights`` (MMSI) multiply the weights. ``context`` (e.g.
    ``probs``) is passed to the weighting.

    Example::

      loss = GeneralPairWeightingLoss.multi_similarity()   # MS gradient
      loss = GeneralPairWeightingLoss(
          miner="MultiSimilarityMiner", weighting="BinomialWeighting")

    The surrogate's *value* differs from the loss it mimics; only the
    gradients match (see the module docstring).
    """

    def __init__(
        self,
        miner: Miner | str | Mapping[str, Any] | None = None,
        weighting: Weighting | str | Mapping[str, Any] | None = None,
        distance: str = "cosine",
        name: str = "general_pair_weighting_loss",
        **kwargs,
    ):
        super().__init__(miner=miner, name=name, **kwargs)
        if weighting is None:
            weighting = ConstantWeighting()
        if isinstance(weighting, dict) and "class_name" in weighting:
            weighting = keras.saving.deserialize_keras_object(weighting)
        self.weighting = weighting_lib.get(weighting)
        self.distance = check_choice("distance", distance, DISTANCES)

    def pair_loss(
        self,
        sim: tf.Tensor,
        pos_mask: tf.Tensor,
        neg_mask: tf.Tensor,
        pair_weights: tf.Tensor | None = None,
        **context,
    ) -> tf.Tensor:
        sim = tf.cast(sim, tf.float32)
        pos_mask = tf.cast(pos_mask, tf.bool)
        neg_mask = tf.cast(neg_mask, tf.bool)
        w_pos, w_neg = self.weighting(sim, pos_mask, neg_mask, **context)
        dist = tf.stop_gradient(ops.distance_from_similarity(sim))
        space = getattr(self.weighting, "space", "similarity")
        w_pos = convert_weights(w_pos, dist, space, self.distance)
        w_neg = convert_weights(w_neg, dist, space, self.distance)
        if pair_weights is not None:
            pw = tf.stop_gradient(tf.cast(pair_weights, tf.float32))
            w_pos, w_neg = w_pos * pw, w_neg * pw
        return general_pair_weighting(
            sim, pos_mask, neg_mask, w_pos, w_neg, distance=self.distance
        )

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            weighting=keras.saving.serialize_keras_object(self.weighting),
            distance=self.distance,
        )
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> GeneralPairWeightingLoss:
        config = dict(config)
        if isinstance(config.get("weighting"), dict):
            config["weighting"] = keras.saving.deserialize_keras_object(
                config["weighting"]
            )
        return super().from_config(config)

    # -- presets -------------------------------------------------------------
    @classmethod
    def multi_similarity(
        cls,
        alpha: float = 2.0,
        beta: float = 40.0,
        base: float = 0.5,
        epsilon: float = 0.1,
        coefficient: float = 1.0,
        distance: str = "cosine",
        **kwargs,
    ) -> GeneralPairWeightingLoss:
        """Gradient of :class:`tfdml.losses.MultiSimilarityLoss` (same
        arguments; ``epsilon=None`` disables mining as there)."""
        miner = MultiSimilarityMiner(
            epsilon=1e9 if epsilon is None else epsilon
        )
        weighting = MultiSimilarityWeighting(alpha, beta, base, coefficient)
        return cls(
            miner=miner, weighting=weighting, distance=distance, **kwargs
        )

    @classmethod
    def contrastive(
        cls,
        pos_margin: float | None = None,
        neg_margin: float | None = None,
        form: str = "distance",
        pair_reduction: str | None = None,
        **kwargs,
    ) -> GeneralPairWeightingLoss:
        """Gradient of :class:`tfdml.losses.ContrastiveLoss` with
        ``power=1`` and ``pair_reduction`` ``"avg_nonzero"`` or ``"sum"``
        (defaults as there: distance form 0 / 1 / avg_nonzero, similarity
        form 0.8 / 0.5 / sum)."""
        defaults = {
            "distance": (0.0, 1.0, "avg_nonzero"),
            "similarity": (0.8, 0.5, "sum"),
        }
        check_choice("form", form, defaults)
        pos_d, neg_d, red_d = defaults[form]
        pos_margin = pos_d if pos_margin is None else float(pos_margin)
        neg_margin = neg_d if neg_margin is None else float(neg_margin)
        pair_reduction = red_d if pair_reduction is None else pair_reduction
        check_choice("pair_reduction", pair_reduction, ("avg_nonzero", "sum"))
        miner = ThresholdMiner(pos_margin, neg_margin, form=form)
        weighting = ConstantWeighting(
            reduction="avg" if pair_reduction == "avg_nonzero" else "sum",
            space="distance" if form == "distance" else "similarity",
        )
        distance = "euclidean" if form == "distance" else "cosine"
        return cls(
            miner=miner, weighting=weighting, distance=distance, **kwargs
        )

    @classmethod
    def binomial(
        cls,
        alpha: float = 2.0,
        beta: float = 0.5,
        cost: float = 25.0,
        pair_reduction: str = "mean",
        distance: str = "cosine",
        **kwargs,
    ) -> GeneralPairWeightingLoss:
        """Gradient of :class:`tfdml.losses.BinomialDevianceLoss`."""
        weighting = BinomialWeighting(alpha, beta, cost, pair_reduction)
        return cls(weighting=weighting, distance=distance, **kwargs)

    @classmethod
    def lifted(
        cls, neg_margin: float = 1.0, pos_margin: float = 0.0, **kwargs
    ) -> GeneralPairWeightingLoss:
        """Gradient of ``LiftedStructureLoss(form="generalized")``."""
        weighting = LiftedWeighting(neg_margin, pos_margin)
        kwargs.setdefault("distance", "euclidean")
        return cls(weighting=weighting, **kwargs)

    @classmethod
    def from_preset(cls, preset: str, **kwargs) -> GeneralPairWeightingLoss:
        """``preset`` in ``{"multi_similarity", "contrastive", "binomial",
        "lifted"}``; ``kwargs`` go to that preset."""
        presets = ("multi_similarity", "contrastive", "binomial", "lifted")
        check_choice("preset", preset, presets)
        return getattr(cls, preset)(**kwargs)
