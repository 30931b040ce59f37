"""Export a trained run as a TF-Serving model base path (a thin CLI over
:func:`tfdml.training.report.export_run`).

    python export/export.py --run RUN_DIR --out OUT_DIR [--gallery G.npz]
        [--name NAME] [--version N] [--index brute_force|scann|both] [--k 10]
        [--threshold T | --target-precision P [--calibration-mode M]]

Reads ``RUN_DIR/best_encoder.keras`` and the resolved config of
``RUN_DIR/config.yaml`` through ``tfdml.training.run_dir`` (the image size
and channels must match the encoder). The gallery is ``--gallery`` (.npz
with ``X`` uint8 [N, H, W] or [N, H, W, C], ``y`` int labels, optional
``ids`` strings) or else the run's own test split,
``tfdml.data.load_split_arrays(resolved config, "test")``. Exit status 2
when RUN_DIR is not a tfdml run. Writes
``OUT_DIR/<name>/<version>/`` (and ``OUT_DIR/<name>_scann/<version>/`` with
``--index both``); see ``tfdml/export/saved_model.py`` for the signatures.
``--threshold`` (a cosine similarity) or ``--target-precision`` (calibrated
on the run's validation classes, ``tfdml.eval.calibrate``) make the search
signatures also return ``matched``; without either, the run config's
``export.threshold`` / ``export.target_precision`` apply.
"""

import argparse
import sys

from tfdml._cpu import enable_onednn

enable_onednn()  # oneDNN on before TensorFlow is imported: tfdml/_cpu.py


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--out", required=True, help="model base folder")
    p.add_argument("--gallery", default=None, help=".npz with X, y[, ids]")
    p.add_argument("--name", default="tfdml")
    p.add_argument("--version", type=int, default=1)
    p.add_argument(
        "--index",
        default="brute_force",
        choices=["brute_force", "scann", "both"],
    )
    p.add_argument("--k", type=int, default=10, help="default k")
    p.add_argument("--encoder", default="best_encoder.keras")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="similarity threshold of the matched flag, in [-1, 1]",
    )
    p.add_argument(
        "--target-precision",
        type=float,
        default=None,
        help="calibrate the threshold for this precision on the val split",
    )
    p.add_argument(
        "--calibration-mode", default=None, choices=["pairs", "nearest"]
    )
    return p.parse_args(argv)


def main(argv=None):
    args = _parse(argv)
    from tfdml.training import report

    run = report.load_run(args.run, args.encoder)
    try:  # a bad gallery: a message and exit 2, nothing written
        written = report.export_run(
            run,
            args.out,
            gallery=args.gallery,
            index=args.index,
            name=args.name,
            version=args.version,
            k=args.k,
            threshold=args.threshold,
            target_precision=args.target_precision,
            calibration_mode=args.calibration_mode,
        )
    except ValueError as e:
        print(f"export.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    for variant, path in written.items():
        print(f"{variant}: {path}")
    return written


def _cli():
    from tfdml.training.run_dir import RunDirError

    try:
        return 0 if main() else 1
    except RunDirError as e:
        print(f"error: --run: {e.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_cli())
