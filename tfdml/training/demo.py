"""``make demo``: CJK glyphs -> train -> evaluate -> export -> query.

Usage::

  python -m tfdml.demo [--tiny] [--out DIR]

1. Builds the small offline CJK glyph set (``tfdml.data`` builder; missing
   font packages are installed with apt-get when running as root).
2. Trains with ``tfdml/training/demo.yaml`` (shipped in the package; the
   same file as ``configs/demo_cjk.yaml``), a few minutes on 2 CPU cores.
3. Evaluates on the unseen (test) classes (``eval_test.json``).
4. Exports the encoder as a SavedModel and queries the export in this
   process, checking that it agrees with the Keras encoder.
5. Prints a short table and where the run folder, plots and export are.

``--tiny`` shrinks every budget (for the test suite).
"""

import argparse
import json
import os
import sys
import time

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.yaml")

TINY = [
    "data.config=tiny",
    "data.val_classes=3",
    "data.classes_per_batch=4",
    "data.samples_per_class=2",
    "model.image_size=16",
    "train.epochs=2",
    "train.steps_per_epoch=3",
]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny budget (tests)")
    p.add_argument(
        "--out",
        default=os.path.join("runs", "demo"),
        help="folder for the data, the run and the export",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="extra config overrides (section.key=value)",
    )
    return p.parse_args(argv)


def build_glyphs(out, tiny):
    """Builds the CJK glyph data set; returns the TFDS ``data_dir``."""
    from tfdml import data as data_lib

    data_dir = os.path.join(out, "data")
    name = data_lib.build_cjk_glyphs(
        data_dir=data_dir, tiny=tiny, install_fonts=True
    )
    print(f"      built {name} in {data_dir}")
    return data_dir


def query_export(export_dir, encoder, x, y, k=5):
    """Queries the exported SavedModel; returns a small report.

    The gallery of the export is the test set itself, so the first hit of a
    query is the query; precision@k counts the next ``k`` hits.
    """
    import numpy as np
    import tensorflow as tf

    path = os.path.join(export_dir, "tfdml", "1")
    loaded = tf.saved_model.load(path)
    names = sorted(loaded.signatures.keys())
    q = tf.constant(x[: min(len(x), 32)], tf.float32)
    t0 = time.time()
    served = loaded.signatures["serving_default"](images=q)["embeddings"]
    latency = (time.time() - t0) * 1000.0
    local = np.asarray(encoder(q, training=False)["embeddings"])
    report = {
        "signatures": names,
        "max_abs_diff_vs_keras": float(
            np.abs(np.asarray(served) - local).max()
        ),
        "embed_ms": latency,
    }
    res = loaded.signatures["embed_and_search"](
        images=q, k=tf.constant(k + 1, tf.int32)
    )
    ids = np.asarray(res["ids"]).astype(str)[:, 1:]
    got = np.array([[int(i.split("/")[-1]) for i in row] for row in ids])
    report[f"export_precision@{k}"] = float(
        np.mean(got == y[: len(q)][:, None])
    )
    return report


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from tfdml.training import build
    from tfdml.training import config as config_lib
    from tfdml.training import loop
    from tfdml.training import run_dir as run_dir_lib

    t0 = time.time()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    print(f"[1/4] building the CJK glyph set under {out}/data ...")
    data_dir = build_glyphs(out, args.tiny)
    run_dir = os.path.join(out, "run")
    export_dir = os.path.join(out, "export")
    overrides = [
        f"data.data_dir={data_dir}",
        f"train.run_dir={run_dir}",
        "export.enabled=true",
        f"export.dir={export_dir}",
    ]
    if args.tiny:
        overrides += TINY
    overrides += args.overrides
    try:
        cfg = config_lib.load(CONFIG, overrides)
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return loop.EXIT_CONFIG
    print("[2/4] training on the training classes ...")
    status = loop.main(cfg, config_path=CONFIG)
    if status != 0:
        return status
    print("[3/4] evaluating on the unseen classes ...")
    eval_path = os.path.join(run_dir, run_dir_lib.EVAL_FILE)
    with open(eval_path, encoding="utf-8") as f:
        report = json.load(f)
    print("[4/4] querying the exported SavedModel ...")
    resolved = run_dir_lib.read_config(run_dir)
    encoder, _ = run_dir_lib.load_encoder(
        run_dir, run_dir_lib.FINAL_ENCODER, resolved
    )
    data = build.Data(resolved)
    x, y = data.arrays("test", limit=512)
    served = query_export(export_dir, encoder, x, y)
    _table(report, served)
    print(
        f"\nrun folder: {run_dir}\nplots:      "
        f"{os.path.join(run_dir, run_dir_lib.PLOTS_DIR)}\n"
        f"export:     {export_dir}\n"
        f"total time: {time.time() - t0:.0f} s"
    )
    return 0


def _table(report, served):
    rows = [
        (k, v)
        for k, v in report["final"].items()
        if isinstance(v, (int, float)) and not k.startswith("num_")
    ]
    print("\n| metric (test classes, never seen in training) | value |")
    print("|---|---|")
    for k, v in rows:
        print(f"| {k} | {v:.4f} |")
    for k, v in served.items():
        if isinstance(v, float):
            print(f"| export: {k} | {v:.4g} |")
    print(f"| export signatures | {', '.join(served['signatures'])} |")


if __name__ == "__main__":
    from tfdml._cpu import enable_onednn

    enable_onednn()  # oneDNN on before TensorFlow is imported: tfdml/_cpu.py
    sys.exit(main())
