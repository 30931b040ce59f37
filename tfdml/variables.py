"""Non-trainable state variables that stay identical on every replica.

Memory banks, class dictionaries and IAA statistics are written from
all-gathered tensors inside the train step. Under ``MirroredStrategy`` they
need ``aggregation="only_first_replica"`` and ``synchronization="on_write"``
(with ``aggregation="none"`` replicas can diverge; docs/distributed.md,
"One machine: MirroredStrategy").
"""

import keras


def state_variable(name, value):
    """A non-trainable ``keras.Variable`` initialised to numpy ``value``."""
    return keras.Variable(
        value,
        dtype=value.dtype.name,
        trainable=False,
        autocast=False,
        aggregation="only_first_replica",
        synchronization="on_write",
        name=name,
    )
