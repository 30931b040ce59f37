"""Supervised contrastive (SupCon) and NT-Xent losses on the pair contract.

**SupCon** (Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020,
arXiv 2004.11362, Eq. 2, the ``L_out`` form). With ``z_ij = S_ij / τ``,
``P_i`` the anchor's positives and ``A_i = P_i ∪ N_i`` every valid
reference that is not the anchor itself::

  L_i = -1/|P_i| Σ_{p ∈ P_i} log( exp(z_ip) / Σ_{a ∈ A_i} exp(z_ia) )

Default ``τ = 0.1`` (the paper's). The other positives are in the
denominator (``A_i``), as in the paper.

**NT-Xent** (Chen et al., "A Simple Framework for Contrastive Learning of
Visual Representations" (SimCLR), ICML 2020, Eq. 1), read on labels as
pytorch-metric-learning's ``NTXentLoss`` reads it: every same-label pair is a
positive pair, and each positive pair's softmax has that positive against
the anchor's negatives only::

  l_ip = -log( exp(z_ip) / (exp(z_ip) + Σ_{n ∈ N_i} exp(z_in)) )
  L_i  = 1/|P_i| Σ_{p ∈ P_i} l_ip

Default ``τ = 0.5`` (SimCLR's ablation default; PML 2.9 defaults to 0.07).
With one positive per anchor (SimCLR's two views) the two losses differ only
in their temperature.

**Anchors without positives** contribute 0. With
``exclude_anchors_without_positives=True`` (the default) each anchor's value
is scaled by ``B / (number of anchors with a positive)``, so the mean over
the batch (Keras' reduction, the memory bank's) is the mean over the anchors
that have a positive; ``reduction=None`` then returns the scaled values. The
SupCon paper's batches give every anchor a positive (each image has an
augmented view); pytorch-metric-learning 2.9 averages SupCon over anchors
with a non-zero loss (``AvgNonZeroReducer``: the same set unless a loss is
exactly 0) and NT-Xent over all positive *pairs*, which weights an anchor by
its number of positives (the same number as here when every anchor has the
same number of positives, e.g. P x K batches). PML also returns 0 for the
whole batch when it has no negative pair at all (one class); here the
equations apply as written (SupCon: ``log Σ_P exp(z) - mean_P z >= 0``;
NT-Xent: 0).

**Pair weights** (``pair_weights [B, M]``) multiply each reference's
``exp`` term in the denominators and each positive's term ``l_ip`` in the
mean over positives (``|P_i|`` counts the positives with a non-zero weight);
a pair with weight 0 is left out. All-ones weights give the plain loss.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from tfdml import ops
from tfdml import registry
from tfdml.losses.base import PairLoss
from tfdml.validation import check_positive


def _weighted(z, pos_mask, neg_mask, pair_weights):
    """Logits with ``log w`` added and masks narrowed to ``w > 0``."""
    pos_mask = tf.cast(pos_mask, tf.bool)
    neg_mask = tf.cast(neg_mask, tf.bool)
    if pair_weights is None:
        return z, z, pos_mask, neg_mask, None
    w = tf.cast(pair_weights, z.dtype)
    keep = w > 0
    z_w = z + tf.math.log(tf.maximum(w, 1e-30))
    return z, z_w, pos_mask & keep, neg_mask & keep, w


def _anchor_mean(terms, pos_mask, w, exclude):
    """Mean of ``terms`` over each anchor's positives (weighted), then the
    anchors-with-positives scaling."""
    if w is not None:
        terms = terms * w
    terms = tf.where(pos_mask, terms, tf.zeros_like(terms))
    count = tf.reduce_sum(tf.cast(pos_mask, terms.dtype), axis=1)
    loss = tf.math.divide_no_nan(tf.reduce_sum(terms, axis=1), count)
    if exclude:
        batch = tf.cast(tf.shape(loss)[0], loss.dtype)
        valid = tf.reduce_sum(tf.cast(count > 0, loss.dtype))
        loss = loss * tf.math.divide_no_nan(batch, valid)
    return loss


def supcon(
    sim: tf.Tensor,
    pos_mask: tf.Tensor,
    neg_mask: tf.Tensor,
    pair_weights: tf.Tensor | None = None,
    *,
    temperature: float = 0.1,
    exclude_anchors_without_positives: bool = True,
) -> tf.Tensor:
    """Per-anchor SupCon loss ``[B]`` (``L_out``, see the module docstring)."""
    sim = tf.cast(sim, tf.float32)
    z, z_w, pos, neg, w = _weighted(
        sim / temperature, pos_mask, neg_mask, pair_weights
    )
    lse = ops.masked_logsumexp(z_w, pos | neg)
    terms = lse[:, None] - z
    return _anchor_mean(terms, pos, w, exclude_anchors_without_positives)


def nt_xent(
    sim: tf.Tensor,
    pos_mask: tf.Tensor,
    neg_mask: tf.Tensor,
    pair_weights: tf.Tensor | None = None,
    *,
    temperature: float = 0.5,
    exclude_anchors_without_positives: bool = True,
) -> tf.Tensor:
    """Per-anchor NT-Xent loss ``[B]`` (see the module docstring)."""
    sim = tf.cast(sim, tf.float32)
    z, z_w, pos, neg, w = _weighted(
        sim / temperature, pos_mask, neg_mask, pair_weights
    )
    # l_ip = log(1 + Σ_N exp(z_in - z_ip)) = softplus(lse_N - z_ip); an
    # anchor without negatives has lse_N = NEG_INF, so l_ip = 0.
    lse_neg = ops.masked_logsumexp(z_w, neg)
    terms = tf.nn.softplus(lse_neg[:, None] - z)
    return _anchor_mean(terms, pos, w, exclude_anchors_without_positives)


class _TemperatureLoss(PairLoss):
    _function = None

    def __init__(
        self,
        temperature,
        exclude_anchors_without_positives=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.temperature = check_positive("temperature", temperature)
        self.exclude_anchors_without_positives = bool(
            exclude_anchors_without_positives
        )

    def pair_loss(
        self,
        sim: tf.Tensor,
        pos_mask: tf.Tensor,
        neg_mask: tf.Tensor,
        pair_weights: tf.Tensor | None = None,
        **context,
    ) -> tf.Tensor:
        return type(self)._function(
            sim,
            pos_mask,
            neg_mask,
            pair_weights,
            temperature=self.temperature,
            exclude_anchors_without_positives=(
                self.exclude_anchors_without_positives
            ),
        )

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            temperature=self.temperature,
            exclude_anchors_without_positives=(
                self.exclude_anchors_without_positives
            ),
        )
        return config


@registry.register
class SupConLoss(_TemperatureLoss):
    """Supervised contrastive loss, ``L_out`` (Khosla et al., NeurIPS 2020).

    Args:
      temperature: τ, default 0.1 (the paper's).
      exclude_anchors_without_positives: average over the anchors that have
        a positive (default; see :mod:`tfdml.losses.supcon`) rather than
        over the batch.
      **kwargs: passed to :class:`tfdml.losses.PairLoss` (``miner``,
        ``normalize``, ``name``, ``reduction``).

    Example::

      model.compile(optimizer="adam", loss=tfdml.losses.SupConLoss())
    """

    _function = staticmethod(supcon)

    def __init__(
        self,
        temperature: float = 0.1,
        exclude_anchors_without_positives: bool = True,
        name: str = "supcon_loss",
        **kwargs,
    ):
        super().__init__(
            temperature,
            exclude_anchors_without_positives,
            name=name,
            **kwargs,
        )


@registry.register
class NTXentLoss(_TemperatureLoss):
    """NT-Xent (SimCLR, Chen et al., ICML 2020) with same-label positives.

    Args:
      temperature: τ, default 0.5.
      exclude_anchors_without_positives: as for :class:`SupConLoss`.
      **kwargs: passed to :class:`tfdml.losses.PairLoss`.

    Example::

      model.compile(optimizer="adam", loss=tfdml.losses.NTXentLoss())
    """

    _function = staticmethod(nt_xent)

    def __init__(
        self,
        temperature: float = 0.5,
        exclude_anchors_without_positives: bool = True,
        name: str = "nt_xent_loss",
        **kwargs,
    ):
        super().__init__(
            temperature,
            exclude_anchors_without_positives,
            name=name,
            **kwargs,
        )
