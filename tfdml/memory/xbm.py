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
"""

import keras
import numpy as np
import tensorflow as tf

from tfdml import registry
from tfdml.validation import check_int
from tfdml.variables import state_variable


@registry.register
class CrossBatchMemory(keras.layers.Layer):
    """XBM ring buffer of ``size`` embeddings of dimension ``dim``.

    Args:
      size: number of slots ``M``.
      dim: embedding dimension ``d``.
      start_after: number of initial training steps (enqueue calls) during
        which the memory stays empty and is not read (XBM's warm-up).
      **kwargs: passed to ``keras.layers.Layer`` (``name``).

    Variables (all non-trainable): ``embeddings [M, d]`` float32,
    ``labels [M]`` int32 (``-1`` when empty), ``ids [M]`` int32, ``pointer``
    (next slot), ``filled`` (number of valid slots) and ``step`` (enqueue
    calls so far).

    Example::

      memory = CrossBatchMemory(size=8192, dim=128, start_after=1000)
      model = DMLModel(encoder, memory=memory)

    Reference: Wang et al., CVPR 2020, Sec. 3.3 and Algorithm 1.
    """

    def __init__(self, size, dim, start_after=0, **kwargs):
        kwargs.pop("dtype", None)
        kwargs.pop("trainable", None)
        super().__init__(dtype="float32", trainable=False, **kwargs)
        self.size = check_int("size", size)
        self.dim = check_int("dim", dim)
        self.start_after = check_int("start_after", start_after, 0)
        self.embeddings = state_variable(
            "embeddings", np.zeros((self.size, self.dim), np.float32)
        )
        self.labels = state_variable(
            "labels", np.full((self.size,), -1, np.int32)
        )
        self.ids = state_variable("ids", np.full((self.size,), -1, np.int32))
        self.pointer = state_variable("pointer", np.int32(0))
        self.filled = state_variable("filled", np.int32(0))
        self.step = state_variable("step", np.int32(0))
        self.built = True

    @property
    def active(self):
        """Scalar bool: the warm-up (``start_after`` steps) is over."""
        return tf.convert_to_tensor(self.step) >= self.start_after

    def references(self):
        """The memory as a reference set.

        Returns:
          ``(embeddings [M, d] float32, labels [M] int32, ids [M] int32,
          valid [M] bool)``; ``valid`` is False for empty slots and for
          every slot during the warm-up.
        """
        filled = tf.convert_to_tensor(self.filled)
        valid = tf.logical_and(
            tf.range(self.size, dtype=tf.int32) < filled, self.active
        )
        return (
            tf.stop_gradient(tf.convert_to_tensor(self.embeddings)),
            tf.convert_to_tensor(self.labels),
            tf.convert_to_tensor(self.ids),
            valid,
        )

    def call(self, inputs=None):
        return self.references()

    def enqueue(self, embeddings, labels, ids):
        """Writes a batch into the ring buffer (after the warm-up).

        Row ``k`` of the batch goes to slot ``(pointer + k) mod M``; a batch
        larger than ``M`` keeps its last ``M`` rows. The pointer advances by
        the batch size. Under a distribution strategy pass the all-gathered
        global batch (see the module docstring).

        Args:
          embeddings: ``[n, d]`` (cast to float32, gradient stopped).
          labels: ``[n]`` (or ``[n, 1]``) int class ids.
          ids: ``[n]`` int example ids.
        """
        emb = tf.cast(tf.stop_gradient(embeddings), tf.float32)
        labels = tf.cast(labels, tf.int32)
        if labels.shape.rank == 2:
            labels = tf.reshape(labels, [-1])
        ids = tf.cast(ids, tf.int32)
        if emb.shape.rank != 2 or (
            emb.shape[-1] is not None and emb.shape[-1] != self.dim
        ):
            raise ValueError(
                f"`embeddings` must have shape [n, {self.dim}]; received "
                f"shape {emb.shape}."
            )
        m = self.size
        n = emb.shape[0]
        if n is not None:
            start = max(n - m, 0)  # static: XLA-friendly slicing
            emb, labels, ids = emb[start:], labels[start:], ids[start:]
            offsets = tf.range(start, n, dtype=tf.int32)
            n = tf.constant(n, tf.int32)
        else:
            n = tf.shape(emb)[0]
            start = tf.maximum(n - m, 0)
            emb, labels, ids = emb[start:], labels[start:], ids[start:]
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
        emb = tf.where(active, emb, old_emb)
        labels = tf.where(active, labels, old_lab)
        ids = tf.where(active, ids, old_ids)
        self._scatter(self.embeddings, idx, emb)
        self._scatter(self.labels, idx, labels)
        self._scatter(self.ids, idx, ids)
        written = tf.where(active, n, 0)
        self.pointer.assign(tf.math.floormod(pointer + written, m))
        self.filled.assign(tf.minimum(filled + written, m))
        self.step.assign(tf.convert_to_tensor(self.step) + 1)

    @staticmethod
    def _scatter(variable, idx, values):
        # In-place IndexedSlices scatter: works on one device (eager,
        # tf.function, XLA) and on MirroredVariables, where
        # scatter_nd_update raises NotImplementedError (stack.md §3).
        variable.value.scatter_update(tf.IndexedSlices(values, idx))

    def reset(self):
        """Empties the memory (slots, pointer, fill count and step)."""
        self.embeddings.assign(tf.zeros_like(self.embeddings))
        self.labels.assign(tf.fill([self.size], -1))
        self.ids.assign(tf.fill([self.size], -1))
        self.pointer.assign(0)
        self.filled.assign(0)
        self.step.assign(0)

    def get_config(self):
        config = super().get_config()
        for key in ("dtype", "trainable"):
            config.pop(key, None)
        config.update(
            size=self.size, dim=self.dim, start_after=self.start_after
        )
        return config
