"""Runs a few MMSI steps on NREP logical CPU devices; saves the weights.

Usage: python dist_mmsi.py NREP OUT.npz (used by test_mmsi_model.py).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfdml.meta import MMSIModel  # noqa: E402
from tfdml.meta import meta_dataset  # noqa: E402


def encoder(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6,))
    h = keras.layers.Dense(16, activation="tanh")(inp)
    raw = keras.layers.Dense(4)(h)
    emb = keras.layers.UnitNormalization()(raw)
    return keras.Model(inp, {"embeddings": emb, "raw": raw})


def main(nrep, out):
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    devices = [f"/cpu:{i}" for i in range(nrep)]
    strategy = tf.distribute.MirroredStrategy(devices)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 6)).astype("float32")
    y = np.repeat(np.arange(6), 8).astype("int32")
    xv = rng.normal(size=(24, 6)).astype("float32")
    yv = np.tile(np.arange(6), 4).astype("int32")
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(12)
    val = tf.data.Dataset.from_tensor_slices((xv, yv)).batch(6)
    data = meta_dataset(train, val)
    with strategy.scope():
        model = MMSIModel(
            encoder(),
            base_loss="contrastive",
            num_classes=6,
            d_size=2,
            min_classes_before_update=2,
        )
        model.compile(optimizer=keras.optimizers.SGD(0.1))
    init = [np.array(v) for v in model.encoder.get_weights()]
    hist = model.fit(data, epochs=1, verbose=0)
    arrays = {f"w{i}": np.asarray(v) for i, v in enumerate(model.get_weights())}
    feats, labels, valid = model.dictionary.entries()
    arrays.update(
        feats=feats.numpy(),
        labels=labels.numpy(),
        valid=valid.numpy(),
        loss=np.array(hist.history["loss"]),
        gate=np.array(hist.history["gate_open"]),
        moved=np.array(
            max(
                np.abs(a - b).max()
                for a, b in zip(init, model.encoder.get_weights())
            )
        ),
    )
    np.savez(out, **arrays)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
