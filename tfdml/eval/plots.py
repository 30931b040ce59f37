"""PNG plots for a run folder (matplotlib, Agg backend)."""

import os

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_recall_at_k(results_by_name, path, title="Recall@K"):
    """One Recall@K curve per entry of ``{name: metrics_dict}``.

    ``metrics_dict`` is the output of ``retrieval_metrics`` (keys
    ``recall@K``); other keys are ignored. Returns ``path``.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    for name, m in results_by_name.items():
        ks = sorted(int(k.split("@")[1]) for k in m if k.startswith("recall@"))
        if not ks:
            raise ValueError(
                f"`results_by_name[{name!r}]` has no recall@K keys; "
                f"received keys {sorted(m)}."
            )
        ax.plot(ks, [m[f"recall@{k}"] for k in ks], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _show(ax, img, color=None, label=None):
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 1)
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
    ax.set_xticks([])
    ax.set_yticks([])
    if color is not None:
        for s in ax.spines.values():
            s.set_edgecolor(color)
            s.set_linewidth(4)
    if label is not None:
        ax.set_title(str(label), fontsize=7)


def plot_retrieval_grid(
    query_images, query_labels, ref_images, ref_labels, neighbors, path
):
    """Queries (first column) with their retrieved references.

    Args:
      query_images: ``[Q, H, W(, C)]`` uint8 or float in [0, 1].
      query_labels: ``[Q]``.
      ref_images: ``[N, H, W(, C)]``.
      ref_labels: ``[N]``.
      neighbors: ``[Q, k]`` int indices into the references, best first.
      path: output PNG.

    A hit (same label as the query) is framed green, a miss red.
    """
    plt = _plt()
    nb = np.asarray(neighbors)
    ql = np.asarray(query_labels)
    rl = np.asarray(ref_labels)
    if nb.ndim != 2 or len(nb) != len(query_images):
        raise ValueError(
            f"`neighbors` must have shape [{len(query_images)}, k]; "
            f"received {nb.shape}."
        )
    q, k = nb.shape
    fig, axes = plt.subplots(
        q, k + 1, figsize=(1.2 * (k + 1), 1.3 * q), dpi=100, squeeze=False
    )
    for i in range(q):
        _show(axes[i, 0], query_images[i], "black", f"query {ql[i]}")
        for j in range(k):
            n = nb[i, j]
            hit = rl[n] == ql[i]
            _show(
                axes[i, j + 1], ref_images[n], "green" if hit else "red", rl[n]
            )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def retrieval_grid_from_embeddings(
    embeddings, labels, images, path, num_queries=8, k=5, seed=0
):
    """Self-retrieval grid: picks queries, finds top-k (self excluded)."""
    emb = np.asarray(embeddings, np.float32)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(emb), min(num_queries, len(emb)), False))
    s = emb[pick] @ emb.T
    s[np.arange(len(pick)), pick] = -np.inf
    k = min(k, len(emb) - 1)
    nb = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return plot_retrieval_grid(
        np.asarray(images)[pick],
        np.asarray(labels)[pick],
        images,
        labels,
        nb,
        path,
    )


def plot_precision_recall(calibration, path, title="Precision-recall"):
    """The precision-recall curve of :func:`tfdml.eval.calibrate` with its
    chosen threshold marked. ``calibration``: a ``CalibrationResult`` (or
    its ``to_dict(curve=True)``). Returns ``path``."""
    c = calibration if isinstance(calibration, dict) else vars(calibration)
    for key in ("precisions", "recalls", "threshold", "precision", "recall"):
        if key not in c:
            raise ValueError(
                f"`calibration` has no {key!r}; pass the result of "
                "tfdml.eval.calibrate (or its to_dict(curve=True))."
            )
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 3.5), dpi=100)
    ax.plot(c["recalls"], c["precisions"], lw=1.5, label=c.get("mode", ""))
    label = f"t = {c['threshold']:.3f}: P {c['precision']:.3f}, "
    label += f"R {c['recall']:.3f}"
    ax.plot([c["recall"]], [c["precision"]], "o", color="red", label=label)
    if c.get("target_precision") is not None:
        ax.axhline(c["target_precision"], color="gray", ls="--", lw=0.8)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def read_history(path):
    """``{column: [float per row]}`` of a Keras ``CSVLogger`` file (empty
    cells, e.g. epochs without an evaluation, are NaN)."""
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"`{path}` has no rows (no epoch finished).")

    def num(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return float("nan")

    return {k: [num(r.get(k)) for r in rows] for k in rows[0]}


def plot_training_curves(history, path, monitor="val_map@r"):
    """Training curves per epoch: the loss, the mean positive / negative
    similarity (``pos_sim`` / ``neg_sim``) and the validation ``monitor``,
    one panel each (panels whose columns are absent are left out).

    Args:
      history: a ``CSVLogger`` file (``history.csv``) or ``{column:
        values}`` with an ``epoch`` column (0-based).
      path: output PNG.
      monitor: the validation column of the third panel.

    Returns ``path``.
    """
    h = (
        read_history(history)
        if isinstance(history, (str, os.PathLike))
        else history
    )
    if "epoch" not in h:
        raise ValueError(
            f"`history` has no 'epoch' column; received columns {sorted(h)}."
        )
    epochs = np.asarray(h["epoch"], np.float64) + 1
    panels = [
        ("loss", [("loss", "loss")]),
        ("similarity", [("pos_sim", "positive"), ("neg_sim", "negative")]),
        (monitor, [(monitor, monitor)]),
    ]
    panels = [(t, [c for c in cols if c[0] in h]) for t, cols in panels]
    panels = [p for p in panels if p[1]]
    if not panels:
        raise ValueError(
            f"`history` has none of loss, pos_sim, neg_sim, {monitor}; "
            f"received columns {sorted(h)}."
        )
    plt = _plt()
    fig, axes = plt.subplots(
        1, len(panels), figsize=(3.6 * len(panels), 3.2), dpi=100, squeeze=False
    )
    for ax, (title, cols) in zip(axes[0], panels):
        for key, label in cols:
            v = np.asarray(h[key], np.float64)
            ok = np.isfinite(v)
            ax.plot(epochs[ok], v[ok], marker="o", ms=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if len(cols) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
