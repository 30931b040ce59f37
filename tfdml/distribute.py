"""Cross-replica helpers for ``tf.distribute`` training steps.

:func:`all_gather` is what :class:`tfdml.models.DMLModel` and
:class:`tfdml.meta.MMSIModel` use so that the loss (and the memory bank) sees
the global batch under ``MirroredStrategy`` / ``MultiWorkerMirroredStrategy``.
"""

from __future__ import annotations

import tensorflow as tf


def all_gather(value: tf.Tensor | None, axis: int = 0) -> tf.Tensor | None:
    """All-gathers ``value`` along ``axis`` across the replicas in sync.

    Called in a replica context (inside ``strategy.run`` or a Keras
    ``train_step``), it returns the concatenation of every replica's
    ``value`` in replica order (replica 0's rows first); gradients flow back
    to each replica's own slice (``ReplicaContext.all_gather``). Outside a
    replica context or with one replica it returns ``value`` unchanged.
    ``None`` gives ``None``.
    """
    if value is None:
        return None
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return value
    if not getattr(value, "device", "x"):
        # MultiWorkerMirroredStrategy with one device per worker: a tensor
        # without a device has no all_gather destination ("destinations can
        # not be empty"); pin it to the local device.
        devices = ctx.strategy.extended.worker_devices
        if len(devices) == 1:
            with tf.device(devices[0]):
                value = tf.identity(value)
    return ctx.all_gather(value, axis=axis)
