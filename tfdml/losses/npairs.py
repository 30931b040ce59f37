"""N-pair loss (Sohn, "Improved Deep Metric Learning with Multi-class N-pair
Loss Objective", NeurIPS 2016, Eq. 3 and Sec. 3.2), read on a labelled batch.

Sohn's batch holds one (anchor, positive) pair per class, and the negatives
of an anchor are the positives of the other classes. On a P x K batch (or a
reference set with a memory) tfdml reads this as: for every anchor ``i``,

* its positive ``p(i)`` is its first positive reference (lowest index);
* its negatives are **one reference per other class**: the first valid
  reference of each class (lowest index);
* ``L_i = log(1 + Σ_{c ≠ y_i} exp(S_{i, r(c)} - S_{i, p(i)}))``,

i.e. the softmax cross-entropy of the (N+1)-tuple. An anchor without a
positive contributes 0; one without negatives gives ``log(1) = 0``. A miner,
if given, narrows the masks first.

Similarity: cosine (``normalize=True``, the PairLoss default). Sohn uses
inner products of unnormalised embeddings plus an L2 penalty on them: use
``normalize=False`` and add the penalty as a Keras regulariser for that.
"""

from __future__ import annotations

import numpy.typing as npt
import tensorflow as tf

from tfdml import ops
from tfdml import registry
from tfdml.losses.base import PairLoss
from tfdml.losses.base import References
from tfdml.losses.base import as_references
from tfdml.losses.base import check_labels
from tfdml.losses.base import unpack_references
from tfdml.mining.hardest import first_one_hot


def first_of_each_class(labels, valid=None):
    """``[M]`` bool: True at the first valid index of each label value
    (of each distinct label set for multi-hot labels ``[M, C]``)."""
    labels = tf.cast(labels, tf.int32)
    if valid is None:
        valid = tf.ones(tf.shape(labels)[:1], dtype=tf.bool)
    valid = tf.cast(valid, tf.bool)
    if labels.shape.rank == 2:
        x = tf.cast(labels, tf.float32)
        shared = tf.matmul(x, x, transpose_b=True)
        size = tf.reduce_sum(x, axis=1)
        same = tf.equal(shared, size[:, None]) & tf.equal(shared, size[None])
        idx = tf.range(tf.shape(labels)[0])
        earlier = (idx[None, :] < idx[:, None]) & valid[None, :]
        return valid & ~tf.reduce_any(same & earlier, axis=1)
    key = tf.where(valid, labels, tf.fill(tf.shape(labels), labels.dtype.max))
    order = tf.argsort(key, stable=True)
    sorted_key = tf.gather(key, order)
    sorted_valid = tf.gather(valid, order)
    is_first = tf.concat(
        [tf.ones([1], tf.bool), tf.not_equal(sorted_key[1:], sorted_key[:-1])],
        axis=0,
    )
    is_first = tf.logical_and(is_first, sorted_valid)
    return tf.gather(is_first, tf.math.invert_permutation(order))


def npairs(
    sim: tf.Tensor,
    pos_mask: tf.Tensor,
    neg_mask: tf.Tensor,
    pair_weights: tf.Tensor | None = None,
    *,
    representative: tf.Tensor | None = None,
) -> tf.Tensor:
    """Per-anchor N-pair loss ``[B]``.

    Args:
      sim: ``[B, M]`` similarity.
      pos_mask, neg_mask: ``[B, M]`` bool.
      pair_weights: optional ``[B, M]`` weights on each negative's term.
      representative: optional ``[M]`` bool, the references that stand for
        their class (see :func:`first_of_each_class`); default: all.
    """
    sim = tf.cast(sim, tf.float32)
    pos_mask = tf.cast(pos_mask, tf.bool)
    neg_mask = tf.cast(neg_mask, tf.bool)
    if representative is not None:
        neg_mask = tf.logical_and(neg_mask, representative[None, :])
    first_pos = first_one_hot(pos_mask)
    s_pos = tf.reduce_sum(tf.where(first_pos, sim, tf.zeros_like(sim)), axis=1)
    logits = sim - s_pos[:, None]
    if pair_weights is not None:
        w = tf.cast(pair_weights, tf.float32)
        logits = logits + tf.math.log(tf.maximum(w, 1e-30))
        neg_mask = tf.logical_and(neg_mask, w > 0)
    loss = ops.masked_logsumexp(logits, neg_mask, add_one=True)
    has_pos = tf.reduce_any(pos_mask, axis=1)
    return tf.where(has_pos, loss, tf.zeros_like(loss))


@registry.register
class NPairsLoss(PairLoss):
    """Multi-class N-pair loss on a labelled batch (Sohn 2016).

    Args:
      **kwargs: passed to :class:`tfdml.losses.PairLoss` (``miner``,
        ``normalize``, ``name``, ``reduction``).

    Example::

      model.compile(optimizer="adam", loss=tfdml.losses.NPairsLoss())

    Reference: Sohn, NeurIPS 2016, Eq. 3. For tfa's ``npairs_loss`` (which
    takes a similarity matrix) see :class:`tfdml.losses.NpairsLoss`.
    """

    def __init__(self, name: str = "npairs_loss", **kwargs):
        super().__init__(name=name, **kwargs)

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
        if relevance is not None or self.relevance is not None:
            raise ValueError(
                f"{type(self).__name__} takes one positive per class (the "
                "first reference of each label); a relevance matrix or "
                "function does not define one. Use labels (class ids or "
                "multi-hot rows), or another pair loss."
            )
        refs, ids, pair_weights = as_references(
            refs, ids, context, pair_weights, legacy
        )
        ref_embeddings, ref_labels, ref_ids, ref_valid = unpack_references(refs)
        labels_c, emb_c = check_labels(labels, embeddings)
        if ref_embeddings is None:
            ref_labels_c = labels_c
        else:
            ref_labels_c, _ = check_labels(
                ref_labels, ref_embeddings, name="ref_labels"
            )
        context["representative"] = first_of_each_class(ref_labels_c, ref_valid)
        return super().per_anchor(
            emb_c, labels_c, refs, ids, pair_weights=pair_weights, **context
        )

    def pair_loss(
        self,
        sim: tf.Tensor,
        pos_mask: tf.Tensor,
        neg_mask: tf.Tensor,
        pair_weights: tf.Tensor | None = None,
        representative: tf.Tensor | None = None,
        **context,
    ) -> tf.Tensor:
        return npairs(
            sim, pos_mask, neg_mask, pair_weights, representative=representative
        )
