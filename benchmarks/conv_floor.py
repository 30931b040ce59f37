"""The side-by-side CNN's convolution kernels alone: TF (oneDNN) vs torch.

The training step of ``vs_pml.py --speed --parts train`` (4 blocks of 3 x 3
convolution, BatchNorm, ReLU, max-pool; 64 x 64 x 1, batch 128) is mostly
its convolutions. This script times each layer's three kernels alone
(forward; gradient w.r.t. the filter; gradient w.r.t. the input, which the
first layer never needs) in each framework, in its own process, alternating
A B A B, and prints milliseconds and GFLOP/s (2 x multiply-adds). Their sum
is the floor of a training step at this machine's kernel speed: what is
left of the step above it is BatchNorm, ReLU, pooling, the loss, the
optimizer and the framework.

Usage (PyTorch from the peer's venv, installed as ``vs_pml.py`` says)::

  python benchmarks/conv_floor.py --pml-python /work/venv-pml/bin/python \
      --rounds 3 [--repeats 11] [--batch 128]

Without ``--pml-python`` only TensorFlow is timed.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

try:  # the PyTorch worker runs in the peer's venv, which has no tfdml
    from tfdml._cpu import enable_onednn
except ImportError:
    pass
else:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    enable_onednn()  # before TensorFlow is imported: tfdml/_cpu.py

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vs_pml import WIDTHS  # noqa: E402  (the side-by-side CNN's widths)

SIZE = 64
KERNELS = ("forward", "filter grad", "input grad")


def layers(size=SIZE, widths=WIDTHS):
    """(height, in channels, out channels) of each convolution."""
    out, c_in, h = [], 1, size
    for w in widths:
        out.append((h, c_in, w))
        c_in, h = w, h // 2
    return out


def gflop(batch, h, c_in, c_out):
    return 2.0 * batch * h * h * c_in * c_out * 9 / 1e9


def _median_ms(fn, repeats):
    """Median ms of ``fn()`` after two warm-up calls. Not _common's
    ``timed_calls``: that fetches outputs (``.numpy()``), which made TF's
    layer-1 forward (a 67 MB output) 17.6 ms instead of 6.5 (BENCHMARKS.md,
    fifth AVX-512 part)."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def tf_kernels(batch, repeats):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    out = {}
    for i, (h, ci, co) in enumerate(layers()):
        x = tf.constant(rng.normal(size=(batch, h, h, ci)), tf.float32)
        w = tf.constant(rng.normal(size=(3, 3, ci, co)), tf.float32)
        dy = tf.constant(rng.normal(size=(batch, h, h, co)), tf.float32)
        fwd = tf.function(lambda x, w: tf.nn.conv2d(x, w, 1, "SAME"))
        dw = tf.function(
            lambda x, dy, ci=ci, co=co: tf.raw_ops.Conv2DBackpropFilter(
                input=x,
                filter_sizes=[3, 3, ci, co],
                out_backprop=dy,
                strides=[1, 1, 1, 1],
                padding="SAME",
            )
        )
        dx = tf.function(
            lambda w, dy, h=h, ci=ci: tf.raw_ops.Conv2DBackpropInput(
                input_sizes=[batch, h, h, ci],
                filter=w,
                out_backprop=dy,
                strides=[1, 1, 1, 1],
                padding="SAME",
            )
        )
        out[i] = {
            "forward": _median_ms(lambda: fwd(x, w), repeats),
            "filter grad": _median_ms(lambda: dw(x, dy), repeats),
        }
        if i:
            out[i]["input grad"] = _median_ms(lambda: dx(w, dy), repeats)
    return {"version": f"tensorflow {tf.__version__}", "ms": out}


def torch_kernels(batch, repeats):
    import torch

    rng = np.random.default_rng(0)
    conv_bw = torch.ops.aten.convolution_backward
    out = {}
    with torch.no_grad():
        for i, (h, ci, co) in enumerate(layers()):
            x = torch.from_numpy(
                rng.normal(size=(batch, ci, h, h)).astype(np.float32)
            )
            w = torch.from_numpy(
                rng.normal(size=(co, ci, 3, 3)).astype(np.float32)
            )
            dy = torch.from_numpy(
                rng.normal(size=(batch, co, h, h)).astype(np.float32)
            )

            def bw(mask, x=x, w=w, dy=dy):
                return conv_bw(
                    dy,
                    x,
                    w,
                    None,
                    [1, 1],
                    [1, 1],
                    [1, 1],
                    False,
                    [0, 0],
                    1,
                    mask,
                )

            out[i] = {
                "forward": _median_ms(
                    lambda x=x, w=w: torch.nn.functional.conv2d(
                        x, w, padding=1
                    ),
                    repeats,
                ),
                "filter grad": _median_ms(
                    lambda: bw([False, True, False]), repeats
                ),
            }
            if i:
                out[i]["input grad"] = _median_ms(
                    lambda: bw([True, False, False]), repeats
                )
    return {"version": f"torch {torch.__version__}", "ms": out}


def worker(args):
    fn = tf_kernels if args.worker == "tf" else torch_kernels
    res = fn(args.batch, args.repeats)
    with open(args.out, "w") as f:
        json.dump(res, f)


def _run(python, fw, args, path):
    cmd = [
        python,
        os.path.abspath(__file__),
        "--worker",
        fw,
        "--out",
        path,
        "--batch",
        str(args.batch),
        "--repeats",
        str(args.repeats),
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    subprocess.run(cmd, check=True, env=env)
    with open(path) as f:
        res = json.load(f)
    res["ms"] = {int(k): v for k, v in res["ms"].items()}
    return res


def _ratio_cell(per):
    """`` a / b / c |``: the per-round ratios tf / torch of ``per``."""
    pairs = zip(per["tf"], per["torch"])
    return " " + " / ".join(f"{a / b:.2f}" for a, b in pairs) + " |"


def table(rounds, batch):
    """Markdown rows: per layer and kernel, the median ms (and GFLOP/s) of
    each framework over the rounds, and the per-round ratios."""
    fws = [fw for fw in ("tf", "torch") if rounds[fw]]
    head = "| layer | kernel | GFLOP |"
    rule = "|---|---|---:|"
    for fw in fws:
        head += f" {fw} ms (GFLOP/s) |"
        rule += "---:|"
    if len(fws) == 2:
        head += " ratio tf/torch per round |"
        rule += "---|"
    rows = [head, rule]
    totals = {fw: [0.0] * len(rounds[fw]) for fw in fws}
    for i, (h, ci, co) in enumerate(layers()):
        g = gflop(batch, h, ci, co)
        for kernel in KERNELS:
            if kernel not in rounds["tf"][0]["ms"][i]:
                continue
            row = f"| {i + 1}: {h}x{h}, {ci}->{co} | {kernel} | {g:.2f} |"
            per = {}
            for fw in fws:
                per[fw] = [r["ms"][i][kernel] for r in rounds[fw]]
                for j, v in enumerate(per[fw]):
                    totals[fw][j] += v
                med = float(np.median(per[fw]))
                row += f" {med:.1f} ({g / med * 1e3:.0f}) |"
            if len(fws) == 2:
                row += _ratio_cell(per)
            rows.append(row)
    row = "| all | one step's kernels | |"
    for fw in fws:
        row += f" {float(np.median(totals[fw])):.1f} |"
    if len(fws) == 2:
        row += _ratio_cell(totals)
    rows.append(row)
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pml-python", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--worker", choices=("tf", "torch"), default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    rounds = {"tf": [], "torch": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            path = os.path.join(tmp, f"r{r}.json")
            rounds["tf"].append(_run(sys.executable, "tf", args, path))
            if args.pml_python:
                rounds["torch"].append(
                    _run(args.pml_python, "torch", args, path)
                )
    versions = [rounds[fw][0]["version"] for fw in rounds if rounds[fw]]
    print(
        f"3x3 convolutions of the side-by-side CNN, batch {args.batch}, "
        f"{SIZE}x{SIZE}x1 input; median of {args.repeats} calls per round, "
        f"{args.rounds} rounds alternating processes; "
        f"{', '.join(versions)}; {os.cpu_count()} CPU cores\n"
    )
    text = table(rounds, args.batch)
    print(text)
    return rounds


if __name__ == "__main__":
    main()
