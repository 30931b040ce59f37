"""Export a trained run as a TF-Serving model base path.

    python export/export.py --run RUN_DIR --out OUT_DIR [--gallery G.npz]
        [--name NAME] [--version N] [--index brute_force|scann|both] [--k 10]

Reads ``RUN_DIR/best_encoder.keras`` and ``RUN_DIR/config.yaml``
(``model.image_size`` or ``model.input_size``, ``model.channels``). The
gallery is ``--gallery`` (.npz with ``X`` uint8 [N, H, W] or [N, H, W, C],
``y`` int labels, optional ``ids`` strings) or else the test split from
``tfdml.data.load_split_arrays(config, "test")``. Writes
``OUT_DIR/<name>/<version>/`` (and ``OUT_DIR/<name>_scann/<version>/`` with
``--index both``); see ``tfdml/export/saved_model.py`` for the signatures.
"""

import argparse
import os
import sys


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
    """(encoder, config dict, (H, W, C))."""
    import keras
    import yaml

    cfg_path = os.path.join(run_dir, "config.yaml")
    enc_path = os.path.join(run_dir, encoder_file)
    for path in (cfg_path, enc_path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"--run {run_dir}: missing {path}")
    with open(cfg_path) as f:
        cfg = yaml.safe_load(f) or {}
    try:  # registers tfdml's custom layers, if any
        import tfdml.models  # noqa: F401
    except Exception:
        pass
    encoder = keras.saving.load_model(enc_path, compile=False)
    model = cfg.get("model") or {}
    size = model.get("input_size", model.get("image_size"))
    shape = encoder.inputs[0].shape
    h, w, c = (int(s) for s in shape[1:])
    if size is not None and (int(size) != h or int(size) != w):
        raise ValueError(
            f"config.yaml model size {size} does not match the encoder "
            f"input {tuple(shape)}."
        )
    if "channels" in model and int(model["channels"]) != c:
        raise ValueError(
            f"config.yaml model.channels={model['channels']} does not match "
            f"the encoder input {tuple(shape)}."
        )
    return encoder, cfg, (h, w, c)


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


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
