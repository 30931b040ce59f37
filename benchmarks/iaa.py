"""Step-time cost of IAA (intra-class adaptive augmentation) on top of MS.

Same batch, same small CNN (64x64x1, batch 32 classes x 4 images, embedding
128, Adam): the plain MS step against MS + IAA (M synthetic copies per
sample as extra references), eager-graph and XLA, with and without a cross-
batch memory. The estimator is filled once from the encoder before timing.
Also times one neighbour correction (paper Eq. 9-16) for a large label
space, and (``--refresh``) one ``IAARefresh`` estimate on cjk_glyphs/small
(6,758 images, 32x32, small CNN from scratch): the whole split against the
bounded sample of ``max_per_class`` images per class. Prints Markdown.

Usage::

  python benchmarks/iaa.py [--steps 20] [--warmup 3] [--copies 3]
                           [--correction-classes 2000]
  python benchmarks/iaa.py --refresh-only [--max-per-class 32]
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
from _common import machine_line  # noqa: E402
from _common import pk_images  # noqa: E402
from _common import pk_labels  # noqa: E402

from tfdml.augment import IAAEstimator  # noqa: E402
from tfdml.augment import IAARefresh  # noqa: E402
from tfdml.augment import IAAugmenter  # noqa: E402
from tfdml.augment import neighbor_correction  # noqa: E402
from tfdml.losses import MultiSimilarityLoss  # noqa: E402
from tfdml.losses import References  # noqa: E402
from tfdml.memory import CrossBatchMemory  # noqa: E402
from tfdml.models import DMLModel  # noqa: E402
from tfdml.models import build_embedding_model  # noqa: E402

CONFIGS = {
    "MS": {},
    "MS + IAA": {"iaa": True},
    "MS (XLA)": {"jit": True},
    "MS + IAA (XLA)": {"iaa": True, "jit": True},
    "MS + XBM 8192": {"memory": 8192},
    "MS + XBM 8192 + IAA": {"memory": 8192, "iaa": True},
}


def batch(size, classes, per_class, seed=0):
    return pk_images(size, classes, per_class, seed)


def run(name, spec, args):
    keras.utils.clear_session()
    keras.utils.set_random_seed(0)
    encoder = build_embedding_model(
        (args.size, args.size, 1), embedding_dim=args.dim
    )
    x, y = batch(args.size, args.classes, args.per_class)
    augmenter = None
    if spec.get("iaa"):
        est = IAAEstimator(args.classes, args.dim)
        est.update(encoder(x, training=False)["raw"], y)
        augmenter = IAAugmenter(est, num_copies=args.copies, lam=0.8, seed=0)
    memory = None
    if spec.get("memory"):
        memory = CrossBatchMemory(spec["memory"], args.dim)
    model = DMLModel(encoder, memory=memory, augmenter=augmenter)
    model.compile(
        optimizer="adam",
        loss=MultiSimilarityLoss(),
        jit_compile=spec.get("jit", False),
    )
    ds = tf.data.Dataset.from_tensors((x, y)).repeat()
    start = time.perf_counter()
    model.fit(
        ds,
        steps_per_epoch=args.warmup,
        epochs=1,
        verbose=0,
        shuffle=False,
    )
    first = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        hist = model.fit(
            ds,
            steps_per_epoch=args.steps,
            epochs=1,
            verbose=0,
            shuffle=False,
        )
        times.append((time.perf_counter() - start) / args.steps)
    return {
        "name": name,
        "ms_step": 1000 * float(np.median(times)),
        "first_s": first,
        "loss": hist.history["loss"][-1],
        "refs": args.classes
        * args.per_class
        * (1 + (args.copies if spec.get("iaa") else 0))
        + (spec.get("memory") or 0),
    }


def time_head(args, iaa, jit, reps=50):
    """Loss + gradient w.r.t. the raw head outputs only (no CNN): the part
    of the step that IAA changes, less sensitive to a busy machine."""
    rng = np.random.default_rng(0)
    n = args.classes * args.per_class
    raw = tf.constant(rng.normal(size=(n, args.dim)).astype(np.float32))
    y = tf.constant(pk_labels(args.classes, args.per_class))
    ids = tf.range(n)
    loss = MultiSimilarityLoss()
    aug = None
    if iaa:
        est = IAAEstimator(args.classes, args.dim)
        est.update(raw, y)
        aug = IAAugmenter(est, num_copies=args.copies, lam=0.8, seed=0)

    @tf.function(jit_compile=jit)
    def step(raw):
        with tf.GradientTape() as tape:
            tape.watch(raw)
            emb = tf.math.l2_normalize(raw, -1)
            ref, ref_y, ref_ids = emb, y, ids
            if aug is not None:
                s_emb, s_y, s_ids, _ = aug.synthesize(raw, y, ids)
                ref = tf.concat([emb, s_emb], 0)
                ref_y = tf.concat([y, s_y], 0)
                ref_ids = tf.concat([ids, s_ids], 0)
            value = tf.reduce_mean(
                loss.per_anchor(emb, y, References(ref, ref_y, ref_ids), ids)
            )
        return tape.gradient(value, raw)

    step(raw).numpy()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            out = step(raw)
        out.numpy()
        times.append((time.perf_counter() - start) / reps)
    return 1000 * float(np.min(times))


def time_correction(classes, dim, k=25):
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(classes, dim))
    var = rng.uniform(0.1, 1.0, size=(classes, dim))
    counts = rng.integers(1, 12, size=classes)
    start = time.perf_counter()
    out = neighbor_correction(mean, var, counts, num_neighbors=k)
    out["corrected"].numpy()
    return time.perf_counter() - start


def time_refresh(
    max_per_class,
    repeats=2,
    size=32,
    batch=256,
    config="small",
    data_dir=None,
):
    """Seconds of one IAARefresh.refresh() on cjk_glyphs/``config``: the
    whole split (``max_per_class=None``) and the bounded sample; median of
    ``repeats`` after one traced call. Images are decoded once, in memory,
    shuffled (so the bounded sample is random)."""
    from tfdml.data.sources import source_from_config

    spec = {"source": "cjk_glyphs", "config": config}
    if data_dir:
        spec["data_dir"] = data_dir
    src = source_from_config(spec)
    order = np.random.default_rng(0).permutation(len(src))
    x = np.stack(src.load_batch(order)).astype(np.float32) / 255.0
    x = tf.image.resize(x, (size, size)).numpy()
    y = np.asarray(src.labels)[order].astype(np.int32)
    classes = len(np.unique(y))
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)
    out = {"images": len(y), "classes": classes}
    for cap in (None, max_per_class):
        keras.utils.set_random_seed(0)
        encoder = build_embedding_model(
            (size, size, x.shape[-1]), embedding_dim=128
        )
        aug = IAAugmenter(IAAEstimator(classes, 128), seed=0)
        model = DMLModel(encoder, augmenter=aug)
        cb = IAARefresh(ds, start_epoch=0, max_per_class=cap)
        cb.set_model(model)
        for _ in range(repeats + 1):
            cb.refresh()
        out[cap] = (
            float(np.median(cb.refresh_seconds[1:])),
            cb.sample_sizes[-1],
        )
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--correction-classes", type=int, default=2000)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument(
        "--no-steps", action="store_true", help="only the head timings"
    )
    parser.add_argument(
        "--refresh", action="store_true", help="also time IAARefresh on CJK"
    )
    parser.add_argument(
        "--refresh-only", action="store_true", help="only the refresh timing"
    )
    parser.add_argument("--max-per-class", type=int, default=32)
    parser.add_argument(
        "--refresh-config",
        default="small",
        help="cjk_glyphs config of the refresh timing (small or full)",
    )
    parser.add_argument("--refresh-repeats", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    if args.refresh or args.refresh_only:
        res = time_refresh(
            args.max_per_class,
            repeats=args.refresh_repeats,
            config=args.refresh_config,
            data_dir=args.data_dir,
        )
        print(
            f"IAARefresh on cjk_glyphs/{args.refresh_config} "
            f"({res['images']} images, "
            f"{res['classes']} classes, 32x32, small CNN, training-mode BN, "
            f"batch 256), median of {args.refresh_repeats} after one traced "
            f"call; {os.cpu_count()} CPU cores, load average "
            f"{os.getloadavg()[0]:.1f}\n\n"
            "| sample | images embedded | s per refresh |\n|---|---:|---:|"
        )
        for cap in (None, args.max_per_class):
            sec, n = res[cap]
            name = "whole split" if cap is None else f"max_per_class={cap}"
            print(f"| {name} | {n} | {sec:.2f} |")
        if args.refresh_only:
            return res
    rows = [
        run(name, spec, args)
        for name, spec in CONFIGS.items()
        if (not args.only or name in args.only) and not args.no_steps
    ]
    print(
        f"small CNN, {args.size}x{args.size}x1, batch {args.classes}x"
        f"{args.per_class}, embedding {args.dim}, IAA M={args.copies}, Adam; "
        f"median of {args.repeats} x {args.steps} timed steps after "
        f"{args.warmup} warm-up steps; {machine_line()}\n"
    )
    base = {}
    print("| configuration | references | ms/step | vs plain | warm-up (s) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        key = r["name"].replace(" + IAA", "")
        base.setdefault(key, r["ms_step"])
        ratio = r["ms_step"] / base[key]
        print(
            f"| {r['name']} | {r['refs']} | {r['ms_step']:.1f} | "
            f"{ratio:.2f}x | {r['first_s']:.1f} |"
        )
    print(
        "\n| head only (MS loss + gradient w.r.t. raw) | ms | vs MS |\n"
        "|---|---:|---:|"
    )
    for jit in (False, True):
        plain = time_head(args, False, jit)
        with_iaa = time_head(args, True, jit)
        tag = " (XLA)" if jit else ""
        print(f"| MS{tag} | {plain:.2f} | 1.00x |")
        print(f"| MS + IAA{tag} | {with_iaa:.2f} | {with_iaa / plain:.2f}x |")
    if args.correction_classes:
        sec = time_correction(args.correction_classes, args.dim)
        print(
            f"\nneighbour correction (float64, K=25), "
            f"{args.correction_classes} classes x {args.dim} dims: "
            f"{sec:.2f} s per refresh"
        )
    return rows


if __name__ == "__main__":
    main()
