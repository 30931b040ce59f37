"""Export a trained run as a TF-Serving model base path.

    python export/export.py --run RUN_DIR --out OUT_DIR [--gallery G.npz]
        [--name NAME] [--version N] [--index brute_force|scann|both] [--k 10]

Reads ``RUN_DIR/best_encoder.keras`` and the resolved config of
``RUN_DIR/config.yaml`` through ``tfdml.training.run_dir`` (the image size
and channels must match the encoder). The gallery is ``--gallery`` (.npz
with ``X`` uint8 [N, H, W] or [N, H, W, C], ``y`` int labels, optional
``ids`` strings) or else the run's own test split,
``tfdml.data.load_split_arrays(resolved config, "test")``. Exit status 2
when RUN_DIR is not a tfdml run. Writes
``OUT_DIR/<name>/<version>/`` (and ``OUT_DIR/<name>_scann/<version>/`` with
``--index both``); see ``tfdml/export/saved_model.py`` for the signatures.
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
    return p.parse_args(argv)


def load_run(run_dir, encoder_file="best_encoder.keras"):
    """(encoder, resolved config dict, (H, W, C)).

    Raises:
      tfdml.training.run_dir.RunDirError: not a tfdml run, a missing
        encoder, or an encoder that does not match the config.
    """
    from tfdml.training import run_dir as run_dir_lib

    cfg = run_dir_lib.read_config(run_dir)
    encoder, shape = run_dir_lib.load_encoder(run_dir, encoder_file, cfg)
    return encoder, cfg, shape


def load_gallery(gallery, cfg):
    """(X, y, ids or None) from an .npz or tfdml.data's test split."""
    import numpy as np

    if gallery:
        try:
            z = np.load(gallery, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"--gallery {gallery}: not a readable .npz file with arrays "
                f"X, y[, ids] ({e})"
            ) from None
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError(
                f"--gallery {gallery}: expected an .npz file with arrays X, "
                "y[, ids]; found a single array."
            )
        with z:
            for key in ("X", "y"):
                if key not in z:
                    raise ValueError(
                        f"--gallery {gallery}: missing array {key!r}; found "
                        f"{sorted(z.files)}."
                    )
            try:
                x, y = z["X"], z["y"]
                ids = z["ids"].astype(str) if "ids" in z else None
            except ValueError as e:  # object arrays need pickle
                raise ValueError(f"--gallery {gallery}: {e}") from None
            return x, y, ids
    try:
        from tfdml.data import load_split_arrays
    except Exception as e:
        raise RuntimeError(
            "No --gallery given and tfdml.data.load_split_arrays is not "
            f"available ({e!r}); pass --gallery G.npz with X, y[, ids]."
        ) from e
    x, y = load_split_arrays(cfg, "test")[:2]
    return x, y, None


def main(argv=None):
    args = _parse(argv)
    from tfdml.export import saved_model

    encoder, cfg, (h, w, c) = load_run(args.run, args.encoder)
    try:  # a bad gallery: a message and exit 2, nothing written
        x, y, ids = load_gallery(args.gallery, cfg)
        where = f"--gallery {args.gallery}: " if args.gallery else ""
        names = (
            ("X", "y", "ids") if args.gallery else ("images", "labels", "ids")
        )
        try:
            saved_model.validate_gallery(x, y, ids, names=names)
        except ValueError as e:
            raise ValueError(f"{where}{e}") from None
        images = saved_model.images_to_float(x, h, w, c)
        written = saved_model.export_saved_model(
            encoder,
            args.out,
            gallery_images=images,
            database_labels=y,
            database_ids=ids,
            index=args.index,
            name=args.name,
            version=args.version,
            k=args.k,
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
