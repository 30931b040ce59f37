"""Train-step throughput of DMLModel with the small CNN.

Images per second at 64x64x1, global batch 128 (32 classes x 4 images), MS
loss, Adam: plain step, with a cross-batch memory of 8192 slots, with mixed
precision (float16 compute), and with XLA. Prints a Markdown table.

Usage::

  python benchmarks/train_step.py [--steps 20] [--warmup 3] [--size 64]
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
import tensorflow as tf  # noqa: E402
from _common import machine_line  # noqa: E402
from _common import pk_images  # noqa: E402

from tfdml.losses import MultiSimilarityLoss  # noqa: E402
from tfdml.memory import CrossBatchMemory  # noqa: E402
from tfdml.models import DMLModel  # noqa: E402
from tfdml.models import build_embedding_model  # noqa: E402

CONFIGS = {
    "plain": {},
    "XBM (M=8192)": {"memory": 8192},
    "mixed precision": {"policy": "mixed_float16", "slow_on_cpu": True},
    "XLA": {"jit": True},
    "XBM + XLA": {"memory": 8192, "jit": True},
}


def dataset(size, classes, per_class, seed=0):
    x, y = pk_images(size, classes, per_class, seed)
    return tf.data.Dataset.from_tensors((x, y)).repeat()


def run(name, spec, args):
    keras.utils.clear_session()
    keras.config.set_dtype_policy(spec.get("policy", "float32"))
    try:
        keras.utils.set_random_seed(0)
        encoder = build_embedding_model(
            (args.size, args.size, 1), embedding_dim=args.dim
        )
        memory = None
        if spec.get("memory"):
            memory = CrossBatchMemory(spec["memory"], args.dim)
        model = DMLModel(encoder, memory=memory)
        model.compile(
            optimizer="adam",
            loss=MultiSimilarityLoss(),
            jit_compile=spec.get("jit", False),
        )
        ds = dataset(args.size, args.classes, args.per_class)
        start = time.perf_counter()
        model.fit(
            ds,
            steps_per_epoch=args.warmup,
            epochs=1,
            verbose=0,
            shuffle=False,
        )
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        steps = args.steps
        if spec.get("slow_on_cpu") and not tf.config.list_physical_devices(
            "GPU"
        ):
            # float16 convolutions are emulated on CPU (~40x slower).
            steps = min(steps, args.slow_steps)
        hist = model.fit(
            ds, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False
        )
        elapsed = time.perf_counter() - start
    finally:
        keras.config.set_dtype_policy("float32")
    batch = args.classes * args.per_class
    loss = hist.history["loss"][-1]
    return {
        "name": name,
        "img_s": steps * batch / elapsed,
        "ms_step": 1000 * elapsed / steps,
        "steps": steps,
        "first_s": compile_s,
        "loss": loss,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--slow-steps",
        type=int,
        default=3,
        help="timed steps for mixed precision on a CPU-only machine",
    )
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument(
        "--only", nargs="*", default=None, help="subset of configs"
    )
    args = parser.parse_args(argv)
    rows = [
        run(name, spec, args)
        for name, spec in CONFIGS.items()
        if not args.only or name in args.only
    ]
    print(
        f"small CNN, {args.size}x{args.size}x1, batch "
        f"{args.classes}x{args.per_class}, embedding {args.dim}, MS loss, "
        f"Adam; {args.steps} timed steps after {args.warmup} warm-up steps; "
        f"{machine_line()}\n"
    )
    print(
        "| configuration | images/s | ms/step | timed steps | warm-up (s) "
        "| last loss |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['name']} | {r['img_s']:.0f} | {r['ms_step']:.0f} | "
            f"{r['steps']} | {r['first_s']:.1f} | {r['loss']:.3f} |"
        )
    return rows


if __name__ == "__main__":
    main()
