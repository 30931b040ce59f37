"""MMSI's class dictionary: a per-class FIFO of past feature vectors.

Jiang et al., "Meta-Mining Strategy with Semi-global Information for Deep
Metric Learning" (MMSI), IEEE TNNLS 2024. The official code keeps a Python
dict ``class -> list of <= d_size features`` (the "semi-global
information"); every iteration appends the batch's features and drops the
oldest ones of a class beyond ``d_size``. The meta (G-form) loss compares
validation anchors with every dictionary entry.

Here the dictionary lives in non-trainable variables with static shapes
(``[num_classes * d_size + 1, dim]`` features, the last row being a write
sink for dropped rows) and is updated inside the compiled train step, so it
runs in eager, ``tf.function`` and XLA alike and is saved with checkpoints.

Distributed use: create it under ``strategy.scope()``. The variables use
``synchronization="on_write"`` and ``aggregation="only_first_replica"``;
:meth:`ClassDictionary.enqueue` must be given the **all-gathered** global
batch (as :class:`tfdml.meta.MMSIModel` does), otherwise other replicas'
rows are lost.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import numpy.typing as npt
import tensorflow as tf

from tfdml import registry
from tfdml.validation import check_int
from tfdml.variables import state_variable


def check_class_ids(
    labels: tf.Tensor, owner: str, name: str = "labels", fix: str = ""
) -> None:
    """Raises ``ValueError`` unless ``labels`` (static rank) are class ids
    ``[n]`` or ``[n, 1]``: features are kept per class, so multi-hot or
    higher-rank labels have no slot. ``fix`` is appended to the message."""
    shape = labels.shape
    if shape.rank is not None and (
        shape.rank > 2 or (shape.rank == 2 and shape[-1] != 1)
    ):
        raise ValueError(
            f"{owner} keeps features per class: `{name}` must be int class "
            f"ids [n] (or [n, 1]); received {name} of shape {shape} "
            f"(multi-hot labels are not supported{fix})."
        )


@registry.register
class ClassDictionary(keras.layers.Layer):
    """Per-class FIFO of at most ``d_size`` feature vectors.

    Args:
      num_classes: number of training classes ``C``; labels must lie in
        ``[0, C)`` (rows with other labels are ignored).
      dim: feature dimension ``d``.
      d_size: per-class capacity (official: 1 for contrastive, 100 for MS on
        CUB/Cars, 1000 on SOP).
      **kwargs: passed to ``keras.layers.Layer`` (``name``).

    Variables (non-trainable): ``features [C * d_size + 1, d]`` (row
    ``c * d_size + s`` is slot ``s`` of class ``c``; the last row is a sink),
    ``counts [C]`` (entries held, ``<= d_size``), ``heads [C]`` (next slot to
    write = the oldest entry once full), ``first_seen [C]`` (rank of the
    class's first appearance, ``-1`` if never seen) and ``num_seen``.

    Example::

      dictionary = ClassDictionary(num_classes=100, dim=512, d_size=100)
      dictionary.enqueue(features, labels)     # inside the train step
      ref, ref_labels, valid = dictionary.entries()
    """

    def __init__(self, num_classes: int, dim: int, d_size: int = 1, **kwargs):
        kwargs.pop("dtype", None)
        kwargs.pop("trainable", None)
        super().__init__(dtype="float32", trainable=False, **kwargs)
        self.num_classes = check_int("num_classes", num_classes)
        self.dim = check_int("dim", dim)
        self.d_size = check_int("d_size", d_size)
        size = self.num_classes * self.d_size
        self.features = state_variable(
            "features", np.zeros((size + 1, self.dim), np.float32)
        )
        c = self.num_classes
        self.counts = state_variable("counts", np.zeros((c,), np.int32))
        self.heads = state_variable("heads", np.zeros((c,), np.int32))
        self.first_seen = state_variable(
            "first_seen", np.full((c,), -1, np.int32)
        )
        self.num_seen = state_variable("num_seen", np.int32(0))
        self.built = True

    # -- reading -----------------------------------------------------------
    def num_classes_seen(self) -> tf.Tensor:
        """Scalar int32: classes holding at least one entry (the gate)."""
        return tf.convert_to_tensor(self.num_seen)

    def entries(
        self, order: str = "slot"
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """All slots as a reference set.

        Args:
          order: ``"slot"`` (default): class-major by class id, then slot
            index ``0 .. d_size - 1`` (static, cheapest). ``"insertion"``:
            the official code's order: classes in order of first appearance
            (never-seen classes last), and within a class oldest entry first.
            Every loss in :mod:`tfdml.meta` is invariant to the order; it
            only matters when the rows are inspected.

        Returns:
          ``(features [C * d_size, d] float32 (gradient stopped),
          labels [C * d_size] int32, valid [C * d_size] bool)``; ``valid``
          is False for empty slots.
        """
        if order not in ("slot", "insertion"):
            raise ValueError(
                "`order` must be 'slot' or 'insertion'; received "
                f"order={order!r}."
            )
        c, k = self.num_classes, self.d_size
        size = c * k
        feats = tf.stop_gradient(tf.convert_to_tensor(self.features)[:size])
        counts = tf.convert_to_tensor(self.counts)
        heads = tf.convert_to_tensor(self.heads)
        slot = tf.range(k, dtype=tf.int32)[None, :]  # [1, k]
        if order == "slot":
            cls = tf.range(c, dtype=tf.int32)
            rows = cls[:, None] * k + slot
            valid = slot < counts[:, None]
        else:
            first = tf.convert_to_tensor(self.first_seen)
            key = tf.where(first >= 0, first, c + tf.range(c))
            cls = tf.argsort(key, stable=True)
            cnt = tf.gather(counts, cls)[:, None]
            head = tf.gather(heads, cls)[:, None]
            # Oldest slot: 0 while filling, the write head once full.
            start = tf.where(cnt >= k, head, tf.zeros_like(head))
            rows = cls[:, None] * k + tf.math.floormod(start + slot, k)
            valid = slot < cnt
        rows = tf.reshape(rows, [-1])
        labels = tf.reshape(tf.broadcast_to(cls[:, None], [c, k]), [-1])
        return tf.gather(feats, rows), labels, tf.reshape(valid, [-1])

    def call(
        self, inputs: Any = None
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        return self.entries()

    # -- writing -----------------------------------------------------------
    def enqueue(
        self,
        features: tf.Tensor | npt.ArrayLike,
        labels: tf.Tensor | npt.ArrayLike,
    ) -> None:
        """Appends a batch in row order; drops the oldest beyond ``d_size``.

        Args:
          features: ``[n, d]`` (cast to float32, gradient stopped).
          labels: ``[n]`` (or ``[n, 1]``) int class ids in ``[0, C)``;
            rows with another label are ignored.
        """
        feats = tf.cast(tf.stop_gradient(features), tf.float32)
        if feats.shape.rank != 2 or (
            feats.shape[-1] is not None and feats.shape[-1] != self.dim
        ):
            raise ValueError(
                f"`features` must have shape [n, {self.dim}]; received "
                f"shape {feats.shape}."
            )
        labels = tf.convert_to_tensor(labels)
        check_class_ids(labels, "ClassDictionary")
        labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
        c, k = self.num_classes, self.d_size
        in_range = tf.logical_and(labels >= 0, labels < c)
        lab = tf.where(in_range, labels, tf.zeros_like(labels))
        onehot = tf.cast(
            tf.logical_and(
                tf.equal(lab[:, None], tf.range(c)[None, :]), in_range[:, None]
            ),
            tf.int32,
        )  # [n, C]
        # Rank of each row among the batch rows of its class, and totals.
        rank = tf.reduce_sum((tf.cumsum(onehot, axis=0) - onehot) * onehot, 1)
        per_class = tf.reduce_sum(onehot, axis=0)  # [C]
        heads = tf.convert_to_tensor(self.heads)
        counts = tf.convert_to_tensor(self.counts)
        first = tf.convert_to_tensor(self.first_seen)
        num_seen = tf.convert_to_tensor(self.num_seen)
        n_row = tf.gather(per_class, lab)
        keep = tf.logical_and(in_range, rank >= n_row - k)
        slot = tf.math.floormod(tf.gather(heads, lab) + rank, k)
        sink = c * k
        idx = tf.where(keep, lab * k + slot, sink)
        self.features.value.scatter_update(tf.IndexedSlices(feats, idx))
        self.heads.assign(tf.math.floormod(heads + per_class, k))
        self.counts.assign(tf.minimum(counts + per_class, k))
        # First appearance: new classes ranked by their first row.
        new = tf.logical_and(first < 0, per_class > 0)  # [C]
        first_row = tf.reduce_min(
            tf.where(
                onehot > 0,
                tf.range(tf.shape(lab)[0])[:, None],
                tf.int32.max,
            ),
            axis=0,
        )
        order_key = tf.where(new, first_row, tf.int32.max)
        new_rank = tf.argsort(tf.argsort(order_key, stable=True), stable=True)
        self.first_seen.assign(tf.where(new, num_seen + new_rank, first))
        self.num_seen.assign(num_seen + tf.reduce_sum(tf.cast(new, tf.int32)))

    def reset(self) -> None:
        """Empties the dictionary."""
        self.features.assign(tf.zeros_like(self.features))
        self.counts.assign(tf.zeros_like(self.counts))
        self.heads.assign(tf.zeros_like(self.heads))
        self.first_seen.assign(tf.fill([self.num_classes], -1))
        self.num_seen.assign(0)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        for key in ("dtype", "trainable"):
            config.pop(key, None)
        config.update(
            num_classes=self.num_classes, dim=self.dim, d_size=self.d_size
        )
        return config
