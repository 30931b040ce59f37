"""Cross-batch memory (XBM): a fixed-size ring buffer of past embeddings.

Wang, Zhang, Huang and Scott, "Cross-Batch Memory for Embedding Learning",
CVPR 2020 (arXiv 1912.06798). The memory keeps the embeddings, labels and
example ids of the last ``size`` training examples; the loss then uses
``references = batch + valid memory slots`` (self-pairs excluded by id, see
:func:`tfdml.ops.pair_masks`).

Everything lives in non-trainable variables updated inside the compiled
train step (eager, ``tf.function`` and XLA alike), so the memory is saved
with checkpoints and restored on resume.

Distributed use (``tf.distribute.MirroredStrategy`` and
``MultiWorkerMirroredStrategy``): create the memory under
``strategy.scope()``. Its variables use ``synchronization="on_write"`` and
``aggregation="only_first_replica"``, so every write takes replica 0's value
and all replicas hold identical copies. :meth:`CrossBatchMemory.enqueue`
must therefore be given the **all-gathered** global batch
(``ReplicaContext.all_gather``; :class:`tfdml.models.DMLModel` does this);
given only the local batch, the other replicas' rows would be silently lost.

``start_after`` follows the official code's ``START_ITERATION``: during the
first ``start_after`` steps the memory is neither filled nor read.

How the memory enters the loss (``memory_weight`` ``w``, ``memory_reduction``;
``L(refs)`` is the compiled pair loss per anchor against ``refs``):

* ``"sum"``: ``L(batch) + w * L(memory)``, the official code's
  ``criterion(f, y, f, y) + XBM.WEIGHT * criterion(f, y, xbm_f, xbm_y)``
  (``engine/trainer.py``). For a summed pair loss (contrastive with
  ``pair_reduction="sum"``, XBM's own) and ``w = 1`` this is exactly one loss
  over ``batch + memory``.
* ``"avg_nonzero"``: ``L(batch) + w * L'(memory)`` where ``L'`` is the same
  loss with ``pair_reduction="avg_nonzero"``: for contrastive, the memory
  positives and the memory negatives of an anchor are each averaged over
  their non-zero pair losses (PML's ``CrossBatchMemory`` with its
  ``AvgNonZeroReducer``, per anchor). Needs a loss with a ``pair_reduction``
  that accepts ``"avg_nonzero"`` (``ContrastiveLoss``, ``TripletMarginLoss``).
* ``"joint"``: one loss over ``batch + memory`` (tfdml before this option;
  PML's arrangement for log-sum-exp losses such as multi-similarity);
  ``w`` must be 1.
* ``"auto"`` (default): ``"avg_nonzero"`` when the loss supports it, else
  ``"joint"`` (``"sum"`` when ``w != 1``).

Why the default averages: with a summed loss and ``M >> B`` an anchor has
hundreds of active memory negatives against a handful of positives; their
gradient dominates and the cheapest descent moves every embedding away from
its (frozen) stored copy, so the memory goes stale faster than it fills
(measured in ``docs/training_methods.md``). Averaging each polarity keeps the
memory term the size of one batch term whatever ``M``. Log-sum-exp losses
(multi-similarity, circle, lifted) already bound the total weight of an
anchor's negatives, so ``"auto"`` leaves them joint.

Drift (``drift``): given stable example keys (``DMLModel`` takes them from
``y = {"labels": ..., "example_ids": ...}``), the memory stores them next to
the rows and reports the mean cosine between a batch embedding and its own
stored copies (``xbm_drift`` in the fit logs). XBM assumes this stays near 1.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import keras
import numpy as np
import numpy.typing as npt
import tensorflow as tf

from tfdml import ops
from tfdml import registry
from tfdml.losses.base import PairLoss
from tfdml.losses.base import References
from tfdml.validation import check_choice
from tfdml.validation import check_int
from tfdml.variables import state_variable

MEMORY_REDUCTIONS = ("auto", "avg_nonzero", "sum", "joint")


@registry.register
class CrossBatchMemory(keras.layers.Layer):
    """XBM ring buffer of ``size`` embeddings of dimension ``dim``.

    Args:
      size: number of slots ``M``.
      dim: embedding dimension ``d``.
      start_after: number of initial training steps (enqueue calls) during
        which the memory stays empty and is not read (XBM's warm-up).
      memory_weight: weight ``w`` of the memory term (the official
        ``XBM.WEIGHT``, default 1): ``loss = L(batch) + w * L(memory)``.
      memory_reduction: ``"auto"`` (default) | ``"avg_nonzero"`` | ``"sum"``
        | ``"joint"``; how the memory term is reduced (module docstring).
      multi_hot_classes: None (default: one int class id per row), or
        ``C > 1``: the memory stores multi-hot label rows ``[C]`` (0/1;
        relevance: the label sets intersect, :func:`tfdml.ops.relevance`)
        and takes only multi-hot ``[n, C]`` labels.
      normalize: store L2-normalised rows (as the official XBM, which
        enqueues normalised features). With a loss that normalises its
        inputs (``normalize=True``, every tfdml pair loss's default) the
        loss is unchanged (to float32 rounding) and the memory term no
        longer re-normalises the ``M`` stored rows at every step: it
        normalises the ``B`` anchors and runs the loss with
        ``normalize=False`` on them and the stored unit rows (``"joint"``
        reduction excepted). Default False (rows stored as given).
      **kwargs: passed to ``keras.layers.Layer`` (``name``).

    Variables (all non-trainable): ``embeddings [M, d]`` float32,
    ``labels [M]`` int32 (``-1`` when empty; with ``multi_hot_classes=C``:
    ``[M, C]`` int32 0/1, all 0 when empty), ``ids [M]`` int32, ``keys [M]``
    int32 (stable example keys for :meth:`drift`, ``-1`` when not given),
    ``pointer`` (next slot), ``filled`` (number of valid slots) and ``step``
    (enqueue calls so far).

    Example::

      memory = CrossBatchMemory(size=8192, dim=128, start_after=1000)
      model = DMLModel(encoder, memory=memory)
      # the official weighting instead of the per-polarity average:
      memory = CrossBatchMemory(8192, 128, memory_weight=1 / 32,
                                memory_reduction="sum")

    Reference: Wang et al., CVPR 2020, Sec. 3.3 and Algorithm 1.
    """

    def __init__(
        self,
        size: int,
        dim: int,
        start_after: int = 0,
        memory_weight: float = 1.0,
        memory_reduction: str = "auto",
        multi_hot_classes: int | None = None,
        normalize: bool = False,
        **kwargs,
    ):
        kwargs.pop("dtype", None)
        kwargs.pop("trainable", None)
        super().__init__(dtype="float32", trainable=False, **kwargs)
        self.size = check_int("size", size)
        self.dim = check_int("dim", dim)
        self.start_after = check_int("start_after", start_after, 0)
        self.memory_weight = _check_weight(memory_weight)
        check_choice("memory_reduction", memory_reduction, MEMORY_REDUCTIONS)
        if memory_reduction == "joint" and self.memory_weight != 1.0:
            raise ValueError(
                "`memory_weight` must be 1 with memory_reduction='joint' (one "
                "loss over batch + memory has no separate memory term); use "
                "'sum' or 'avg_nonzero'; received "
                f"memory_weight={memory_weight!r}."
            )
        self.memory_reduction = memory_reduction
        if multi_hot_classes is not None:
            multi_hot_classes = check_int(
                "multi_hot_classes", multi_hot_classes, 2
            )
        self.multi_hot_classes = multi_hot_classes
        if not isinstance(normalize, (bool, np.bool_)):
            raise ValueError(
                "`normalize` must be True or False; received "
                f"normalize={normalize!r}."
            )
        self.normalize = bool(normalize)
        self._variants = {}  # (id(loss), config key) -> (loss, variant)
        self.embeddings = state_variable(
            "embeddings", np.zeros((self.size, self.dim), np.float32)
        )
        self.labels = state_variable("labels", self._empty_labels())
        self.ids = state_variable("ids", np.full((self.size,), -1, np.int32))
        self.keys = state_variable("keys", np.full((self.size,), -1, np.int32))
        self.pointer = state_variable("pointer", np.int32(0))
        self.filled = state_variable("filled", np.int32(0))
        self.step = state_variable("step", np.int32(0))
        self.built = True

    def _empty_labels(self):
        if self.multi_hot_classes is None:
            return np.full((self.size,), -1, np.int32)
        return np.zeros((self.size, self.multi_hot_classes), np.int32)

    @property
    def active(self):
        """Scalar bool: the warm-up (``start_after`` steps) is over."""
        return tf.convert_to_tensor(self.step) >= self.start_after

    def references(self) -> References:
        """The memory as a reference set.

        Returns:
          a :class:`tfdml.losses.References` ``(embeddings [M, d] float32,
          labels [M] int32 (``[M, C]`` with ``multi_hot_classes``), ids [M]
          int32, valid [M] bool)``; ``valid`` is
          False for empty slots and for every slot during the warm-up.
        """
        filled = tf.convert_to_tensor(self.filled)
        valid = tf.logical_and(
            tf.range(self.size, dtype=tf.int32) < filled, self.active
        )
        return References(
            tf.stop_gradient(tf.convert_to_tensor(self.embeddings)),
            tf.convert_to_tensor(self.labels),
            tf.convert_to_tensor(self.ids),
            valid,
        )

    def call(self, inputs: Any = None) -> References:
        return self.references()

    # -- the memory term of the loss ---------------------------------------
    def resolve_reduction(self, loss: PairLoss) -> str:
        """The reduction used with ``loss``: ``"avg_nonzero"``, ``"sum"`` or
        ``"joint"`` (``"auto"`` resolved). Raises ``ValueError`` when
        ``"avg_nonzero"`` is asked of a loss without per-pair reduction."""
        mode = self.memory_reduction
        if mode == "auto":
            if self._averaged_loss(loss, strict=False) is not None:
                return "avg_nonzero"
            return "joint" if self.memory_weight == 1.0 else "sum"
        if mode == "avg_nonzero":
            self._averaged_loss(loss, strict=True)
        return mode

    def _averaged_loss(self, loss, strict):
        """``loss`` with ``pair_reduction="avg_nonzero"`` (cached), or None
        (``strict=False``) when the loss has no such reduction."""
        clone = self._loss_with(loss, "pair_reduction", "avg_nonzero")
        if clone is None and strict:
            raise ValueError(
                "memory_reduction='avg_nonzero' needs a pair loss whose "
                "`pair_reduction` accepts 'avg_nonzero' (ContrastiveLoss, "
                f"TripletMarginLoss); {type(loss).__name__} has none. Use "
                "memory_reduction='sum' (official XBM: loss(batch) + "
                "memory_weight * loss(memory)) or 'joint'."
            )
        return clone

    def _loss_with(self, loss, key, value):
        """``loss`` with its config's ``key`` set to ``value`` (``loss``
        itself when it has that value already; cached per loss and key), or
        None when the config has no ``key`` or the loss does not rebuild
        with it."""
        cached = self._variants.get((id(loss), key))
        if cached is not None and cached[0] is loss:
            return cached[1]
        config = loss.get_config()
        if key not in config:
            return None
        clone = loss
        if config[key] != value:
            config[key] = value
            try:
                clone = type(loss).from_config(config)
            except (TypeError, ValueError):
                return None
        self._variants[(id(loss), key)] = (loss, clone)
        return clone

    def per_anchor(
        self,
        loss: PairLoss,
        embeddings: tf.Tensor | npt.ArrayLike,
        labels: tf.Tensor | npt.ArrayLike,
        ids: tf.Tensor | npt.ArrayLike,
        refs: References,
        *legacy,
        pair_weights: tf.Tensor | None = None,
        relevance: tf.Tensor | npt.ArrayLike | None = None,
        **context,
    ) -> tf.Tensor:
        """Per-anchor loss ``[B]`` with the memory term weighted and reduced.

        ``refs`` (a :class:`tfdml.losses.References`) are ``[other
        references; memory]``: their last ``size`` rows are
        :meth:`references` (as ``DMLModel`` builds them). ``pair_weights [B,
        R]``, a ``relevance [B, R]`` matrix and the ``ref_*`` entries of
        ``context`` are split the same way;
        other context entries are per anchor. The old form ``per_anchor(loss,
        embeddings, labels, ids, ref_embeddings, ref_labels, ref_ids,
        ref_valid)`` still works with a ``DeprecationWarning``.
        """
        if not isinstance(refs, References):
            if len(legacy) != 3:
                raise TypeError(
                    "CrossBatchMemory.per_anchor(loss, embeddings, labels, "
                    "ids, refs) takes a tfdml.losses.References as `refs`; "
                    f"received {type(refs).__name__}."
                )
            warnings.warn(
                "CrossBatchMemory.per_anchor(loss, embeddings, labels, ids, "
                "ref_embeddings, ref_labels, ref_ids, ref_valid) is "
                "deprecated; pass refs=tfdml.losses.References(embeddings, "
                "labels, ids, valid).",
                DeprecationWarning,
                stacklevel=2,
            )
            refs = References(refs, *legacy)
        elif legacy:
            raise TypeError(
                "CrossBatchMemory.per_anchor takes no positional arguments "
                f"after `refs`; received {len(legacy)} more."
            )
        mode = self.resolve_reduction(loss)
        if mode == "joint":
            return loss.per_anchor(
                embeddings,
                labels,
                refs,
                ids,
                pair_weights=pair_weights,
                **_with_relevance(context, relevance),
            )
        ref_embeddings, ref_labels, ref_ids, ref_valid = refs
        total = ref_labels.shape[0]
        if total is not None:
            split = total - self.size
            if split < 0:
                raise ValueError(
                    f"The references hold {total} rows, fewer than the "
                    f"memory's {self.size}."
                )
        else:
            split = tf.shape(ref_labels)[0] - self.size

        def head(t, axis=0):
            if t is None:
                return None
            return t[:split] if axis == 0 else t[:, :split]

        def tail(t, axis=0):
            if t is None:
                return None
            return t[split:] if axis == 0 else t[:, split:]

        head_ctx = {
            k: head(v) if k.startswith("ref_") else v
            for k, v in context.items()
        }
        tail_ctx = {
            k: tail(v) if k.startswith("ref_") else v
            for k, v in context.items()
        }
        batch_term = loss.per_anchor(
            embeddings,
            labels,
            References(*(head(t) for t in refs)),
            ids,
            pair_weights=head(pair_weights, 1),
            **_with_relevance(head_ctx, head(relevance, 1)),
        )
        term_loss = loss if mode == "sum" else self._averaged_loss(loss, True)
        anchors = embeddings
        raw = self._raw_loss(term_loss) if self.normalize else None
        if raw is not None:
            # Stored rows are unit already: normalise only the anchors.
            term_loss, anchors = raw, ops.l2_normalize(embeddings)
        memory_term = term_loss.per_anchor(
            anchors,
            labels,
            # The memory rows carry no gradient (references() stops it);
            # saying so here spares the backward pass the [M, d] matmul
            # of their (unused) gradient, which the concat would compute.
            References(
                _no_gradient(tail(ref_embeddings)),
                tail(ref_labels),
                tail(ref_ids),
                tail(ref_valid),
            ),
            ids,
            pair_weights=tail(pair_weights, 1),
            **_with_relevance(tail_ctx, tail(relevance, 1)),
        )
        return batch_term + self.memory_weight * memory_term

    def _raw_loss(self, loss):
        """``loss`` with ``normalize=False`` (cached) when ``loss``
        normalises its inputs, else None."""
        if getattr(loss, "normalize", False) is not True:
            return None
        clone = self._loss_with(loss, "normalize", False)
        return None if clone is loss else clone

    def drift(
        self,
        embeddings: tf.Tensor | npt.ArrayLike,
        keys: tf.Tensor | npt.ArrayLike,
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """Mean cosine between batch rows and their own stored copies.

        Args:
          embeddings: ``[B, d]``.
          keys: ``[B]`` stable example keys (``-1``: none).

        Returns ``(mean, count)`` float32 scalars: the mean cosine over all
        (batch row, valid slot) pairs with the same key ``>= 0`` and their
        number (``mean`` is 0 when ``count`` is 0).
        """
        keys = tf.reshape(tf.cast(keys, tf.int32), [-1])
        emb = tf.cast(tf.stop_gradient(embeddings), tf.float32)
        stored, _, _, valid = self.references()
        cos = ops.cosine_similarity(emb, stored)
        mem_keys = tf.convert_to_tensor(self.keys)
        match = tf.logical_and(
            tf.equal(keys[:, None], mem_keys[None, :]),
            tf.logical_and(valid[None, :], keys[:, None] >= 0),
        )
        match = tf.cast(match, tf.float32)
        count = tf.reduce_sum(match)
        mean = tf.math.divide_no_nan(tf.reduce_sum(cos * match), count)
        return mean, count

    # -- the ring buffer ---------------------------------------------------
    def enqueue(
        self,
        embeddings: tf.Tensor | npt.ArrayLike,
        labels: tf.Tensor | npt.ArrayLike,
        ids: tf.Tensor | npt.ArrayLike,
        keys: tf.Tensor | npt.ArrayLike | None = None,
    ) -> None:
        """Writes a batch into the ring buffer (after the warm-up).

        Row ``k`` of the batch goes to slot ``(pointer + k) mod M``; a batch
        larger than ``M`` keeps its last ``M`` rows. The pointer advances by
        the batch size. Under a distribution strategy pass the all-gathered
        global batch (see the module docstring).

        Args:
          embeddings: ``[n, d]`` (cast to float32, gradient stopped;
            L2-normalised with ``normalize=True``).
          labels: ``[n]`` (or ``[n, 1]``) int class ids; with
            ``multi_hot_classes=C``: ``[n, C]`` multi-hot 0/1 (any numeric
            or bool dtype; non-zero counts as 1).
          ids: ``[n]`` int example ids.
          keys: optional ``[n]`` int stable example keys (for
            :meth:`drift`); ``-1`` is stored when not given.
        """
        emb = tf.cast(tf.stop_gradient(embeddings), tf.float32)
        labels = self._check_labels(tf.convert_to_tensor(labels))
        ids = tf.cast(ids, tf.int32)
        if keys is None:
            keys = tf.fill(tf.shape(ids), -1)
        keys = tf.reshape(tf.cast(keys, tf.int32), [-1])
        if emb.shape.rank != 2 or (
            emb.shape[-1] is not None and emb.shape[-1] != self.dim
        ):
            raise ValueError(
                f"`embeddings` must have shape [n, {self.dim}]; received "
                f"shape {emb.shape}."
            )
        if self.normalize:
            emb = ops.l2_normalize(emb)
        m = self.size
        n = emb.shape[0]
        if n is not None:
            start = max(n - m, 0)  # static: XLA-friendly slicing
            emb, labels, ids = emb[start:], labels[start:], ids[start:]
            keys = keys[start:]
            offsets = tf.range(start, n, dtype=tf.int32)
            n = tf.constant(n, tf.int32)
        else:
            n = tf.shape(emb)[0]
            start = tf.maximum(n - m, 0)
            emb, labels, ids = emb[start:], labels[start:], ids[start:]
            keys = keys[start:]
            offsets = tf.range(start, n, dtype=tf.int32)
        pointer = tf.convert_to_tensor(self.pointer)
        filled = tf.convert_to_tensor(self.filled)
        active = self.active
        idx = tf.math.floormod(pointer + offsets, m)
        # Branch-free (no tf.cond: safe under XLA and in replica context):
        # during the warm-up the slots are rewritten with their old values.
        old_emb = tf.gather(tf.convert_to_tensor(self.embeddings), idx)
        old_lab = tf.gather(tf.convert_to_tensor(self.labels), idx)
        old_ids = tf.gather(tf.convert_to_tensor(self.ids), idx)
        old_keys = tf.gather(tf.convert_to_tensor(self.keys), idx)
        emb = tf.where(active, emb, old_emb)
        labels = tf.where(active, labels, old_lab)
        ids = tf.where(active, ids, old_ids)
        keys = tf.where(active, keys, old_keys)
        self._scatter(self.embeddings, idx, emb)
        self._scatter(self.labels, idx, labels)
        self._scatter(self.ids, idx, ids)
        self._scatter(self.keys, idx, keys)
        written = tf.where(active, n, 0)
        self.pointer.assign(tf.math.floormod(pointer + written, m))
        self.filled.assign(tf.minimum(filled + written, m))
        self.step.assign(tf.convert_to_tensor(self.step) + 1)

    def _check_labels(self, labels):
        c = self.multi_hot_classes
        if c is None:
            if labels.shape.rank == 2 and labels.shape[-1] != 1:
                raise ValueError(
                    "This CrossBatchMemory stores one int class id per row; "
                    f"received `labels` of shape {labels.shape}. For "
                    "multi-hot labels [n, C] create it with "
                    "multi_hot_classes=C."
                )
            labels = tf.cast(labels, tf.int32)
            if labels.shape.rank == 2:
                labels = tf.reshape(labels, [-1])
            return labels
        if labels.shape.rank != 2 or labels.shape[-1] != c:
            raise ValueError(
                f"This CrossBatchMemory stores multi-hot label rows of "
                f"{c} classes (multi_hot_classes={c}); `labels` must have "
                f"shape [n, {c}]; received shape {labels.shape}."
            )
        if labels.dtype != tf.bool:
            labels = tf.not_equal(labels, tf.zeros([], labels.dtype))
        return tf.cast(labels, tf.int32)

    @staticmethod
    def _scatter(variable, idx, values):
        # In-place IndexedSlices scatter: works on one device (eager,
        # tf.function, XLA) and on MirroredVariables, where
        # scatter_nd_update raises NotImplementedError in TF 2.20 (this
        # path runs under MirroredStrategy in tests/distributed).
        variable.value.scatter_update(tf.IndexedSlices(values, idx))

    def reset(self) -> None:
        """Empties the memory (slots, pointer, fill count and step)."""
        self.embeddings.assign(tf.zeros_like(self.embeddings))
        self.labels.assign(self._empty_labels())
        self.ids.assign(tf.fill([self.size], -1))
        self.keys.assign(tf.fill([self.size], -1))
        self.pointer.assign(0)
        self.filled.assign(0)
        self.step.assign(0)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        for key in ("dtype", "trainable"):
            config.pop(key, None)
        config.update(
            size=self.size,
            dim=self.dim,
            start_after=self.start_after,
            memory_weight=self.memory_weight,
            memory_reduction=self.memory_reduction,
        )
        if self.multi_hot_classes is not None:
            config["multi_hot_classes"] = self.multi_hot_classes
        if self.normalize:
            config["normalize"] = True
        return config


def _no_gradient(t):
    return None if t is None else tf.stop_gradient(t)


def _with_relevance(context, relevance):
    """``context`` plus ``relevance=`` when a matrix is given (losses that
    predate the argument keep receiving only their own context)."""
    if relevance is None:
        return context
    return {**context, "relevance": relevance}


def _check_weight(value):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(
            "`memory_weight` must be a finite number >= 0; received "
            f"memory_weight={value!r}."
        )
    return float(value)
