"""Contrastive loss (Hadsell, Chopra and LeCun, "Dimensionality Reduction by
Learning an Invariant Mapping", CVPR 2006), in PML's margin form and in the
IAA code's similarity form.

Distance form (default; PML ``ContrastiveLoss``): with ``d`` the Euclidean
distance of L2-normalised embeddings (``d = sqrt(2 - 2 S)``)::

  pos pair loss = max(0, d_ij - pos_margin) ** power      (pos_margin = 0)
  neg pair loss = max(0, neg_margin - d_ik) ** power      (neg_margin = 1)

Similarity form (``form="similarity"``; IAA code ``losses.py``, the MMSI
contrastive with a positive margin)::

  pos pair loss = max(0, pos_margin - S_ij) ** power      (pos_margin = 0.8)
  neg pair loss = max(0, S_ik - neg_margin) ** power      (neg_margin = 0.5)

``power=2`` with ``pos_margin=0`` gives Hadsell et al.'s squared form.

Distances come from the cosine similarity (``d = sqrt(2 - 2 S)``), so they
assume unit-norm embeddings (``normalize=True``, the default).

How pair losses become an anchor's loss (``pair_reduction``; positives and
negatives are reduced separately and added, as PML does):

* ``"avg_nonzero"`` (distance-form default): mean over the anchor's pairs with
  a non-zero loss (PML's ``AvgNonZeroReducer`` applied per anchor);
* ``"sum"`` (similarity-form default): the sum over the anchor's pairs (the
  IAA code: ``(1/n) Σ_i [Σ_pos ... + Σ_neg ...]``);
* ``"mean"``: mean over all the anchor's pairs;
* ``"pml"``: PML's batch-level ``AvgNonZeroReducer`` exactly: each anchor
  gets ``B * (its pair-loss sum) / (non-zero pairs in the whole batch)``, so
  the mean over anchors equals PML's number.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy.typing as npt
import tensorflow as tf

from tfdml import ops
from tfdml import registry
from tfdml.losses.base import PairLoss
from tfdml.losses.base import References
from tfdml.losses.base import apply_pair_weights
from tfdml.losses.base import as_references
from tfdml.losses.base import check_inputs
from tfdml.losses.base import nan_if_not_finite
from tfdml.losses.base import unpack_references
from tfdml.validation import check_choice
from tfdml.validation import check_non_negative
from tfdml.validation import check_positive

PAIR_REDUCTIONS = ("avg_nonzero", "sum", "mean", "pml")
_DEFAULTS = {
    "distance": (0.0, 1.0, "avg_nonzero"),
    "similarity": (0.8, 0.5, "sum"),
}


def reduce_pairs(values, mask, mode):
    """Reduces ``[B, ...]`` pair (or triplet) losses to ``[B]``.

    ``mode`` is one of :data:`PAIR_REDUCTIONS` (see the module docstring).
    Entries outside ``mask`` never count.
    """
    mask = tf.cast(mask, tf.bool)
    values = tf.where(mask, values, tf.zeros_like(values))
    axes = list(range(1, values.shape.rank))
    total = tf.reduce_sum(values, axis=axes)
    if mode == "sum":
        return total
    if mode == "mean":
        count = tf.reduce_sum(tf.cast(mask, values.dtype), axis=axes)
        return tf.math.divide_no_nan(total, count)
    active = tf.stop_gradient(
        tf.cast(tf.logical_and(mask, values > 0), values.dtype)
    )
    if mode == "avg_nonzero":
        return tf.math.divide_no_nan(total, tf.reduce_sum(active, axis=axes))
    if mode == "pml":
        batch = tf.cast(tf.shape(values)[0], values.dtype)
        return tf.math.divide_no_nan(total * batch, tf.reduce_sum(active))
    raise ValueError(
        f"`pair_reduction` must be one of {PAIR_REDUCTIONS}; received "
        f"pair_reduction={mode!r}."
    )


def contrastive(
    sim: tf.Tensor,
    pos_mask: tf.Tensor,
    neg_mask: tf.Tensor,
    pair_weights: tf.Tensor | None = None,
    *,
    pos_margin: float,
    neg_margin: float,
    form: str = "distance",
    power: float = 1.0,
    pair_reduction: str = "avg_nonzero",
) -> tf.Tensor:
    """Per-anchor contrastive loss ``[B]`` from the pair contract.

    ``pair_weights`` multiply each pair's loss (weights on the loss term).
    """
    sim = tf.cast(sim, tf.float32)
    if form == "distance":
        dist = ops.distance_from_similarity(sim)
        pos = tf.nn.relu(dist - pos_margin)
        neg = tf.nn.relu(neg_margin - dist)
    else:
        pos = tf.nn.relu(pos_margin - sim)
        neg = tf.nn.relu(sim - neg_margin)
    if power != 1.0:
        pos = tf.pow(pos, power)
        neg = tf.pow(neg, power)
    pos = apply_pair_weights(pos, pair_weights)
    neg = apply_pair_weights(neg, pair_weights)
    return reduce_pairs(pos, pos_mask, pair_reduction) + reduce_pairs(
        neg, neg_mask, pair_reduction
    )


def _polarity(t, mask, power, mode):
    """One polarity of the fused path: ``(anchor loss [B], d loss / d t)``.

    The same values as ``reduce_pairs(relu(t) ** power, mask, mode)``, with
    ``mask`` a 0/1 float32 ``[B, M]`` (``ops.pair_masks(dtype=tf.float32)``);
    the reduction's divisors are counts, constant for the gradient.
    """
    v = tf.nn.relu(t)
    if power != 1.0:
        v = tf.pow(v, power)
    total = tf.reduce_sum(mask * v, axis=1)  # v is finite: 0 * v = 0
    if mode == "sum":
        loss, scale = total, 1.0
    elif mode == "mean":
        count = tf.reduce_sum(mask, axis=1)
        loss = tf.math.divide_no_nan(total, count)
        scale = tf.math.divide_no_nan(1.0, count)[:, None]
    else:
        active = mask * tf.cast(v > 0, tf.float32)
        if mode == "avg_nonzero":
            count = tf.reduce_sum(active, axis=1)
            loss = tf.math.divide_no_nan(total, count)
            scale = tf.math.divide_no_nan(1.0, count)[:, None]
        else:  # "pml"
            batch = tf.cast(tf.shape(t)[0], tf.float32)
            count = tf.reduce_sum(active)
            loss = tf.math.divide_no_nan(total * batch, count)
            scale = tf.math.divide_no_nan(batch, count)
    positive = mask * tf.cast(t > 0, tf.float32)
    if power == 1.0:
        slope = positive * scale
    else:
        safe_t = tf.where(t > 0, t, 1.0)
        slope = positive * (power * tf.pow(safe_t, power - 1.0)) * scale
    return loss, slope


@functools.lru_cache(maxsize=None)
def fused_forward(
    form, pos_margin, neg_margin, power, pair_reduction, jit=True
):
    """The forward of the fused contrastive path (XLA-compiled with ``jit``).

    ``(sim, labels, ref_labels, ids, ref_ids, ref_valid) -> (loss [B],
    coef [B, M])``: the pair masks, distances, both polarities and
    ``coef = d loss_i / d sim_ij`` in one compiled program (a few passes
    over ``[B, M]`` instead of some forty TensorFlow ops, forward and
    backward, each writing a ``[B, M]`` temporary).
    """

    def forward(sim, labels, ref_labels, ids, ref_ids, ref_valid):
        pos, neg = ops.pair_masks(
            labels, ref_labels, ids, ref_ids, ref_valid, dtype=tf.float32
        )
        if form == "distance":
            sq = 2.0 - 2.0 * sim
            # Float factors rather than selects (as the masks): 1.5 -> 1.0
            # ms at 512 x 512 on XLA's CPU code, the same values.
            ok = tf.cast(sq > ops.UNIT_DISTANCE_SQ_FLOOR, tf.float32)
            root = tf.sqrt(tf.maximum(sq, ops.UNIT_DISTANCE_SQ_FLOOR))
            dist = ok * root
            # d dist / d sim = -1 / dist (0 where dist is set to 0).
            dd = -ok / root
            t_pos, t_neg, dt_pos, dt_neg = (
                dist - pos_margin,
                neg_margin - dist,
                dd,
                -dd,
            )
        else:
            t_pos, t_neg, dt_pos, dt_neg = (
                pos_margin - sim,
                sim - neg_margin,
                -1.0,
                1.0,
            )
        loss_p, slope_p = _polarity(t_pos, pos, power, pair_reduction)
        loss_n, slope_n = _polarity(t_neg, neg, power, pair_reduction)
        return loss_p + loss_n, slope_p * dt_pos + slope_n * dt_neg

    return tf.function(forward, jit_compile=True) if jit else forward


# Below this many pairs (B x M) the XLA launch costs more than the fusion
# saves (CPU, TF 2.20: B = M = 128 is ~0.15 ms slower with XLA, B = M = 512
# ~30% faster).
JIT_MIN_PAIRS = 256 * 256


def choose_jit(sim, compiled, plain, args):
    """``compiled(sim, *args)`` for large ``sim``, ``plain`` for small ones
    (statically when the shape is known, else with a ``tf.cond``)."""
    b, m = sim.shape
    if b is not None and m is not None:
        fn = compiled if b * m >= JIT_MIN_PAIRS else plain
        return fn(sim, *args)
    shape = tf.shape(sim)
    return tf.cond(
        shape[0] * shape[1] >= JIT_MIN_PAIRS,
        lambda: compiled(sim, *args),
        lambda: plain(sim, *args),
    )


@registry.register
class ContrastiveLoss(PairLoss):
    """Contrastive loss on distances (PML) or similarities (IAA / MMSI code).

    Args:
      pos_margin: distance form: positives contribute above this distance
        (default 0); similarity form: below this similarity (default 0.8).
      neg_margin: distance form: negatives contribute below this distance
        (default 1); similarity form: above this similarity (default 0.5).
      form: ``"distance"`` (Euclidean distance of L2-normalised embeddings,
        PML's default) or ``"similarity"`` (cosine, the IAA code form).
      power: each pair loss is raised to this power (PML ``power``; 2 gives
        Hadsell et al.'s squared loss). Default 1.
      pair_reduction: ``"avg_nonzero"`` | ``"sum"`` | ``"mean"`` | ``"pml"``
        (see the module docstring); default ``"avg_nonzero"`` in distance
        form and ``"sum"`` in similarity form.
      **kwargs: passed to :class:`tfdml.losses.PairLoss`.

    Example::

      model.compile(optimizer="adam", loss=tfdml.losses.ContrastiveLoss())

    Reference: Hadsell et al., CVPR 2006; PML ``ContrastiveLoss``.
    """

    def __init__(
        self,
        pos_margin: float | None = None,
        neg_margin: float | None = None,
        form: str = "distance",
        power: float = 1.0,
        pair_reduction: str | None = None,
        name: str = "contrastive_loss",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        # False: always the generic path (pair_loss on the pair contract).
        self.fused = True
        self.form = check_choice("form", form, _DEFAULTS)
        pos_default, neg_default, red_default = _DEFAULTS[form]
        if pos_margin is None:
            pos_margin = pos_default
        if neg_margin is None:
            neg_margin = neg_default
        if form == "distance":
            self.pos_margin = check_non_negative("pos_margin", pos_margin)
            self.neg_margin = check_non_negative("neg_margin", neg_margin)
        else:
            self.pos_margin = _check_similarity("pos_margin", pos_margin)
            self.neg_margin = _check_similarity("neg_margin", neg_margin)
        self.power = check_positive("power", power)
        self.pair_reduction = check_choice(
            "pair_reduction",
            red_default if pair_reduction is None else pair_reduction,
            PAIR_REDUCTIONS,
        )

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
        """As :meth:`PairLoss.per_anchor`; without a miner and pair weights
        (and with the stock similarity and pair loss) it takes the fused
        path: one XLA program for masks, loss and ``d loss / d sim``
        (:func:`fused_forward`) and a custom gradient of one matmul per
        input (:func:`tfdml.ops.similarity_loss`). The values are those of
        :func:`contrastive`; the gradient is first-order only."""
        refs, ids, pair_weights = as_references(
            refs, ids, context, pair_weights, legacy
        )
        ref_embeddings, ref_labels, ref_ids, ref_valid = unpack_references(refs)
        cls = type(self)
        if (
            not self.fused
            or self.miner is not None
            or pair_weights is not None
            or relevance is not None
            or self.relevance is not None
            or cls.pair_loss is not ContrastiveLoss.pair_loss
            or cls.similarity is not PairLoss.similarity
        ):
            return super().per_anchor(
                embeddings,
                labels,
                refs,
                ids,
                pair_weights=pair_weights,
                relevance=relevance,
                **context,
            )
        embeddings, labels, ref_embeddings, ref_labels = check_inputs(
            embeddings, labels, ref_embeddings, ref_labels
        )
        ref_labels, ids, ref_ids, ref_valid = ops.default_ids(
            labels, ref_labels, ids, ref_ids, ref_valid
        )
        config = (
            self.form,
            self.pos_margin,
            self.neg_margin,
            self.power,
            self.pair_reduction,
        )
        compiled = fused_forward(*config)
        plain = fused_forward(*config, jit=False)
        args = (labels, ref_labels, ids, ref_ids, ref_valid)

        def fwd(sim):
            return choose_jit(sim, compiled, plain, args)

        a = _unit(embeddings, self.normalize)
        b = (
            None
            if ref_embeddings is None
            else _unit(ref_embeddings, self.normalize)
        )
        loss = ops.similarity_loss(a, b, fwd)
        return nan_if_not_finite(loss, embeddings, ref_embeddings)

    def pair_loss(
        self,
        sim: tf.Tensor,
        pos_mask: tf.Tensor,
        neg_mask: tf.Tensor,
        pair_weights: tf.Tensor | None = None,
        **context,
    ) -> tf.Tensor:
        return contrastive(
            sim,
            pos_mask,
            neg_mask,
            pair_weights,
            pos_margin=self.pos_margin,
            neg_margin=self.neg_margin,
            form=self.form,
            power=self.power,
            pair_reduction=self.pair_reduction,
        )

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            pos_margin=self.pos_margin,
            neg_margin=self.neg_margin,
            form=self.form,
            power=self.power,
            pair_reduction=self.pair_reduction,
        )
        return config


def _unit(x, normalize):
    return ops.l2_normalize(x) if normalize else tf.cast(x, tf.float32)


def _check_similarity(name, value):
    # A cosine margin lives in [-1, 1]; a negative margin is still rejected,
    # as for every tfdml margin.
    value = check_non_negative(name, value)
    if value > 1.0:
        raise ValueError(
            f"`{name}` must be in [0, 1] in similarity form; received "
            f"{name}={value!r}."
        )
    return value
