"""Trains a tiny DMLModel with IAA; run as a subprocess by test_iaa_dist.

Usage: python iaa_dist_train.py MODE OUT.npz, MODE ``single`` (one device)
or ``mirrored`` (MirroredStrategy over two logical CPU devices). The noise
seed is fixed, so both modes must train identically.
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
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )

import keras  # noqa: E402

from tfdml.augment import IAAEstimator  # noqa: E402
from tfdml.augment import IAARefresh  # noqa: E402
from tfdml.augment import IAAugmenter  # noqa: E402
from tfdml.losses import MultiSimilarityLoss  # noqa: E402
from tfdml.memory import CrossBatchMemory  # noqa: E402
from tfdml.models import DMLModel  # noqa: E402
from tfdml.models import build_embedding_model  # noqa: E402

GLOBAL_BATCH, STEPS, DIM, CLASSES = 16, 2, 8, 8


def data():
    rng = np.random.default_rng(0)
    x = rng.random((GLOBAL_BATCH * STEPS, 8, 8, 1)).astype("float32")
    y = (np.arange(GLOBAL_BATCH * STEPS) // 2 % CLASSES).astype("int32")
    return x, y


def build():
    encoder = build_embedding_model(
        (8, 8, 1), embedding_dim=DIM, freeze_batchnorm=True
    )
    rng = np.random.default_rng(1)
    for v in encoder.trainable_variables:
        v.assign(rng.normal(scale=0.3, size=v.shape).astype("float32"))
    estimator = IAAEstimator(CLASSES, DIM)
    augmenter = IAAugmenter(estimator, num_copies=2, lam=0.8, seed=3)
    model = DMLModel(
        encoder, memory=CrossBatchMemory(24, DIM), augmenter=augmenter
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=MultiSimilarityLoss(epsilon=None),
    )
    return model


def main():
    if MODE == "single":
        strategy = tf.distribute.get_strategy()
    else:
        strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
    with strategy.scope():
        model = build()
    x, y = data()
    refresh = IAARefresh(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH),
        start_epoch=1,
        every_n_epochs=1,
    )
    hist = model.fit(
        x,
        y,
        batch_size=GLOBAL_BATCH,
        epochs=3,
        shuffle=False,
        verbose=0,
        callbacks=[refresh],
    )
    est = model.augmenter.estimator
    out = {
        "replicas": strategy.num_replicas_in_sync,
        "loss": np.array(hist.history["loss"]),
        "variance": est.variance.numpy(),
        "sampling_variance": est.sampling_variance.numpy(),
        "step": model.augmenter.step.numpy(),
        "mem_embeddings": model.memory.embeddings.numpy(),
    }
    for i, w in enumerate(model.encoder.get_weights()):
        out[f"w{i}"] = w
    np.savez(OUT, **out)


if __name__ == "__main__":
    main()
