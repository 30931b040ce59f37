"""Trains a tiny DMLModel with IAA; run as a subprocess by test_iaa_dist.

Usage: python iaa_dist_train.py MODE OUT.npz, MODE ``single`` (one device)
or ``mirrored`` (MirroredStrategy over two logical CPU devices). The noise
seed is fixed, so both modes must train identically.

Two replicas legitimately round differently from one device (each encodes
half the batch), so the comparison only holds when the loss is continuous
near every pair. The MS loss drops positives with ``S >= 1 - 1e-5`` (a
cliff): a memory larger than one global batch held each image's own
embedding from two steps earlier (a positive under a new id, ``S`` within
one float32 ulp of the cutoff), and a one-ulp difference moved the epoch-3
loss by 1.7e-3. The memory therefore holds exactly one global batch (only
the other images), and the script records ``cutoff_gap``: the smallest
``|S - (1 - 1e-5)|`` over all positive pairs of all steps.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

MODE, OUT = sys.argv[1], sys.argv[2]
# One global batch: the memory never holds a stale copy of a batch image.
MEMORY = int(sys.argv[3]) if len(sys.argv) > 3 else 16
if MODE == "mirrored":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )

import keras  # noqa: E402

from tfdml import ops  # noqa: E402
from tfdml.augment import IAAEstimator  # noqa: E402
from tfdml.augment import IAARefresh  # noqa: E402
from tfdml.augment import IAAugmenter  # noqa: E402
from tfdml.losses import MultiSimilarityLoss  # noqa: E402
from tfdml.memory import CrossBatchMemory  # noqa: E402
from tfdml.models import DMLModel  # noqa: E402
from tfdml.models import build_embedding_model  # noqa: E402
from tfdml.variables import state_variable  # noqa: E402

GLOBAL_BATCH, STEPS, DIM, CLASSES = 16, 2, 8, 8
CUTOFF = 1.0 - 1e-5  # MultiSimilarityMiner's duplicate-positive cutoff


class GapTrackingMS(MultiSimilarityLoss):
    """MS that records the smallest distance of a positive to the cutoff."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.cutoff_gap = state_variable("cutoff_gap", np.float32(1.0))

    def per_anchor(self, embeddings, labels, refs, ids, **kwargs):
        pos, _ = ops.pair_masks(labels, refs.labels, ids, refs.ids, refs.valid)
        sim = tf.matmul(embeddings, refs.embeddings, transpose_b=True)
        gap = tf.reduce_min(tf.where(pos, tf.abs(sim - CUTOFF), 1.0))
        self.cutoff_gap.assign(tf.minimum(self.cutoff_gap, gap))
        return super().per_anchor(embeddings, labels, refs, ids, **kwargs)


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
        encoder,
        memory=CrossBatchMemory(MEMORY, DIM),
        augmenter=augmenter,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=GapTrackingMS(epsilon=None),
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
        "cutoff_gap": model.loss.cutoff_gap.numpy(),
    }
    for i, w in enumerate(model.encoder.get_weights()):
        out[f"w{i}"] = w
    np.savez(OUT, **out)


if __name__ == "__main__":
    main()
