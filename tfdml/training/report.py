"""What a finished run reports: the final encoder, the test evaluation
(``eval_test.json``), plots, the optional export (with its calibrated
verification threshold), and the export of a run folder
(``export/export.py``).
"""

import json
import os

import numpy as np

from tfdml.training import run_dir as run_dir_lib
from tfdml.training.build import eval_metrics
from tfdml.training.build import plain
from tfdml.training.callbacks import recalibrate


def embed_dataset(encoder, ds):
    """``(embeddings float32 [N, d], labels int32 [N])`` of a dataset of
    ``(images, labels)`` batches (:func:`tfdml.eval.embed`)."""
    from tfdml.eval.embed import embed

    emb, y = embed(encoder, ds, batched=True, return_labels=True)
    return emb, np.asarray(y, np.int32).reshape(-1)


def evaluate_split(cfg, encoder, ds):
    """Retrieval metrics of ``encoder`` on ``ds`` (queries = references)."""
    from tfdml import eval as eval_lib

    emb, y = embed_dataset(encoder, ds)
    metrics = eval_lib.retrieval_metrics(
        emb,
        y,
        recall_at=cfg["eval"]["recall_at"],
        method="scann" if cfg["eval"]["index"] == "scann" else "exact",
        seed=cfg["train"]["seed"],
        metrics=eval_metrics(cfg),
    )
    return {k: plain(v) for k, v in metrics.items()}, emb, y


def finish(cfg, built, parts, run_dir, state):
    """final_encoder.keras, eval_test.json, plots and the optional export."""
    import keras

    final_path = os.path.join(run_dir, "final_encoder.keras")
    # Precise BN before the final encoder is saved, tested and exported.
    recalibrate(cfg, built, parts.encoder)
    parts.encoder.save(final_path)
    ds = built.data.eval_dataset("test", cfg["eval"]["batch_size"])
    report = {
        "classes": "test (never used for model selection)",
        "best_epoch": state.best_epoch,
        "best_val": state.best,
        "monitor": "val_" + cfg["eval"]["monitor"],
    }
    report["final"], emb, y = evaluate_split(cfg, parts.encoder, ds)
    report["num_queries"] = int(len(y))
    report["num_classes"] = int(len(np.unique(y)))
    best_path = os.path.join(run_dir, "best_encoder.keras")
    if os.path.exists(best_path):
        best = keras.saving.load_model(best_path, compile=False)
        report["best"], _, _ = evaluate_split(cfg, best, ds)
    calibration = None
    if cfg["export"]["enabled"]:
        calibration = calibrate_threshold(cfg, built, parts.encoder, emb, y)
        if calibration is not None:
            report["calibration"] = calibration["summary"]
    run_dir_lib.atomic_write(
        os.path.join(run_dir, "eval_test.json"), json.dumps(report, indent=2)
    )
    if cfg["eval"]["plots"]:
        n = min(len(y), 2000)
        x, _ = built.data.arrays("test", limit=n)
        _plots(cfg, run_dir, emb[:n], x, y[:n], report, calibration)
    if cfg["export"]["enabled"]:
        threshold = calibration["summary"]["threshold"] if calibration else None
        export_encoder(cfg, run_dir, parts.encoder, emb, y, threshold)
    _print_summary(report)
    return report


def calibrate_threshold(cfg, built, encoder, test_emb, test_labels):
    """The export's verification threshold: ``export.threshold``, or
    calibrated on the validation classes for ``export.target_precision``
    (:func:`tfdml.eval.calibrate`), with its precision / recall on the test
    classes. None when neither is set.

    A target precision that no threshold reaches on the validation
    classes does not fail the run (it is known only now, after training):
    a warning names the highest precision reached, the summary has
    ``threshold: None``, ``reached: False`` and that best precision /
    threshold, and the export goes ahead without a threshold (no
    ``matched`` output).

    Returns:
      ``{"summary": JSON-ready dict, "result": CalibrationResult or None}``.
    """
    from tfdml.eval import PrecisionUnreachableError
    from tfdml.eval import calibrate
    from tfdml.eval import precision_recall_at

    ex = cfg["export"]
    mode = ex["calibration_mode"]
    seed = cfg["train"]["seed"]
    if ex["target_precision"] is not None:
        val_ds = built.data.eval_dataset("val", cfg["eval"]["batch_size"])
        val_emb, val_y = embed_dataset(encoder, val_ds)
        try:
            result = calibrate(
                val_emb,
                val_y,
                target_precision=ex["target_precision"],
                mode=mode,
                seed=seed,
            )
        except PrecisionUnreachableError as e:
            return _unreachable(e, mode)
        summary = {"split": "val", "reached": True, **result.to_dict()}
    elif ex["threshold"] is not None:
        result = None
        summary = {"split": None, "threshold": ex["threshold"], "mode": mode}
    else:
        return None
    summary["test"] = precision_recall_at(
        summary["threshold"], test_emb, test_labels, mode=mode, seed=seed
    )
    return {"summary": plain(summary), "result": result}


def _unreachable(err, mode):
    """The calibration summary (and warning) of an unreachable
    ``export.target_precision``: no threshold, export without one."""
    import warnings

    msg = (
        f"export.target_precision={err.target_precision} is not reached on "
        f"the validation classes ({mode}): the highest precision is "
        f"{err.best_precision:.4f} (at threshold {err.best_threshold:.4f}). "
        "Exporting WITHOUT a threshold (the search signatures have no "
        "'matched'); eval_test.json records calibration.threshold = null. "
        "Lower export.target_precision, or set export.threshold, and "
        "re-export with export/export.py."
    )
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    print(f"WARNING: {msg}")
    summary = {
        "split": "val",
        "reached": False,
        "threshold": None,
        "target_precision": err.target_precision,
        "best_precision": err.best_precision,
        "best_threshold": err.best_threshold,
        "mode": mode,
        "note": "target precision not reached; exported without a threshold",
    }
    return {"summary": summary, "result": None}


def _plots(cfg, run_dir, emb, x, y, report, calibration=None):
    from tfdml.eval import plots

    out = os.path.join(run_dir, "plots")
    os.makedirs(out, exist_ok=True)
    history = os.path.join(run_dir, run_dir_lib.HISTORY_FILE)
    if os.path.exists(history):
        try:
            plots.plot_training_curves(
                history,
                os.path.join(out, "training_curves.png"),
                monitor="val_" + cfg["eval"]["monitor"],
            )
        except ValueError as e:  # e.g. a history without any column
            print(f"training_curves.png not written: {e}")
    if calibration is not None and calibration["result"] is not None:
        plots.plot_precision_recall(
            calibration["result"],
            os.path.join(out, "precision_recall.png"),
            title="Precision-recall (validation)",
        )
    plots.plot_recall_at_k(
        {
            "final": report["final"],
            **({"best": report["best"]} if "best" in report else {}),
        },
        os.path.join(out, "recall_at_k.png"),
    )
    plots.retrieval_grid_from_embeddings(
        emb,
        y,
        x,
        os.path.join(out, "retrieval_grid.png"),
        seed=cfg["train"]["seed"],
    )


def export_encoder(cfg, run_dir, encoder, db_emb, db_labels, threshold=None):
    from tfdml import export as export_lib

    out = cfg["export"]["dir"] or os.path.join(run_dir, "export")
    index = cfg["export"]["index"]
    written = export_lib.export_saved_model(
        encoder,
        out,
        gallery=db_emb,
        gallery_labels=db_labels,
        index="brute_force" if index == "bruteforce" else index,
        threshold=threshold,
    )
    print(f"exported SavedModel(s): {written}")
    return written


def _print_summary(report):
    keys = [k for k in report["final"] if isinstance(report["final"][k], float)]
    print("\ntest classes (reported only):")
    print(f"  {'metric':<16}{'final':>10}{'best(val)':>12}")
    for k in keys:
        best = report.get("best", {}).get(k)
        b = f"{best:12.4f}" if isinstance(best, float) else f"{'-':>12}"
        print(f"  {k:<16}{report['final'][k]:10.4f}{b}")


# -- export of a run folder (export/export.py) --


def load_run(run_dir, encoder_file="best_encoder.keras"):
    """(encoder, resolved config dict, (H, W, C)).

    Raises:
      tfdml.training.run_dir.RunDirError: not a tfdml run, a missing
        encoder, or an encoder that does not match the config.
    """
    cfg = run_dir_lib.read_config(run_dir)
    encoder, shape = run_dir_lib.load_encoder(run_dir, encoder_file, cfg)
    return encoder, cfg, shape


def load_gallery(gallery, cfg):
    """(X, y, ids or None) from an .npz or tfdml.data's test split."""
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


def export_run(
    run,
    out,
    gallery=None,
    index="brute_force",
    name="tfdml",
    version=1,
    k=10,
    threshold=None,
    target_precision=None,
    calibration_mode=None,
):
    """Exports a loaded run (:func:`load_run`) with the gallery of
    :func:`load_gallery` as ``out/<name>/<version>/``.

    The search signatures return ``matched`` when a verification threshold
    is given: ``threshold``, or one calibrated for ``target_precision`` on
    the run's validation classes (:func:`tfdml.eval.calibrate`,
    ``calibration_mode`` ``"pairs"`` / ``"nearest"``); with neither, the
    run config's ``export.threshold`` / ``export.target_precision``.

    Returns:
      ``{variant: path}`` of the written SavedModel(s).

    Raises:
      ValueError: a bad gallery (nothing written); the message names
        ``--gallery`` when one was given.
    """
    from tfdml.export import saved_model

    encoder, cfg, (h, w, c) = run
    x, y, ids = load_gallery(gallery, cfg)
    where = f"--gallery {gallery}: " if gallery else ""
    names = ("X", "y", "ids") if gallery else ("images", "labels", "ids")
    try:
        saved_model.validate_gallery(x, y, ids, names=names)
    except ValueError as e:
        raise ValueError(f"{where}{e}") from None
    images = saved_model.images_to_float(x, h, w, c)
    threshold = _export_threshold(
        encoder, cfg, threshold, target_precision, calibration_mode
    )
    return saved_model.export_saved_model(
        encoder,
        out,
        gallery_images=images,
        gallery_labels=y,
        gallery_ids=ids,
        index=index,
        name=name,
        version=version,
        k=k,
        threshold=threshold,
    )


def _export_threshold(encoder, cfg, threshold, target_precision, mode):
    """The export's threshold (see :func:`export_run`), or None."""
    from tfdml.export import saved_model

    if threshold is not None and target_precision is not None:
        raise ValueError(
            "give --threshold or --target-precision, not both; received "
            f"{threshold} and {target_precision}."
        )
    ex = cfg.get("export") or {}
    if threshold is None and target_precision is None:
        threshold = ex.get("threshold")
        target_precision = ex.get("target_precision")
    mode = mode or ex.get("calibration_mode") or "pairs"
    if target_precision is None:
        return saved_model.check_threshold(threshold)
    from tfdml.data import load_split_arrays
    from tfdml.eval import calibrate
    from tfdml.eval.embed import embed

    h, w, c = saved_model._encoder_geometry(encoder)
    x, y = load_split_arrays(cfg, "val")[:2]
    emb = embed(encoder, saved_model.images_to_float(x, h, w, c, "val"))
    result = calibrate(
        emb,
        np.asarray(y).reshape(-1),
        target_precision=target_precision,
        mode=mode,
        seed=(cfg.get("train") or {}).get("seed", 0),
    )
    print(
        f"calibrated on the validation classes ({mode}): threshold "
        f"{result.threshold:.4f}, precision {result.precision:.4f}, recall "
        f"{result.recall:.4f}"
    )
    return result.threshold
