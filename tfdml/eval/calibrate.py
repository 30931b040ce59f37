"""Similarity-threshold calibration for verification ("same class?").

:func:`calibrate` picks the cosine-similarity threshold ``t`` at which
"similarity >= t" predicts "same label" with a target precision (or the
best F1) on validation data, and reports precision, recall and F1 at it
with the whole precision-recall curve (``sklearn.metrics.
precision_recall_curve``). Two formulations:

* ``mode="pairs"`` (default): every (query, reference) pair is one
  prediction, relevant when the labels are equal; when the queries are the
  references, every unordered pair ``{i, j}``, ``i != j``, counts once
  (self-pairs excluded). This is the verification question "are these two
  items the same class?". Pairs grow quadratically (28k validation images:
  400M unordered pairs), so above ``max_pairs`` a uniform random sample of
  ``max_pairs`` distinct pairs (seeded) is used.
* ``mode="nearest"``: one prediction per query, its nearest reference,
  relevant when that neighbour has the query's label (TensorFlow
  Similarity's calibration works on each query's nearest match). This is
  the retrieval question "is my top match right?"; it needs only ``Q``
  scores, never a sample.

The threshold is applied as ``similarity >= threshold`` (the export's
``matched`` flag, :func:`tfdml.export.export_saved_model`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import numpy.typing as npt

from tfdml.eval.metrics import _prepare
from tfdml.validation import check_int

MODES = ("pairs", "nearest")
METRICS = ("f1",)
#: Default pair budget of ``mode="pairs"``: about 330 MB at its peak
#: (sampling, float64 scores, scikit-learn's sort and cumulative sums;
#: measured on 6000 x 128 embeddings, 18M pairs sampled down to 4M).
MAX_PAIRS = 4_000_000


class PrecisionUnreachableError(ValueError):
    """No threshold reaches :func:`calibrate`'s ``target_precision``.

    A ``ValueError`` (callers that catch those keep working) with what was
    reachable, so a caller can report it and go on without a threshold.

    Attributes:
      target_precision: the requested precision.
      best_precision: the highest precision any threshold reaches.
      best_threshold: the (lowest) threshold that reaches it.
    """

    def __init__(
        self,
        target_precision: float,
        best_precision: float,
        best_threshold: float,
    ):
        self.target_precision = float(target_precision)
        self.best_precision = float(best_precision)
        self.best_threshold = float(best_threshold)
        super().__init__(
            f"`target_precision`={self.target_precision} is not reached at "
            f"any threshold; the highest precision is "
            f"{self.best_precision:.4f} (at threshold "
            f"{self.best_threshold:.4f})."
        )


@dataclasses.dataclass
class CalibrationResult:
    """The output of :func:`calibrate`.

    Attributes:
      threshold: similarity threshold (predict "match" when
        ``similarity >= threshold``).
      precision, recall, f1: at ``threshold`` on the calibration data.
      target_precision: the requested precision, or None (best F1).
      mode: ``"pairs"`` or ``"nearest"``.
      num_pairs: predictions the curve is computed on.
      num_positive: relevant ones among them.
      sampled: whether the pairs are a random sample (``max_pairs``).
      thresholds, precisions, recalls: the PR curve, one entry per distinct
        score, thresholds increasing (scikit-learn's order, without its
        final ``(precision 1, recall 0)`` point).
    """

    threshold: float
    precision: float
    recall: float
    f1: float
    target_precision: float | None
    mode: str
    num_pairs: int
    num_positive: int
    sampled: bool
    thresholds: np.ndarray
    precisions: np.ndarray
    recalls: np.ndarray

    def to_dict(self, curve: bool = False) -> dict[str, Any]:
        """Plain-Python summary (JSON-ready); ``curve=True`` adds the
        curve arrays as lists."""
        out = {
            k: getattr(self, k)
            for k in (
                "threshold",
                "precision",
                "recall",
                "f1",
                "target_precision",
                "mode",
                "num_pairs",
                "num_positive",
                "sampled",
            )
        }
        if curve:
            for k in ("thresholds", "precisions", "recalls"):
                out[k] = getattr(self, k).tolist()
        return out


def _unit64(x):
    """Float64 L2-normalised rows: float32 similarities would tie (or swap)
    distinct pairs closer than ~1e-7, and the sweep would depend on it."""
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _check_flat_labels(ql, rl):
    if np.ndim(ql) != 1 or np.ndim(rl) != 1:
        raise ValueError(
            "`query_labels` / `ref_labels` must be integer class ids [N] "
            "(calibration decides 'same class'); received shapes "
            f"{np.shape(ql)} and {np.shape(rl)}."
        )


def _f1(p, r):
    with np.errstate(invalid="ignore", divide="ignore"):
        f = 2 * p * r / (p + r)
    return np.where(p + r > 0, f, 0.0)


def _pair_scores(q, ql, r, rl, own, max_pairs, seed, block):
    """(scores, relevant, sampled) of query x reference pairs; ``own``
    (queries are the references): the unordered pairs ``i < j``."""
    nq, nr = len(q), len(r)
    # Pairs of query i: references 0..nr-1, or i+1..nq-1 when own.
    per_row = nr - 1 - np.arange(nq) if own else np.full(nq, nr)
    total = int(per_row.sum())
    if total <= max_pairs:
        scores, rel = [], []
        for s in range(0, nq, block):
            sim = q[s : s + block] @ r.T
            same = ql[s : s + block, None] == rl[None, :]
            if own:
                keep = (
                    np.arange(nr)[None, :] > np.arange(s, s + len(sim))[:, None]
                )
                sim, same = sim[keep], same[keep]
            scores.append(sim.ravel())
            rel.append(same.ravel())
        return np.concatenate(scores), np.concatenate(rel), False
    rng = np.random.default_rng(seed)
    flat = np.sort(rng.choice(total, size=max_pairs, replace=False))
    starts = np.concatenate([[0], np.cumsum(per_row)[:-1]])
    i = np.searchsorted(starts, flat, side="right") - 1
    j = flat - starts[i] + (i + 1 if own else 0)
    scores = np.empty(max_pairs, np.float64)
    for s in range(0, max_pairs, block * 64):
        e = s + block * 64
        scores[s:e] = np.einsum("ij,ij->i", q[i[s:e]], r[j[s:e]])
    return scores, ql[i] == rl[j], True


def _nearest_scores(q, ql, r, rl, self_idx, block):
    """(top-1 similarity, top-1 relevant) of every query."""
    scores = np.empty(len(q), np.float64)
    rel = np.empty(len(q), bool)
    for s in range(0, len(q), block):
        sim = q[s : s + block] @ r.T
        rows = np.flatnonzero(self_idx[s : s + block] >= 0)
        sim[rows, self_idx[s : s + block][rows]] = -np.inf
        best = np.argmax(sim, axis=1)  # ties: the lowest reference index
        scores[s : s + block] = sim[np.arange(len(sim)), best]
        rel[s : s + block] = ql[s : s + block] == rl[best]
    return scores, rel


def _scores(q, ql, r, rl, mode, max_pairs, seed, block):
    """``(scores, relevant, sampled)`` of the calibration predictions:
    every (or a sample of the) query-reference pair (``"pairs"``) or each
    query's nearest reference (``"nearest"``), in float64."""
    own = r is None
    q, ql, r, rl, self_idx = _prepare(
        q, ql, r, rl, exclude_self=None, normalize=False
    )
    q, r = _unit64(q), _unit64(r)
    _check_flat_labels(ql, rl)
    if mode == "pairs":
        return _pair_scores(q, ql, r, rl, own, max_pairs, seed, block)
    if len(r) - (1 if own else 0) < 1:
        raise ValueError(
            "`mode='nearest'` needs at least one reference per query; "
            f"received {len(r)} references."
        )
    scores, rel = _nearest_scores(q, ql, r, rl, self_idx, block)
    return scores, rel, False


def calibrate(
    query_embeddings: npt.ArrayLike,
    query_labels: npt.ArrayLike,
    ref_embeddings: npt.ArrayLike | None = None,
    ref_labels: npt.ArrayLike | None = None,
    target_precision: float | None = None,
    metric: str = "f1",
    mode: str = "pairs",
    max_pairs: int = MAX_PAIRS,
    seed: int = 0,
    block_size: int = 512,
) -> CalibrationResult:
    """Finds the similarity threshold for a target precision or best F1.

    Embeddings are L2-normalised (cosine similarity). With
    ``target_precision`` the threshold is the *lowest* one whose precision
    is ``>= target_precision`` (the highest recall that keeps the
    precision); without it, the threshold of the best ``metric`` (F1; ties:
    the highest threshold).

    Args:
      query_embeddings: ``[Q, d]`` float.
      query_labels: ``[Q]`` int class ids.
      ref_embeddings: ``[N, d]`` references, or None: the queries are their
        own references; ``mode="pairs"`` then uses each unordered pair
        ``{i, j}`` (``i != j``) once, ``mode="nearest"`` excludes the query
        itself.
      ref_labels: ``[N]`` int, given together with ``ref_embeddings``.
      target_precision: a precision in (0, 1], or None for the best F1.
      metric: what to maximise without a target: ``"f1"``.
      mode: ``"pairs"`` (every query x reference pair) or ``"nearest"``
        (each query's nearest reference); see the module docstring.
      max_pairs: ``mode="pairs"`` only: above this many pairs, a uniform
        sample of ``max_pairs`` distinct pairs (``seed``) is used.
      seed: the sample's seed.
      block_size: queries per similarity block (memory).

    Returns:
      A :class:`CalibrationResult`.

    Raises:
      ValueError: naming the argument, for bad shapes, dtypes or values,
        NaN / Inf embeddings, no relevant or no irrelevant prediction (a
        threshold is then meaningless), or a ``target_precision`` that no
        threshold reaches (:class:`PrecisionUnreachableError`, a
        ``ValueError`` whose message gives the highest precision reached).
    """
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}; received {mode!r}.")
    if metric not in METRICS:
        raise ValueError(
            f"`metric` must be one of {METRICS}; received {metric!r}."
        )
    if target_precision is not None:
        if isinstance(target_precision, bool) or not isinstance(
            target_precision, (int, float, np.floating, np.integer)
        ):
            raise ValueError(
                "`target_precision` must be a number in (0, 1] or None; "
                f"received {target_precision!r}."
            )
        if not 0.0 < float(target_precision) <= 1.0:  # NaN fails too
            raise ValueError(
                "`target_precision` must be in (0, 1]; received "
                f"{target_precision!r}."
            )
        target_precision = float(target_precision)
    check_int("max_pairs", max_pairs)
    check_int("block_size", block_size)
    scores, rel, sampled = _scores(
        query_embeddings,
        query_labels,
        ref_embeddings,
        ref_labels,
        mode,
        int(max_pairs),
        seed,
        int(block_size),
    )
    npos = int(rel.sum())
    if npos == 0 or npos == len(rel):
        what = "relevant (same-label)" if npos == 0 else "irrelevant"
        raise ValueError(
            f"`query_labels` / `ref_labels` give no {what} {mode} among "
            f"{len(rel)}; calibration needs both kinds (more than one class "
            "and more than one item per class)."
        )
    from sklearn.metrics import precision_recall_curve

    p, rc, t = precision_recall_curve(rel, scores)
    p, rc = p[:-1], rc[:-1]  # the last point has no threshold
    f = _f1(p, rc)
    if target_precision is not None:
        ok = np.flatnonzero(p >= target_precision)
        if not len(ok):
            i = int(np.argmax(p))
            raise PrecisionUnreachableError(target_precision, p[i], t[i])
        best = ok[0]  # thresholds increase: the lowest, most recall
    else:
        best = len(f) - 1 - int(np.argmax(f[::-1]))  # ties: highest t
    return CalibrationResult(
        threshold=float(t[best]),
        precision=float(p[best]),
        recall=float(rc[best]),
        f1=float(f[best]),
        target_precision=target_precision,
        mode=mode,
        num_pairs=int(len(rel)),
        num_positive=npos,
        sampled=bool(sampled),
        thresholds=np.asarray(t, np.float64),
        precisions=np.asarray(p, np.float64),
        recalls=np.asarray(rc, np.float64),
    )


def precision_recall_at(
    threshold: float,
    query_embeddings: npt.ArrayLike,
    query_labels: npt.ArrayLike,
    ref_embeddings: npt.ArrayLike | None = None,
    ref_labels: npt.ArrayLike | None = None,
    mode: str = "pairs",
    max_pairs: int = MAX_PAIRS,
    seed: int = 0,
    block_size: int = 512,
) -> dict[str, float | int]:
    """``{"precision", "recall", "f1", "num_pairs"}`` of a given threshold
    (e.g. one calibrated on validation data, checked on test data), on the
    predictions of :func:`calibrate` (same ``mode`` / sampling).
    Precision is NaN when nothing reaches the threshold."""
    t = float(threshold)
    if not np.isfinite(t):
        raise ValueError(f"`threshold` must be finite; received {threshold!r}.")
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}; received {mode!r}.")
    scores, rel, _ = _scores(
        query_embeddings,
        query_labels,
        ref_embeddings,
        ref_labels,
        mode,
        int(max_pairs),
        seed,
        int(block_size),
    )
    pred = scores >= t
    tp = int((pred & rel).sum())
    p = tp / pred.sum() if pred.any() else float("nan")
    rc = tp / rel.sum() if rel.any() else float("nan")
    if np.isnan(p):
        f = float("nan")
    else:
        f = 2 * p * rc / (p + rc) if p + rc > 0 else 0.0
    return {
        "precision": float(p),
        "recall": float(rc),
        "f1": float(f),
        "num_pairs": int(len(rel)),
    }
