"""IAA: intra-class adaptive augmentation with neighbour correction.

Fu, Zhao, Li, Zhang and Wang, "Intra-class Adaptive Augmentation with Neighbor
Correction for Deep Metric Learning", IEEE TMM 2023 (arXiv 2211.16264).
Official code: github.com/darkpromise98/IAA (``intra.py``, ``run.py``).

Three pieces:

* :class:`IAAEstimator` (paper Eq. 7-8): per-class mean and **diagonal**
  variance of the embedding head's raw output (before L2 normalisation),
  merged online after each full pass over the training data with the
  ISDA-style momentum rule::

    w = max(n_new / (n_new + n_old), 1 - momentum)   (0 for absent classes)
    var  <- (1 - w) var + w var_new + w (1 - w) (mu_old - mu_new)**2
    mu   <- (1 - w) mu_old + w mu_new;   n_old <- n_old + n_new

  The first estimate has ``w = 1`` (the population variance).
* :func:`neighbor_correction` (Eq. 9-16): for label spaces larger than
  ``correction_threshold`` classes, each class's variance is pulled towards
  a weighted mean of its ``K`` nearest classes (by the distance between
  squared means) and a global variance::

    w_i   = n_i exp(-D_m(k,i)**2 / (2 s_m**2) - D_cv(k,i)**2 / (2 s_cv**2))
    S_nb  = sum_i w_i var_i / sum_i w_i;  S_glob = sum n_k var_k / sum n_k
    a_k   = 1 / (1 + ln(1 + beta (n_k - 1)))  if n_k <= tau else 0
    var^cr_k = (1 - a_k) var_k + a_k ((1 - gamma) S_nb + gamma S_glob)

* :class:`IAAugmenter` (Eq. 17): ``M`` synthetic copies per sample,
  ``z_hat = z + sqrt(lambda) sigma_y * eps`` with a *dynamic* mean (the
  sample itself; gradients flow into ``z``, ``sigma`` is a constant),
  L2-normalised and used as extra **references** (never anchors) by
  :class:`tfdml.models.DMLModel`. Each copy carries the example id of its
  source, so :func:`tfdml.ops.pair_masks` excludes an anchor's own copies
  from its positives while the copies of other same-class samples are
  positives: exactly the IAA mask (``eye(n)`` tiled over the copy blocks).

:class:`IAARefresh` (a Keras callback) runs the estimation pass on schedule.

Paper behaviour is the default. ``official_code=True`` reproduces the
released code instead:

1. the neighbour correction is computed (and kept in the estimator's
   variables) but **not applied** -- ``distribution_calibration`` is never
   called in the official code, so synthesis uses the uncorrected variance;
2. the per-class std is square-rooted **again** for every copy: copy ``m``
   (1-based) uses ``sqrt(lambda) * var**(1 / 2**m)``, i.e. ``sigma``,
   ``sigma**0.5``, ``sigma**0.25``, ...;
3. refresh every 2 epochs from epoch 30 (Keras epochs 30, 32, ... = the
   code's 1-based epochs 31, 33, ...) instead of every 4 epochs;
4. the step schedule of lambda (:func:`official_lambda`);
5. ``a_k`` uses the strict ``n_k < tau``;
6. distance rows are max-min normalised to [0, 1] over all classes before
   the Gaussian kernel (the excluded classes' ``1e12`` sentinels included,
   so the mean-distance term is ~1 and only the covariance term matters);
7. in the corrected (large label space) path, singleton classes are not
   merged (their variance stays 0, as in ``update_each_class``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np
import numpy.typing as npt
import tensorflow as tf

from tfdml import registry
from tfdml.data.pipeline import without_autotune
from tfdml.validation import check_int
from tfdml.variables import state_variable

BIG_NUMBER = 1e12  # the official code's sentinel for excluded neighbours


def _in_range(name, value, low, high, low_open=False):
    ok = value is not None and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(
            f"`{name}` must be in {bracket}{low}, {high}]; received "
            f"{name}={value!r}."
        )
    return value


def adaptive_weight(
    counts: tf.Tensor | npt.ArrayLike,
    beta: float = 0.1,
    tau: float = 40,
    strict: bool = False,
) -> tf.Tensor:
    """The correction strength ``a(n)`` of paper Eq. 16 (numpy or tensor).

    ``a(n) = 1 / (1 + ln(1 + beta (n - 1)))`` for ``n <= tau`` (``n < tau``
    with ``strict=True``, the official code), else 0. ``n`` is clipped to
    at least 1 (a class absent from the pass is treated as a singleton).

    Values with the defaults: n=1 -> 1.000, 2 -> 0.913, 3 -> 0.846,
    5 -> 0.748, 10 -> 0.609, 20 -> 0.484, 39 -> 0.389, 40 -> 0.386 (paper)
    or 0 (strict), 41 -> 0.
    """
    n = tf.maximum(tf.cast(counts, tf.float64), 1.0)
    a = 1.0 / (1.0 + tf.math.log(1.0 + beta * (n - 1.0)))
    keep = n < tau if strict else n <= tau
    return tf.where(keep, a, tf.zeros_like(a))


def official_lambda(lam: float, epoch: int, epochs: int) -> float:
    """The official code's lambda step schedule (``intra.py::lamda_epoch``).

    Args:
      lam: the base lambda.
      epoch: the **1-based** epoch (the code's ``ep``; Keras epoch + 1).
      epochs: total number of epochs ``T``.

    Returns ``lam * {1.0 if t/T <= 0.4; 0.9 if <= 0.6; 0.75 if <= 0.8;
    0.6 otherwise}``.
    """
    check_int("epochs", epochs)
    ratio = epoch / epochs
    if ratio <= 0.4:
        factor = 1.0
    elif ratio <= 0.6:
        factor = 0.9
    elif ratio <= 0.8:
        factor = 0.75
    else:
        factor = 0.6
    return factor * float(lam)


def stateless_normal(shape, seed):
    """Standard normal noise that is bit-identical in eager, graph and XLA.

    ``tf.random.stateless_normal`` draws different numbers under XLA; the
    Philox integer stream does not, so the normals are made from it with
    the Box-Muller transform (24-bit uniforms in (0, 1)).
    """
    bits = tf.random.stateless_uniform(
        tf.concat([[2], shape], 0),
        seed=seed,
        minval=None,
        maxval=None,
        dtype=tf.uint32,
        alg="philox",
    )
    top = tf.cast(tf.bitwise.right_shift(bits, 8), tf.int32)
    u = (tf.cast(top, tf.float32) + 0.5) * (1.0 / 2**24)
    radius = tf.sqrt(-2.0 * tf.math.log(u[0]))
    return radius * tf.cos((2.0 * math.pi) * u[1])


def _cdist(a, b):
    """Euclidean distances ``[r, C]`` (float64, clipped at 0)."""
    sq = (
        tf.reduce_sum(a * a, 1, keepdims=True)
        - 2.0 * tf.matmul(a, b, transpose_b=True)
        + tf.reduce_sum(b * b, 1)[None, :]
    )
    return tf.sqrt(tf.maximum(sq, 0.0))


def _maxmin(x):
    lo = tf.reduce_min(x, 1, keepdims=True)
    hi = tf.reduce_max(x, 1, keepdims=True)
    return tf.math.divide_no_nan(x - lo, hi - lo)


def neighbor_correction(
    mean: tf.Tensor | npt.ArrayLike,
    variance: tf.Tensor | npt.ArrayLike,
    counts: tf.Tensor | npt.ArrayLike,
    num_neighbors: int = 25,
    beta: float = 0.1,
    gamma: float = 0.1,
    tau: float = 40,
    sigma_m: float = 1.0,
    sigma_cv: float = 1.0,
    official_code: bool = False,
    chunk_size: int = 1024,
) -> dict[str, tf.Tensor]:
    """Neighbour-corrected diagonal variances (paper Eq. 9-16), float64.

    Args:
      mean: ``[C, d]`` class means of the raw embeddings.
      variance: ``[C, d]`` class variances (diagonal).
      counts: ``[C]`` samples per class in the estimation pass (``n_k``).
      num_neighbors: ``K``; at most ``C - 1`` are used.
      beta, gamma, tau: Eq. 16 and Eq. 15 constants.
      sigma_m, sigma_cv: kernel widths of the mean / covariance distances.
      official_code: max-min normalised distance rows and strict
        ``n < tau`` (see the module docstring).
      chunk_size: rows of the ``[C, C]`` distance matrices computed at once.

    Neighbours of class k are the K classes with the smallest
    ``D_m = ||mu_k**2 - mu_i**2||`` excluding k itself and classes with
    ``n <= 1``. ``Sigma_global`` averages the classes with ``n != 1``
    weighted by ``n``. The neighbour weights are computed in log space
    (``log n_i - D_m**2/2s_m**2 - D_cv**2/2s_cv**2``, then normalised), so
    they never all underflow on raw-scale embeddings.

    Returns a dict of tensors: ``corrected [C, d]``, ``neighbor_variance
    [C, d]``, ``global_variance [d]``, ``class_weight [C]`` (``a_k``),
    ``neighbor_indices [C, K]`` and ``neighbor_weights [C, K]`` (normalised
    to sum 1 per row; 0 for excluded neighbours).
    """
    mean = tf.cast(tf.convert_to_tensor(mean), tf.float64)
    var = tf.cast(tf.convert_to_tensor(variance), tf.float64)
    n = tf.cast(tf.convert_to_tensor(counts), tf.float64)
    num_classes = int(mean.shape[0])
    if num_classes < 2:
        raise ValueError(
            "neighbor_correction needs at least 2 classes; received "
            f"{num_classes}."
        )
    k = min(check_int("num_neighbors", num_neighbors), num_classes - 1)
    eligible = n > 1.0
    not_single = tf.not_equal(n, 1.0)
    w_glob = tf.where(not_single, n, tf.zeros_like(n))
    global_var = tf.math.divide_no_nan(
        tf.reduce_sum(w_glob[:, None] * var, 0), tf.reduce_sum(w_glob)
    )
    a = adaptive_weight(n, beta, tau, strict=official_code)
    sq_mean = mean * mean
    parts = {"nb": [], "idx": [], "w": []}
    for r0 in range(0, num_classes, chunk_size):
        r1 = min(r0 + chunk_size, num_classes)
        rows = tf.range(r0, r1)
        cols = tf.range(num_classes)
        is_self = tf.equal(rows[:, None], cols[None, :])
        excluded = tf.logical_or(is_self, ~eligible[None, :])
        d_m = _cdist(sq_mean[r0:r1], sq_mean)
        d_m = d_m + tf.cast(excluded, tf.float64) * BIG_NUMBER
        d_cv = tf.where(is_self, 0.0, _cdist(var[r0:r1], var))
        idx = tf.math.top_k(-d_m, k=k).indices
        if official_code:
            d_m, d_cv = _maxmin(d_m), _maxmin(d_cv)
        g_m = tf.gather(d_m, idx, batch_dims=1)
        g_cv = tf.gather(d_cv, idx, batch_dims=1)
        n_nb = tf.gather(n, idx)
        logits = (
            tf.math.log(tf.maximum(n_nb, 1e-300))
            - tf.square(g_m) / (2.0 * sigma_m**2)
            - tf.square(g_cv) / (2.0 * sigma_cv**2)
        )
        valid = n_nb > 0
        if not official_code:
            valid = tf.logical_and(
                valid, ~tf.gather(excluded, idx, batch_dims=1)
            )
        logits = tf.where(valid, logits, -np.inf)
        top = tf.reduce_max(logits, 1, keepdims=True)
        top = tf.where(tf.math.is_finite(top), top, 0.0)
        w = tf.where(valid, tf.exp(logits - top), 0.0)
        w = tf.math.divide_no_nan(w, tf.reduce_sum(w, 1, keepdims=True))
        nb = tf.reduce_sum(w[:, :, None] * tf.gather(var, idx), 1)
        parts["nb"].append(nb)
        parts["idx"].append(idx)
        parts["w"].append(w)
    nb = tf.concat(parts["nb"], 0)
    a_col = a[:, None]
    corrected = (1.0 - a_col) * var + a_col * (
        (1.0 - gamma) * nb + gamma * global_var[None, :]
    )
    return {
        "corrected": corrected,
        "neighbor_variance": nb,
        "global_variance": global_var,
        "class_weight": a,
        "neighbor_indices": tf.concat(parts["idx"], 0),
        "neighbor_weights": tf.concat(parts["w"], 0),
    }


class _PassStatistics:
    """Per-class count, mean and sum of squared deviations over batches.

    Chan et al.'s pairwise merge in float64, so the result equals
    ``var(ddof=0)`` of the concatenated pass.
    """

    def __init__(self, num_classes, dim):
        self.count = np.zeros(num_classes)
        self.mean = np.zeros((num_classes, dim))
        self.m2 = np.zeros((num_classes, dim))

    def add(self, raw, labels):
        raw = np.asarray(raw, np.float64)
        labels = np.asarray(labels).reshape(-1).astype(np.int64)
        c = np.bincount(labels, minlength=len(self.count)).astype(np.float64)
        s = np.zeros_like(self.mean)
        np.add.at(s, labels, raw)
        safe = np.maximum(c, 1.0)[:, None]
        mb = s / safe
        m2b = np.zeros_like(self.m2)
        np.add.at(m2b, labels, (raw - mb[labels]) ** 2)
        na = self.count[:, None]
        nb = c[:, None]
        tot = np.maximum(na + nb, 1.0)
        delta = mb - self.mean
        self.mean = self.mean + delta * nb / tot
        self.m2 = self.m2 + m2b + delta**2 * na * nb / tot
        self.count = self.count + c

    @property
    def variance(self):
        return self.m2 / np.maximum(self.count, 1.0)[:, None]


@registry.register
class IAAEstimator(keras.layers.Layer):
    """Per-class mean and diagonal variance of raw embeddings (IAA §IV-A).

    Args:
      num_classes: number of training classes ``C``.
      dim: raw embedding dimension ``d``.
      momentum: the merge momentum (``w >= 1 - momentum``), default 0.2.
      num_neighbors: ``K`` of the neighbour correction, default 25.
      beta, gamma, tau: correction constants (0.1, 0.1, 40).
      sigma_m, sigma_cv: kernel widths (1, 1).
      correction_threshold: the correction is computed only when
        ``num_classes > correction_threshold`` (default 1000, the official
        code's ``class_num > 1000``).
      official_code: reproduce the released code (module docstring).
      class_ids: optional ``C`` distinct integer label ids (any values);
        row ``k`` of every table belongs to the ``k``-th smallest id.
        Default: ``0 .. C-1``, replaced at the first estimate by the
        sorted ids seen in that pass when any label lies outside it (so
        any integer ids work; see :meth:`lookup`). Explicit ids are kept;
        ids outside them raise in estimation and get no noise in
        synthesis.
      **kwargs: passed to ``keras.layers.Layer`` (``name``).

    Variables (non-trainable, saved with checkpoints): ``class_ids [C]``
    (int64, sorted; unused rows hold the int64 maximum), ``mean [C, d]``,
    ``variance [C, d]`` (merged, uncorrected), ``amount [C]`` (samples
    merged so far), ``counts [C]`` (samples in the last pass),
    ``sampling_variance [C, d]`` (what synthesis uses: corrected in paper
    mode on large label spaces, else ``variance``), ``num_updates``, and,
    with the correction, ``neighbor_variance [C, d]``,
    ``global_variance [d]`` and ``class_weight [C]`` (``a_k``).

    Example::

      estimator = IAAEstimator(num_classes=100, dim=512)
      estimator.update_from_batches(
          (encoder(x, training=False)["raw"], y) for x, y in train_ds)

    Reference: Fu et al., IEEE TMM 2023, Eq. 7-16.
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        momentum: float = 0.2,
        num_neighbors: int = 25,
        beta: float = 0.1,
        gamma: float = 0.1,
        tau: float = 40,
        sigma_m: float = 1.0,
        sigma_cv: float = 1.0,
        correction_threshold: int = 1000,
        official_code: bool = False,
        class_ids: npt.ArrayLike | None = None,
        **kwargs,
    ):
        kwargs.pop("dtype", None)
        kwargs.pop("trainable", None)
        super().__init__(dtype="float32", trainable=False, **kwargs)
        self.num_classes = check_int("num_classes", num_classes)
        self.dim = check_int("dim", dim)
        self.momentum = _in_range("momentum", momentum, 0.0, 1.0)
        self.num_neighbors = check_int("num_neighbors", num_neighbors)
        self.beta = _in_range("beta", beta, 0.0, math.inf)
        self.gamma = _in_range("gamma", gamma, 0.0, 1.0)
        self.tau = _in_range("tau", tau, 0.0, math.inf)
        self.sigma_m = _in_range("sigma_m", sigma_m, 0.0, math.inf, True)
        self.sigma_cv = _in_range("sigma_cv", sigma_cv, 0.0, math.inf, True)
        self.correction_threshold = check_int(
            "correction_threshold", correction_threshold, 0
        )
        self.official_code = bool(official_code)
        c, d = self.num_classes, self.dim
        zeros = np.zeros((c, d), np.float32)
        ids = np.arange(c, dtype="int64")
        self.class_ids = state_variable("class_ids", ids)
        if class_ids is not None:
            self.set_class_ids(class_ids)
        self.mean = state_variable("mean", zeros)
        self.variance = state_variable("variance", zeros)
        self.sampling_variance = state_variable("sampling_variance", zeros)
        self.amount = state_variable("amount", np.zeros((c,), np.float32))
        self.counts = state_variable("counts", np.zeros((c,), np.float32))
        self.num_updates = state_variable("num_updates", np.int32(0))
        if self.uses_correction:
            self.neighbor_variance = state_variable("neighbor_variance", zeros)
            self.global_variance = state_variable(
                "global_variance", np.zeros((d,), np.float32)
            )
            self.class_weight = state_variable(
                "class_weight", np.zeros((c,), np.float32)
            )
        self.built = True

    @property
    def uses_correction(self):
        """Whether the neighbour correction is computed (large C)."""
        return self.num_classes > self.correction_threshold and (
            self.num_classes >= 2
        )

    @property
    def applies_correction(self):
        """Whether synthesis uses the corrected variance (paper mode)."""
        return self.uses_correction and not self.official_code

    @property
    def estimated(self):
        """Python bool: at least one update has been merged."""
        return int(np.asarray(self.num_updates.numpy())) > 0

    def call(self, labels: tf.Tensor | npt.ArrayLike) -> tf.Tensor:
        return self.sampling_variances(labels)

    def sampling_variances(
        self, labels: tf.Tensor | npt.ArrayLike
    ) -> tf.Tensor:
        """Sampling variances of the given label ids ``[B, d]`` (0 for ids
        not in :attr:`class_ids`)."""
        rows, known = self.lookup(labels)
        var = tf.gather(tf.convert_to_tensor(self.sampling_variance), rows)
        return tf.where(known[:, None], var, 0.0)

    # -- label ids ------------------------------------------------------------
    def set_class_ids(self, ids: tf.Tensor | npt.ArrayLike) -> None:
        """Sets the label-id table from any ``<= C`` distinct integer ids."""
        ids = np.unique(np.asarray(ids).reshape(-1))
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"`class_ids` must be integers; received dtype {ids.dtype}."
            )
        if ids.size > self.num_classes:
            raise ValueError(
                f"IAAEstimator(num_classes={self.num_classes}) received "
                f"{ids.size} distinct label ids; num_classes must be at "
                "least the number of training classes."
            )
        table = np.full(self.num_classes, np.iinfo(np.int64).max, np.int64)
        table[: ids.size] = ids.astype(np.int64)
        self.class_ids.assign(table)

    def lookup(
        self, labels: tf.Tensor | npt.ArrayLike
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """Table rows of label ids (graph/XLA safe).

        Returns ``(rows [B] int32, known [B] bool)``; ``rows`` is clipped
        to ``[0, C)`` and ``known`` is False for ids not in the table.
        """
        labels = tf.reshape(tf.cast(labels, tf.int64), [-1])
        table = tf.convert_to_tensor(self.class_ids)
        rows = tf.searchsorted(table, labels, side="left", out_type=tf.int32)
        rows = tf.minimum(rows, self.num_classes - 1)
        known = tf.equal(tf.gather(table, rows), labels)
        return rows, known

    def rows_of(self, labels: tf.Tensor | npt.ArrayLike) -> tf.Tensor:
        """NumPy table rows of label ids; unknown ids raise ValueError."""
        labels = np.asarray(labels).reshape(-1)
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"`labels` must be integers; received dtype {labels.dtype}."
            )
        table = np.asarray(self.class_ids.numpy())
        rows = np.minimum(
            np.searchsorted(table, labels.astype(np.int64)),
            self.num_classes - 1,
        )
        unknown = table[rows] != labels
        if unknown.any():
            raise ValueError(
                f"label ids {sorted(set(labels[unknown].tolist()))[:5]} are "
                "not in the estimator's class_ids (the ids of its first "
                "estimate or of set_class_ids)."
            )
        return rows

    def update(
        self, raw: tf.Tensor | npt.ArrayLike, labels: tf.Tensor | npt.ArrayLike
    ) -> np.ndarray:
        """One estimation from a full set of raw embeddings ``[N, d]``."""
        return self.update_from_batches([(raw, labels)])

    def update_from_batches(
        self,
        batches: Iterable[
            tuple[tf.Tensor | npt.ArrayLike, tf.Tensor | npt.ArrayLike]
        ],
    ) -> np.ndarray:
        """Aggregates a full pass, then merges it (and corrects).

        Args:
          batches: an iterable of ``(raw [b, d], labels [b])`` pairs (numpy
            or tensors): raw head outputs of (a sample of) the training set.
            Labels are any integer ids: before the first estimate, a pass
            with ids outside :attr:`class_ids` sets the table to the pass's
            sorted ids.

        Returns the last pass's per-class counts ``[C]`` (numpy).
        """
        pairs = []
        for raw, labels in batches:
            raw = np.asarray(raw)
            if raw.ndim != 2 or raw.shape[1] != self.dim:
                raise ValueError(
                    f"`raw` must have shape [batch, {self.dim}]; received "
                    f"shape {raw.shape}."
                )
            labels = np.asarray(labels).reshape(-1)
            if len(labels) != raw.shape[0]:
                raise ValueError(
                    "`labels` and `raw` must have the same length; received "
                    f"{len(labels)} and {raw.shape[0]}."
                )
            pairs.append((raw, labels))
        if pairs and not self.estimated:
            seen = np.unique(np.concatenate([y for _, y in pairs]))
            table = np.asarray(self.class_ids.numpy())
            default = np.array_equal(table, np.arange(self.num_classes))
            if default and seen.size and not np.isin(seen, table).all():
                self.set_class_ids(seen)
        stats = _PassStatistics(self.num_classes, self.dim)
        for raw, labels in pairs:
            stats.add(raw, self.rows_of(labels))
        self.merge(stats.count, stats.mean, stats.variance)
        return stats.count

    def merge(
        self,
        counts: npt.ArrayLike,
        mean: npt.ArrayLike,
        variance: npt.ArrayLike,
    ) -> None:
        """Momentum merge of one pass's statistics (paper Eq. 8 / ISDA).

        Args:
          counts: ``[C]`` samples per class in the pass.
          mean, variance: ``[C, d]`` the pass's class means and population
            variances.
        """
        n_new = np.asarray(counts, np.float64)
        mu_new = np.asarray(mean, np.float64)
        var_new = np.asarray(variance, np.float64)
        n_old = np.asarray(self.amount.numpy(), np.float64)
        mu_old = np.asarray(self.mean.numpy(), np.float64)
        var_old = np.asarray(self.variance.numpy(), np.float64)
        ratio = n_new / np.maximum(n_new + n_old, 1e-12)
        w = np.where(n_new > 0, np.maximum(ratio, 1.0 - self.momentum), 0.0)
        if self.official_code and self.uses_correction:
            w = np.where(n_new == 1, 0.0, w)  # update_each_class skips them
        w = w[:, None]
        var = (
            (1.0 - w) * var_old
            + w * var_new
            + w * (1.0 - w) * (mu_old - mu_new) ** 2
        )
        mu = (1.0 - w) * mu_old + w * mu_new
        self.variance.assign(var.astype(np.float32))
        self.mean.assign(mu.astype(np.float32))
        self.amount.assign((n_old + n_new).astype(np.float32))
        self.counts.assign(n_new.astype(np.float32))
        self.num_updates.assign(int(self.num_updates.numpy()) + 1)
        self.correct()

    def correct(self) -> dict[str, tf.Tensor] | None:
        """Recomputes the neighbour correction and ``sampling_variance``."""
        if not self.uses_correction:
            self.sampling_variance.assign(self.variance)
            return None
        out = neighbor_correction(
            self.mean,
            self.variance,
            self.counts,
            num_neighbors=self.num_neighbors,
            beta=self.beta,
            gamma=self.gamma,
            tau=self.tau,
            sigma_m=self.sigma_m,
            sigma_cv=self.sigma_cv,
            official_code=self.official_code,
        )
        self.neighbor_variance.assign(
            tf.cast(out["neighbor_variance"], tf.float32)
        )
        self.global_variance.assign(tf.cast(out["global_variance"], tf.float32))
        self.class_weight.assign(tf.cast(out["class_weight"], tf.float32))
        if self.applies_correction:
            self.sampling_variance.assign(tf.cast(out["corrected"], tf.float32))
        else:  # the official code never calls distribution_calibration
            self.sampling_variance.assign(self.variance)
        return out

    def reset(self) -> None:
        """Forgets every estimate (and the label-id table)."""
        for v in self.variables:
            v.assign(tf.zeros_like(v))
        self.class_ids.assign(np.arange(self.num_classes, dtype="int64"))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        for key in ("dtype", "trainable"):
            config.pop(key, None)
        config.update(
            num_classes=self.num_classes,
            dim=self.dim,
            momentum=self.momentum,
            num_neighbors=self.num_neighbors,
            beta=self.beta,
            gamma=self.gamma,
            tau=self.tau,
            sigma_m=self.sigma_m,
            sigma_cv=self.sigma_cv,
            correction_threshold=self.correction_threshold,
            official_code=self.official_code,
        )
        return config


@registry.register
class IAAugmenter(keras.layers.Layer):
    """Synthesises ``M`` copies per sample from ``N(z, lambda Sigma_y)``.

    Pass it to :class:`tfdml.models.DMLModel` as ``augmenter``; the copies
    become extra references (never anchors) in every training step.
    Every synthesis step also accumulates the augmentation strength (see
    :meth:`strength`): the mean ``|z_hat - z| / |z|`` (``iaa_noise_ratio``)
    and the mean ``cos(z_hat, z)`` (``iaa_copy_cos``) over all copies;
    :class:`IAARefresh` logs their epoch means into the fit history.

    Args:
      estimator: an :class:`IAAEstimator` (or its config dict).
      num_copies: ``M`` copies per sample (paper: 3).
      lam: ``lambda``, the variation strength (paper: 0.6-0.8). Stored in
        the variable ``lam`` so that schedules need no retracing.
      official_code: the repeated square root across copies (module
        docstring); default: the estimator's flag.
      seed: integer seed of the noise. The noise of step ``t`` is
        ``stateless_normal(seed=(seed, t))``, identical on every replica
        and reproducible after a restore. Default: drawn at random.
      enabled: whether :meth:`synthesize` produces rows; :class:`IAARefresh`
        turns it on at the first estimate (and retraces the train step).
        While off, no rows are added (the plain step).
      **kwargs: passed to ``keras.layers.Layer`` (``name``).

    Example::

      estimator = IAAEstimator(num_classes=100, dim=512)
      augmenter = IAAugmenter(estimator, num_copies=3, lam=0.8)
      model = DMLModel(encoder, augmenter=augmenter)
      model.compile(optimizer="adam", loss=MultiSimilarityLoss())
      model.fit(train_ds, epochs=100,
                callbacks=[IAARefresh(estimation_ds)])

    Reference: Fu et al., IEEE TMM 2023, Eq. 17-20.
    """

    def __init__(
        self,
        estimator: IAAEstimator | Mapping[str, Any],
        num_copies: int = 3,
        lam: float = 0.8,
        official_code: bool | None = None,
        seed: int | None = None,
        enabled: bool = True,
        **kwargs,
    ):
        kwargs.pop("dtype", None)
        kwargs.pop("trainable", None)
        super().__init__(dtype="float32", trainable=False, **kwargs)
        if isinstance(estimator, dict):
            estimator = keras.saving.deserialize_keras_object(estimator)
        if not isinstance(estimator, IAAEstimator):
            raise ValueError(
                "`estimator` must be an IAAEstimator; received "
                f"estimator={estimator!r}."
            )
        self.estimator = estimator
        self.num_copies = check_int("num_copies", num_copies)
        lam = _in_range("lam", lam, 0.0, math.inf)
        self.official_code = (
            estimator.official_code
            if official_code is None
            else bool(official_code)
        )
        if seed is None:
            seed = int(np.random.randint(0, 2**31 - 1))
        self.seed = check_int("seed", seed, 0)
        self.enabled = bool(enabled)
        self.lam = keras.Variable(
            np.float32(lam),
            dtype="float32",
            trainable=False,
            autocast=False,
            aggregation="only_first_replica",
            synchronization="on_write",
            name="lam",
        )
        self.step = keras.Variable(
            np.int32(0),
            dtype="int32",
            trainable=False,
            autocast=False,
            aggregation="only_first_replica",
            synchronization="on_write",
            name="step",
        )
        # [sum of |noise|/|z|, sum of cos(copy, z), number of copies]
        self.strength_sums = state_variable(
            "strength_sums", np.zeros((3,), np.float32)
        )
        self.built = True

    def strength(self) -> dict[str, float]:
        """Mean noise ratio and copy cosine since :meth:`reset_strength`.

        Returns ``{"iaa_noise_ratio": float, "iaa_copy_cos": float}``;
        ``0.0`` and ``1.0`` (copies equal their source) when no copy was
        made.
        """
        ratio, cos, count = (float(v) for v in self.strength_sums.numpy())
        if count == 0:
            return {"iaa_noise_ratio": 0.0, "iaa_copy_cos": 1.0}
        return {"iaa_noise_ratio": ratio / count, "iaa_copy_cos": cos / count}

    def reset_strength(self) -> None:
        self.strength_sums.assign(np.zeros((3,), np.float32))

    def std_exponents(self) -> list[float]:
        """Exponent of the variance per copy: 1/2 (paper) or 1/2**m."""
        if self.official_code:
            return [0.5**m for m in range(1, self.num_copies + 1)]
        return [0.5] * self.num_copies

    def sample(
        self, raw: tf.Tensor | npt.ArrayLike, labels: tf.Tensor | npt.ArrayLike
    ) -> tf.Tensor:
        """Unnormalised copies ``[M, B, d]`` (advances the noise step)."""
        raw = tf.cast(raw, tf.float32)
        var = self.estimator.sampling_variances(labels)
        var = tf.stop_gradient(tf.maximum(var, 0.0))
        step = tf.convert_to_tensor(self.step)
        self.step.assign(step + 1)
        seed = tf.stack([tf.constant(self.seed, tf.int32), step])
        shape = tf.concat([[self.num_copies], tf.shape(raw)], 0)
        noise = stateless_normal(shape, seed)
        scale = tf.sqrt(tf.convert_to_tensor(self.lam))
        copies = []
        for m, p in enumerate(self.std_exponents()):
            std = tf.sqrt(var) if p == 0.5 else tf.pow(var, p)
            copies.append(raw + scale * std * noise[m])
        copies = tf.stack(copies, 0)
        self._track_strength(tf.stop_gradient(raw), tf.stop_gradient(copies))
        return copies

    def _track_strength(self, raw, copies):
        z = tf.broadcast_to(raw[None], tf.shape(copies))
        ratio = tf.math.divide_no_nan(
            tf.norm(copies - z, axis=-1), tf.norm(z, axis=-1)
        )
        cos = tf.reduce_sum(
            tf.math.l2_normalize(copies, -1, 1e-12)
            * tf.math.l2_normalize(z, -1, 1e-12),
            -1,
        )
        count = tf.cast(tf.size(ratio), tf.float32)
        sums = tf.convert_to_tensor(self.strength_sums)
        self.strength_sums.assign(
            sums + tf.stack([tf.reduce_sum(ratio), tf.reduce_sum(cos), count])
        )

    def synthesize(
        self,
        raw: tf.Tensor | npt.ArrayLike,
        labels: tf.Tensor | npt.ArrayLike,
        ids: tf.Tensor | npt.ArrayLike,
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        """The DMLModel hook: copies as extra references.

        Args:
          raw: ``[B, d]`` raw (pre-normalisation) head outputs.
          labels: ``[B]`` class ids.
          ids: ``[B]`` example ids.

        Returns:
          ``(embeddings [M*B, d], labels [M*B], ids [M*B], owner_ids
          [M*B])``: L2-normalised copies ordered copy-major (copy 1 of all
          samples, then copy 2, ...). Each copy has its source's example id,
          so it is not a positive of its own anchor but is a positive of the
          other same-class anchors. ``[0, d]`` tensors while not enabled.
        """
        labels = tf.reshape(labels, [-1])
        if labels.dtype != tf.int64:
            labels = tf.cast(labels, tf.int32)
        ids = tf.reshape(tf.cast(ids, tf.int32), [-1])
        if not self.enabled:
            empty = tf.zeros([0], tf.int32)
            return tf.zeros([0, self.estimator.dim]), empty, empty, empty
        copies = self.sample(raw, labels)
        d = self.estimator.dim
        emb = tf.math.l2_normalize(tf.reshape(copies, [-1, d]), -1, 1e-12)
        reps = [self.num_copies]
        ids_out = tf.tile(ids, reps)
        return emb, tf.tile(labels, reps), ids_out, ids_out

    def call(
        self,
        raw: tf.Tensor | npt.ArrayLike,
        labels: tf.Tensor | npt.ArrayLike,
        ids: tf.Tensor | npt.ArrayLike,
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        return self.synthesize(raw, labels, ids)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        for key in ("dtype", "trainable"):
            config.pop(key, None)
        config.update(
            estimator=keras.saving.serialize_keras_object(self.estimator),
            num_copies=self.num_copies,
            lam=float(self.lam.numpy()),
            official_code=self.official_code,
            seed=self.seed,
            enabled=self.enabled,
        )
        return config


def _unpack(batch):
    if isinstance(batch, (tuple, list)):
        return batch[0], batch[1]
    raise ValueError(
        "The estimation dataset must yield (images, labels[, weights]); "
        f"received {type(batch).__name__}."
    )


class IAARefresh(keras.callbacks.Callback):
    """Re-estimates the class variances on schedule during ``fit``.

    At the beginning of Keras epoch ``e`` (0-based) with
    ``e >= start_epoch`` and ``(e - start_epoch) % every_n_epochs == 0`` it
    embeds a bounded sample of ``dataset`` (at most ``max_per_class``
    images per class), merges the raw embeddings into
    ``model.augmenter.estimator`` (then the neighbour correction), and
    enables synthesis (the train step is retraced once). Before the first
    estimate no synthetic rows are added.

    **BatchNorm.** Synthesis perturbs the training-mode raw outputs, so by
    default (``bn_mode="training"``) sigma is estimated from training-mode
    outputs too: ``encoder.stateless_call(..., training=True)`` on batches
    of the sample, with the updated BN moving statistics discarded (the
    encoder's variables are not touched). A frozen BN (``trainable=False``,
    as in the official code) is in inference mode either way.
    ``bn_mode="inference"`` reproduces tfdml's earlier estimate
    (``encoder(x, training=False)``): on a from-scratch encoder its moving
    statistics are far from the batch statistics, and the noise was
    0.6 % of ``|z|`` (copies = duplicates).

    **Schedule.** Default: the first estimate at epoch
    ``ceil(start_fraction * epochs)`` (30 % of the budget, the official
    code's epoch 31 of 100), then every 2 epochs. ``paper_schedule=True``
    reproduces tfdml's earlier paper-mode default (epoch 0, i.e. an
    untrained network, then every 4 epochs); ``official_code`` the
    released code's epochs 30, 32, ... Explicit ``start_epoch`` /
    ``every_n_epochs`` override all of these.

    **Logs.** ``iaa_noise_ratio`` (mean ``|z_hat - z| / |z|``) and
    ``iaa_copy_cos`` (mean ``cos(z_hat, z)``) of the epoch's synthetic
    copies are added to the epoch logs (the fit history); 0 and 1 while
    nothing is synthesised.

    Args:
      dataset: iterable of ``(images, labels)`` batches of the training set
        (the official code uses the training transform); labels are any
        integer ids (see :class:`IAAEstimator` ``class_ids``). Shuffle it
        to draw a different bounded sample at each refresh.
      start_epoch: first refresh epoch (overrides the schedule).
      every_n_epochs: refresh period (overrides the schedule).
      epochs: total epochs ``T``; default: ``fit``'s ``epochs``. With
        ``lambda_schedule`` the augmenter's lambda follows
        :func:`official_lambda` each epoch.
      lambda_schedule: default: on in official mode when ``epochs`` is set.
      official_code: default: the augmenter's flag.
      start_fraction: first estimate after this fraction of ``epochs``
        (default 0.3).
      paper_schedule: start at epoch 0 and refresh every 4 epochs (the
        earlier tfdml default; estimates an untrained network).
      max_per_class: at most this many images per class are embedded per
        refresh (default 32; ``None``: the whole dataset). Reading stops
        once every class has its quota.
      bn_mode: ``"training"`` (default) or ``"inference"`` (see above).

    The callback finds the augmenter as ``self.model.augmenter``
    (:class:`tfdml.models.DMLModel`) and the encoder as
    ``self.model.encoder``. ``refresh_seconds`` and ``sample_sizes`` record
    each refresh's wall time and number of embedded images.
    """

    def __init__(
        self,
        dataset: Iterable[Any],
        start_epoch: int | None = None,
        every_n_epochs: int | None = None,
        epochs: int | None = None,
        lambda_schedule: bool | None = None,
        official_code: bool | None = None,
        start_fraction: float = 0.3,
        paper_schedule: bool = False,
        max_per_class: int | None = 32,
        bn_mode: str = "training",
    ):
        super().__init__()
        self.dataset = dataset
        self._start = start_epoch
        self._every = every_n_epochs
        self.epochs = None if epochs is None else check_int("epochs", epochs)
        self._schedule = lambda_schedule
        self._official = official_code
        if start_epoch is not None:
            check_int("start_epoch", start_epoch, 0)
        if every_n_epochs is not None:
            check_int("every_n_epochs", every_n_epochs)
        self.start_fraction = _in_range(
            "start_fraction", start_fraction, 0.0, 1.0
        )
        self.paper_schedule = bool(paper_schedule)
        self.max_per_class = (
            None
            if max_per_class is None
            else check_int("max_per_class", max_per_class)
        )
        if bn_mode not in ("training", "inference"):
            raise ValueError(
                "`bn_mode` must be 'training' or 'inference'; received "
                f"bn_mode={bn_mode!r}."
            )
        self.bn_mode = bn_mode
        self.base_lam = None
        self.refreshed_epochs = []
        self.refresh_seconds = []
        self.sample_sizes = []
        self._encode = None

    @property
    def augmenter(self):
        aug = getattr(self.model, "augmenter", None)
        if not isinstance(aug, IAAugmenter):
            raise ValueError(
                "IAARefresh needs a model with an IAAugmenter `augmenter`; "
                f"received augmenter={aug!r}."
            )
        return aug

    @property
    def official_code(self):
        if self._official is not None:
            return bool(self._official)
        return self.augmenter.official_code

    @property
    def total_epochs(self):
        """``epochs``, else ``fit``'s ``epochs`` (None outside fit)."""
        if self.epochs is not None:
            return self.epochs
        return (getattr(self, "params", None) or {}).get("epochs")

    @property
    def start_epoch(self):
        if self._start is not None:
            return self._start
        if self.official_code:
            return 30
        if self.paper_schedule:
            return 0
        total = self.total_epochs
        if total is None:
            raise ValueError(
                "IAARefresh needs `epochs` (or fit's epochs) to start after "
                f"start_fraction={self.start_fraction} of the budget; pass "
                "epochs=, start_epoch= or paper_schedule=True."
            )
        return int(math.ceil(self.start_fraction * total - 1e-9))

    @property
    def every_n_epochs(self):
        if self._every is not None:
            return self._every
        return 4 if self.paper_schedule and not self.official_code else 2

    def should_refresh(self, epoch: int) -> bool:
        """Whether Keras epoch ``epoch`` (0-based) starts with a refresh."""
        return (
            epoch >= self.start_epoch
            and (epoch - self.start_epoch) % self.every_n_epochs == 0
        )

    def _encoder_fn(self):
        """``images -> raw`` through the shared compiled forward pass of
        :func:`tfdml.eval.embedding_function` (one tf.function per encoder,
        mode and image shape; batch sizes do not retrace). ``bn_mode=
        "training"``: ``encoder.stateless_call(..., training=True)``, the
        updated non-trainable state (BN moving statistics, seed counters)
        discarded; ``"inference"``: ``encoder(x, training=False)``. The
        refresh keeps its own loop (not :func:`tfdml.eval.embed`): it
        streams its sample batch by batch into the estimator."""
        from tfdml.eval.embed import embedding_function

        encoder = self.model.encoder
        training = self.bn_mode == "training"

        def encode(x):
            fn = embedding_function(encoder, x, training=training, output="raw")
            return fn(x)

        return encode

    def sample_batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields ``(images, labels)`` of the bounded sample, in batches of
        the dataset's batch size (the last one may hold up to twice that,
        so that no training-mode batch is tiny)."""
        cap = self.max_per_class
        num_classes = self.augmenter.estimator.num_classes
        counts, full = {}, 0
        xs, ys, size = [], [], None
        data = self.dataset
        if isinstance(data, tf.data.Dataset):
            data = without_autotune(data)
        for batch in data:
            x, y = _unpack(batch)
            x = np.asarray(x)
            y = np.asarray(y).reshape(-1)
            if size is None:
                size = max(len(y), 2)
            if cap is not None:
                keep = []
                for i, label in enumerate(y.tolist()):
                    n = counts.get(label, 0)
                    if n < cap:
                        keep.append(i)
                        counts[label] = n + 1
                        full += n + 1 == cap
                x, y = x[keep], y[keep]
            xs.append(x)
            ys.append(y)
            pending = sum(len(v) for v in ys)
            if pending >= 2 * size:
                x_all, y_all = np.concatenate(xs), np.concatenate(ys)
                yield x_all[:size], y_all[:size]
                xs, ys = [x_all[size:]], [y_all[size:]]
            if cap is not None and full >= num_classes:
                break
        if ys and sum(len(v) for v in ys):
            yield np.concatenate(xs), np.concatenate(ys)

    def refresh(self) -> None:
        """One estimation pass over the bounded sample (then correction)."""
        if self._encode is None:
            self._encode = self._encoder_fn()
        start = time.perf_counter()
        sizes = []

        def batches():
            for x, y in self.sample_batches():
                raw = self._encode(tf.convert_to_tensor(x))
                sizes.append(len(y))
                yield np.asarray(raw, np.float32), y

        self.augmenter.estimator.update_from_batches(batches())
        self.refresh_seconds.append(time.perf_counter() - start)
        self.sample_sizes.append(int(sum(sizes)))

    def _sync_enabled(self):
        aug = self.augmenter
        want = aug.estimator.estimated
        if aug.enabled != want:
            aug.enabled = want
            self.model.make_train_function(force=True)

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        self._sync_enabled()

    def on_epoch_begin(
        self, epoch: int, logs: Mapping[str, Any] | None = None
    ) -> None:
        aug = self.augmenter
        schedule = self._schedule
        if schedule is None:
            schedule = self.official_code and self.epochs is not None
        if schedule:
            if self.epochs is None:
                raise ValueError(
                    "lambda_schedule=True needs `epochs`; received epochs=None."
                )
            if self.base_lam is None:
                self.base_lam = float(aug.lam.numpy())
            aug.lam.assign(
                official_lambda(self.base_lam, epoch + 1, self.epochs)
            )
        if self.should_refresh(epoch):
            self.refresh()
            self.refreshed_epochs.append(epoch)
        self._sync_enabled()
        aug.reset_strength()

    def on_epoch_end(
        self, epoch: int, logs: Mapping[str, Any] | None = None
    ) -> None:
        if logs is not None:
            logs.update(self.augmenter.strength())
