"""Exact retrieval metrics on one million points, every point a query.

    python benchmarks/eval_full_1m.py [--n 1000000] [--noise 0.5]

Runs ``retrieval_metrics(x, y)`` once on N clustered unit vectors (d = 128,
classes of 20) in a fresh process and prints the wall time, the peak RSS of
the process (sampled every 20 ms) and the metrics. No floor is timed here:
``benchmarks/eval.py`` measures the ratio to the blocked-matmul floor on a
query sample of the same data.
"""

import argparse
import os
import sys
import time

from tfdml._cpu import enable_onednn

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
enable_onednn()  # before TensorFlow is imported: tfdml/_cpu.py
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from eval import PeakRSS  # noqa: E402
from eval import clustered  # noqa: E402
from eval import rss_mb  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--noise", type=float, default=0.5)
    a = p.parse_args(argv)
    from tfdml.eval import retrieval_metrics

    before_data = rss_mb()
    x, y = clustered(a.n, noise=a.noise)
    with_data = rss_mb()
    t = time.perf_counter()
    with PeakRSS() as peak:
        m = retrieval_metrics(x, y)
    dt = time.perf_counter() - t
    print(f"\n### Exact retrieval metrics, N = {a.n:,} (every point a query)\n")
    print(
        "| N | noise | time (s) | peak RSS (MB) | RSS of the process before "
        "the data (MB) | RSS with the data (MB) | map@r | recall@1 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {a.n:,} | {a.noise} | {dt:.0f} | {peak.peak:.0f} | "
        f"{before_data:.0f} | {with_data:.0f} | {m['map@r']:.4f} | "
        f"{m['recall@1']:.4f} |"
    )


if __name__ == "__main__":
    main()
