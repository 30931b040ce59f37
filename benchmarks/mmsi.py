"""Step time of MMSI (fast and nested meta paths) vs the plain DML step.

Same batch (80 = 16 classes x 5 images), same small CNN (64x64x1 by
default, embedding 128, Adam), same base loss (the plain step uses the base
loss itself, i.e. the G-form on the batch). MMSI also gets a K = 1
validation batch of 10 classes and a class dictionary (``d_size``). Reports
the median step time after warm-up, measured with a Keras callback inside
``model.fit``, and the ratio to the plain step. Prints a Markdown table.

Usage::

  python benchmarks/mmsi.py [--steps 12] [--warmup 3] [--size 64]
                            [--base contrastive|ms|triplet] [--jit both]
"""

import argparse
import os
import sys
import time

from tfdml._cpu import enable_onednn

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
enable_onednn()  # before TensorFlow is imported: tfdml/_cpu.py
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from _common import pk_labels  # noqa: E402

from tfdml.meta import MMSIModel  # noqa: E402
from tfdml.meta import meta_dataset  # noqa: E402
from tfdml.meta import validation_dataset  # noqa: E402
from tfdml.meta.forms import get_base  # noqa: E402
from tfdml.models import DMLModel  # noqa: E402
from tfdml.models import build_embedding_model  # noqa: E402


class StepTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self._t = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._t)


def data(size, classes=16, k=5, val_classes=10, seed=0):
    rng = np.random.default_rng(seed)
    n = classes * k
    images = rng.uniform(size=(n, size, size, 1)).astype("float32")
    labels = pk_labels(classes, k)
    train = tf.data.Dataset.from_tensors((images, labels)).repeat()
    val = validation_dataset(images, labels, val_classes, seed=seed)
    return train, meta_dataset(train, val.prefetch(2))


def run(kind, args, jit):
    keras.utils.set_random_seed(0)
    enc = build_embedding_model(
        (args.size, args.size, 1), embedding_dim=args.dim
    )
    train, meta = data(args.size)
    if kind == "plain":
        model = DMLModel(enc)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-4),
            loss=get_base(args.base),
            jit_compile=jit,
        )
        ds = train
    else:
        model = MMSIModel(
            enc,
            base_loss=args.base,
            num_classes=16,
            d_size=args.d_size,
            path=kind,
        )
        model.compile(optimizer=keras.optimizers.Adam(1e-4), jit_compile=jit)
        ds = meta
    timer = StepTimer()
    model.fit(
        ds,
        steps_per_epoch=args.steps + args.warmup,
        epochs=1,
        verbose=0,
        callbacks=[timer],
        shuffle=False,
    )
    return timer.times[0], float(np.median(timer.times[args.warmup :]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--d-size", type=int, default=5)
    parser.add_argument("--base", default="contrastive")
    parser.add_argument("--jit", choices=["off", "on", "both"], default="both")
    args = parser.parse_args()
    jits = {"off": [False], "on": [True], "both": [False, True]}[args.jit]
    print(
        f"batch 80 (16x5), {args.size}x{args.size}x1 small CNN, "
        f"base={args.base}, d_size={args.d_size}, {args.steps} timed steps"
    )
    print("| step | jit | first step (s) | median step (ms) | x plain |")
    print("|---|---|---|---|---|")
    for jit in jits:
        plain = None
        for kind in ("plain", "fast", "nested"):
            first, med = run(kind, args, jit)
            plain = med if kind == "plain" else plain
            print(
                f"| {kind} | {jit} | {first:.1f} | {1e3 * med:.1f} | "
                f"{med / plain:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
