"""Forward + backward time of the pair losses vs the matmul floor.

For MS, contrastive, triplet semi-hard (tfa-compatible) and GPW (MS preset)
at batch 128/512/2048 x dim 128/512: the median time of ``loss(labels,
emb)`` plus its gradient w.r.t. the embeddings, in eager, ``tf.function``
and ``tf.function(jit_compile=True)`` (XLA), and the ratio to one ``[B, d] x
[d, B]`` matmul (forward only, same mode): the floor of any pair loss.
Labels are P x K with K = 4. Prints a Markdown table.

Usage::

  python benchmarks/losses.py [--quick] [--repeats 10]
"""

import argparse
import os
import platform
import sys

from tfdml._cpu import enable_onednn

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
enable_onednn()  # before TensorFlow is imported: tfdml/_cpu.py
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from _common import median_time  # noqa: E402

import tfdml.losses as L  # noqa: E402


def losses():
    out = {"MS": L.MultiSimilarityLoss()}
    if hasattr(L, "ContrastiveLoss"):
        out["contrastive"] = L.ContrastiveLoss()
    if hasattr(L, "TripletSemiHardLoss"):
        out["triplet semi-hard"] = L.TripletSemiHardLoss()
    out["GPW (MS preset)"] = L.GeneralPairWeightingLoss.multi_similarity()
    return out


def make_fn(loss):
    def fwd_bwd(emb, labels):
        with tf.GradientTape() as tape:
            tape.watch(emb)
            value = loss(labels, emb)
        return value, tape.gradient(value, emb)

    return fwd_bwd


def matmul(emb, labels):
    return tf.matmul(emb, emb, transpose_b=True)


def compile_fn(fn, mode):
    if mode == "eager":
        return fn
    return tf.function(fn, jit_compile=(mode == "XLA"))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small grid")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    batches = (128, 512) if args.quick else (128, 512, 2048)
    dims = (128,) if args.quick else (128, 512)
    modes = ("eager", "tf.function", "XLA")
    repeats = args.repeats or (5 if args.quick else 10)
    rng = np.random.default_rng(0)
    print(
        f"TensorFlow {tf.__version__}, {platform.processor() or 'cpu'}, "
        f"{len(tf.config.list_physical_devices('GPU'))} GPU(s), "
        f"median of {repeats}; ms (x matmul floor)\n"
    )
    header = "| loss | B | d | " + " | ".join(modes) + " |"
    print(header)
    print("|" + "---|" * (3 + len(modes)))
    for b in batches:
        for d in dims:
            emb = rng.normal(size=(b, d)).astype(np.float32)
            emb = tf.constant(emb / np.linalg.norm(emb, axis=1, keepdims=True))
            labels = tf.constant(np.repeat(np.arange(b // 4), 4), tf.int32)
            floor = {
                m: median_time(compile_fn(matmul, m), (emb, labels), repeats)
                for m in modes
            }
            cells = [f"{1e3 * floor[m]:.3f}" for m in modes]
            print(f"| matmul floor | {b} | {d} | " + " | ".join(cells) + " |")
            for name, loss in losses().items():
                cells = []
                for m in modes:
                    t = median_time(
                        compile_fn(make_fn(loss), m), (emb, labels), repeats
                    )
                    cells.append(f"{1e3 * t:.2f} ({t / floor[m]:.0f}x)")
                print(f"| {name} | {b} | {d} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
