"""Benchmarks of tfdml.eval and the exported search endpoints.

    python benchmarks/eval.py [--max-n 200000] [--noise 0.5,2.5]
        [--full-max-n 200000] [--query-sample 20000]
        [--scann-n 100000,1000000]
        [--skip-metrics] [--skip-scann] [--skip-endpoints]

Prints Markdown tables:

1. exact ``retrieval_metrics`` at N = 20k, 100k, 200k, 1M (d = 128,
   classes of 20, every point a query and a reference; above
   ``--full-max-n`` a sample of queries against all N references): time,
   peak RSS and the ratio to a plain blocked-matmul floor over the same
   (query, reference) pairs (same blocks, ``matmul`` + ``reduce_max``);
2. ScaNN build time, queries per second and recall@10 against exact search
   (and the exact search's QPS) at 100k and 1M;
3. SavedModel endpoint latency p50 / p99 (1 and 64 queries) against a 100k
   gallery, brute force and ScaNN variants.
"""

import argparse
import os
import sys
import tempfile
import threading
import time

import numpy as np

from tfdml._cpu import enable_onednn

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
enable_onednn()  # before TensorFlow is imported: tfdml/_cpu.py


def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakRSS:
    """Samples VmRSS every 20 ms while the block runs."""

    def __enter__(self):
        self.peak = rss_mb()
        self._stop = threading.Event()

        def run():
            while not self._stop.is_set():
                self.peak = max(self.peak, rss_mb())
                time.sleep(0.02)

        self._t = threading.Thread(target=run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_mb())


def clustered(n, d=128, class_size=20, seed=0, noise=0.5):
    rng = np.random.default_rng(seed)
    classes = max(1, n // class_size)
    c = rng.standard_normal((classes, d), dtype=np.float32)
    y = np.arange(n) % classes
    x = c[y] + noise * rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, y


def matmul_floor(q, r, block, ref_block):
    """Blocked ``matmul`` + ``reduce_max`` over every (query, reference)."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def step(q, r):
        return tf.reduce_max(tf.matmul(q, r, transpose_b=True), axis=1)

    qs, refs = tf.constant(q), tf.constant(r)
    acc = 0.0
    for b in range(0, len(q), block):
        qb = qs[b : b + block]
        for c in range(0, len(r), ref_block):
            acc += float(tf.reduce_sum(step(qb, refs[c : c + ref_block])))
    return acc


def bench_metrics(ns, noises, full_max_n, query_sample):
    """Exact metrics vs the floor. Above ``full_max_n`` points a random
    sample of ``query_sample`` queries is scored against all N references
    (``query_ids``); the full-N time is that time x N / sample (query blocks
    are independent, so time is linear in the number of queries)."""
    from tfdml.eval import retrieval_metrics

    rows = []
    for noise in noises:
        for n in ns:
            x, y = clustered(n, noise=noise)
            m = n if n <= full_max_n else min(n, query_sample)
            pick = np.sort(np.random.default_rng(0).choice(n, m, replace=False))
            # warm-up (traces and XLA compiles for these block shapes)
            w = pick[: min(m, 2048)]
            retrieval_metrics(x[w], y[w], x, y, query_ids=w)
            matmul_floor(x[w], x, 1024, 32768)
            base = rss_mb()
            t = time.perf_counter()
            with PeakRSS() as p:
                if m == n:
                    res = retrieval_metrics(x, y)
                else:
                    res = retrieval_metrics(
                        x[pick], y[pick], x, y, query_ids=pick
                    )
            dt = time.perf_counter() - t
            t = time.perf_counter()
            matmul_floor(x[pick], x, 1024, 32768)
            floor = time.perf_counter() - t
            rows.append((noise, n, m, dt, floor, p.peak, p.peak - base, res))
            print(
                f"  noise {noise} N={n} queries={m}: {dt:.1f} s, floor "
                f"{floor:.1f} s, peak {p.peak:.0f} MB",
                file=sys.stderr,
                flush=True,
            )
    print("\n### Exact retrieval metrics (d=128, classes of 20)\n")
    print(
        "| noise | N | queries timed | time (s) | floor (s) | ratio "
        "| full-N time (s) | peak RSS (MB) | RSS above inputs (MB) | map@r |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for noise, n, m, dt, floor, peak, extra, res in rows:
        full = dt * n / m
        print(
            f"| {noise} | {n:,} | {m:,} | {dt:.1f} | {floor:.1f} "
            f"| {dt / floor:.2f} | {full:.0f} | {peak:.0f} | {extra:.0f} "
            f"| {res['map@r']:.4f} |"
        )


def bench_scann(ns, nq=1000):
    from tfdml.eval import BruteForceIndex
    from tfdml.eval import ScaNNIndex

    rows = []
    for n in ns:
        x, _ = clustered(n + nq, class_size=100, seed=1, noise=0.3)
        db, q = x[:n], x[n:]
        t = time.perf_counter()
        idx = ScaNNIndex(db, k=10)
        build = time.perf_counter() - t
        idx.search_indices(q[:10], 10)  # warm-up
        t = time.perf_counter()
        got, _ = idx.search_indices(q, 10)
        qps = nq / (time.perf_counter() - t)
        bf = BruteForceIndex(db)
        bf.search_indices(q[:10], 10)
        t = time.perf_counter()
        want, _ = bf.search_indices(q, 10)
        qps_bf = nq / (time.perf_counter() - t)
        rec = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)])
        rows.append((n, build, qps, qps_bf, rec))
        print(f"  ScaNN N={n}: build {build:.1f} s", file=sys.stderr)
    print("\n### ScaNN vs exact search (d=128, clustered, k=10, 1000 q)\n")
    print("| N | build (s) | ScaNN QPS | exact QPS | speed-up | recall@10 |")
    print("|---|---|---|---|---|---|")
    for n, build, qps, qps_bf, rec in rows:
        print(
            f"| {n:,} | {build:.1f} | {qps:,.0f} | {qps_bf:,.0f} | "
            f"{qps / qps_bf:.1f}x | {rec:.3f} |"
        )


def bench_endpoints(n=100_000, reps=50):
    import keras
    import scann  # noqa: F401
    import tensorflow as tf

    from tfdml.export import export_saved_model

    inp = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(inp)
    h = keras.layers.GlobalAveragePooling2D()(h)
    raw = keras.layers.Dense(128)(h)
    emb = keras.layers.UnitNormalization()(raw)
    enc = keras.Model(inp, {"embeddings": emb, "raw": raw})
    db, _ = clustered(n, class_size=100, seed=2, noise=0.3)
    out = tempfile.mkdtemp()
    paths = export_saved_model(enc, out, gallery=db, index="both", k=10)
    rng = np.random.default_rng(0)
    rows = []
    for variant, path in paths.items():
        sigs = tf.saved_model.load(path).signatures
        for b in (1, 64):
            q = tf.constant(db[rng.integers(0, n, b)] + 0.0)
            img = tf.constant(rng.random((b, 32, 32, 3)).astype("float32"))
            for name, kw in (
                ("search_default", {"embeddings": q}),
                ("embed_and_search_default", {"images": img}),
            ):
                f = sigs[name]
                for _ in range(3):
                    f(**kw)["ids"].numpy()
                ts = []
                for _ in range(reps):
                    t = time.perf_counter()
                    f(**kw)["ids"].numpy()
                    ts.append((time.perf_counter() - t) * 1e3)
                p50, p99 = np.percentile(ts, [50, 99])
                rows.append((variant, name, b, p50, p99))
    print(f"\n### Endpoint latency, {n:,} gallery, d=128 (ms, {reps} calls)\n")
    print("| variant | signature | queries | p50 | p99 |")
    print("|---|---|---|---|---|")
    for v, name, b, p50, p99 in rows:
        print(f"| {v} | {name} | {b} | {p50:.2f} | {p99:.2f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-n", type=int, default=1_000_000)
    p.add_argument("--scann-n", default="100000,1000000")
    p.add_argument(
        "--noise",
        default="0.5,2.5",
        help="metrics data: 0.5 separable (sparse path), 2.5 near random",
    )
    p.add_argument(
        "--full-max-n",
        type=int,
        default=200_000,
        help="every point is a query up to this N",
    )
    p.add_argument(
        "--query-sample",
        type=int,
        default=20_000,
        help="above --full-max-n, time this many sampled queries",
    )
    p.add_argument("--skip-metrics", action="store_true")
    p.add_argument("--skip-scann", action="store_true")
    p.add_argument("--skip-endpoints", action="store_true")
    a = p.parse_args(argv)
    if not a.skip_metrics:
        ns = [n for n in (20_000, 100_000, 200_000, 1_000_000) if n <= a.max_n]
        noises = [float(v) for v in a.noise.split(",") if v]
        bench_metrics(ns, noises, a.full_max_n, a.query_sample)
    if not a.skip_scann:
        bench_scann([int(s) for s in a.scann_n.split(",") if s])
    if not a.skip_endpoints:
        bench_endpoints()


if __name__ == "__main__":
    main()
