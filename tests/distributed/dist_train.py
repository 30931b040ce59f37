"""Trains a tiny DMLModel for a few steps; run as a subprocess by the tests.

Usage: python dist_train.py MODE OUT.npz, MODE one of
  single    one device, global batches;
  mirrored  MirroredStrategy over two logical CPU devices;
  worker    MultiWorkerMirroredStrategy (TF_CONFIG from the environment).

Logical devices must be configured before TensorFlow initialises its
devices, hence a separate process.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

MODE, OUT = sys.argv[1], sys.argv[2]
if MODE == "mirrored":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu,
        [tf.config.LogicalDeviceConfiguration()] * 2,
    )

import keras  # noqa: E402

from tfdml.losses import MultiSimilarityLoss  # noqa: E402
from tfdml.memory import CrossBatchMemory  # noqa: E402
from tfdml.models import DMLModel  # noqa: E402
from tfdml.models import build_embedding_model  # noqa: E402

GLOBAL_BATCH, STEPS, MEMORY, DIM = 16, 4, 24, 8


def data():
    rng = np.random.default_rng(0)
    x = rng.random((GLOBAL_BATCH * STEPS, 8, 8, 1)).astype("float32")
    # Each half of a global batch holds other classes, so the memory's label
    # order reveals the replica order.
    y = (np.arange(GLOBAL_BATCH * STEPS) // 2 % 8).astype("int32")
    return x, y


def build():
    encoder = build_embedding_model(
        (8, 8, 1),
        embedding_dim=DIM,
        freeze_batchnorm=True,  # per-replica BN statistics would differ
    )
    rng = np.random.default_rng(1)
    for v in encoder.trainable_variables:
        v.assign(rng.normal(scale=0.3, size=v.shape).astype("float32"))
    memory = CrossBatchMemory(MEMORY, DIM)
    model = DMLModel(encoder, memory=memory)
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=MultiSimilarityLoss(epsilon=None),
        # XLA fails under mirrored strategies on CPU; DMLModel turns it off
        # (with a warning) instead of failing.
        jit_compile=MODE != "single",
    )
    return model


def main():
    if MODE == "single":
        strategy = tf.distribute.get_strategy()
    elif MODE == "mirrored":
        strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
    elif MODE == "worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        raise ValueError(f"unknown mode {MODE!r}")
    with strategy.scope():
        model = build()
    x, y = data()
    initial = [w.copy() for w in model.encoder.get_weights()]
    hist = model.fit(
        x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0
    )
    mem = model.memory
    out = {
        "replicas": strategy.num_replicas_in_sync,
        "jit": bool(model.jit_compile),
        "loss": np.array(hist.history["loss"]),
        "pointer": mem.pointer.numpy(),
        "filled": mem.filled.numpy(),
        "mem_embeddings": mem.embeddings.numpy(),
        "mem_labels": mem.labels.numpy(),
        "mem_ids": mem.ids.numpy(),
        "seen": model.examples_seen.numpy(),
    }
    for i, w in enumerate(model.encoder.get_weights()):
        out[f"w{i}"] = w
        out[f"init{i}"] = initial[i]
    if MODE == "mirrored":
        for name in ("embeddings", "labels", "ids", "pointer"):
            var = getattr(mem, name).value
            copies = strategy.experimental_local_results(var)
            out[f"replica_{name}"] = np.stack([c.numpy() for c in copies])
    np.savez(OUT, **out)


if __name__ == "__main__":
    main()
