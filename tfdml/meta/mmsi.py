"""MMSI: meta-mined pair weights with semi-global information.

Jiang et al., "Meta-Mining Strategy with Semi-global Information for Deep
Metric Learning", IEEE TNNLS 2024 (official PyTorch code: ``trainer_MMSI.py``;
docs/training_methods.md, section MMSI).

Per step, with a training batch ``(x, y)`` (P x K) and a validation batch
``(x_val, y_val)`` (a K = 1 resample of the *training* classes):

1. embed the training batch, append the features to the
   :class:`tfdml.memory.ClassDictionary` (per-class FIFO, ``d_size``);
2. warm-up gate: no parameter update until the dictionary holds
   ``min_classes_before_update`` classes (official: 98 CUB/Cars, 1000 SOP);
3. S-form selection masks on the batch (computed once, reused below);
4. meta weights ``w = Norm(relu(-dL_g/dw))`` where ``L_g`` is the G-form loss
   of the validation anchors against the dictionary after a virtual SGD
   step ``theta' = theta - lr dL_W/dtheta`` taken at ``w = 0``;
5. the real step: the W-form loss with ``w`` (held constant) and the
   optimizer.

Two ways to compute step 4 (``path``):

* ``"nested"`` (the reference): literal nested ``GradientTape`` s with
  ``keras.Model.stateless_call``;
* ``"fast"`` (default): at ``w = 0`` the W-form gradient is exactly zero, so
  ``theta' = theta`` and ``-dL_g/dw_k = lr <grad L_g(theta), grad g_k>``
  with ``g_k = dL_W/dw_k = a_k S_k + const`` (docs/training_methods.md,
  Nested vs fast path). So one tape
  gives ``v = grad L_g(theta)``, one ``tf.autodiff.ForwardAccumulator`` pass
  over the batch gives ``dS = JVP_v(S)`` and ``raw = lr a * dS``. The same
  forward pass is recorded by the tape of the real step. Both paths agree
  to float32 precision; since ``Norm`` is scale-invariant the virtual ``lr``
  has no effect on the weights.

``Norm`` (official): ``w = relu(raw) / max relu(raw)`` over all selected
pairs (``normalization="joint"``). With the official MS coefficients the
negatives then get ~1e-8 weight (c-/c+ ~ e^{-20}); ``"separate"`` normalises
positive and negative pairs by their own maxima. When no raw weight is
positive the official code divides by zero (NaN); here ``fallback`` decides:
``"skip"`` (default: no parameter update this step), ``"uniform"`` (weight 1
on every selected pair) or ``"zeros"`` (zero weights, the step still runs).
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import numpy.typing as npt
import tensorflow as tf

from tfdml import ops
from tfdml import registry
from tfdml.distribute import all_gather
from tfdml.losses.base import References
from tfdml.memory.class_dictionary import ClassDictionary
from tfdml.memory.class_dictionary import check_class_ids
from tfdml.meta.forms import MMSIPairLoss
from tfdml.meta.forms import get_base
from tfdml.models.dml_model import DMLModel
from tfdml.models.dml_model import scale_loss_for_distribution
from tfdml.validation import check_choice
from tfdml.validation import check_int
from tfdml.validation import check_positive

NORMALIZATIONS = ("joint", "separate")
WEIGHTS_MODES = ("meta", "ones", "random_sparse")
FALLBACKS = ("skip", "uniform", "zeros")
PATHS = ("fast", "nested")


def normalize_weights(
    raw: tf.Tensor,
    sel: Mapping[str, tf.Tensor],
    normalization: str = "joint",
    fallback: str = "skip",
) -> tuple[tf.Tensor, tf.Tensor]:
    """MMSI's ``Norm``: ``relu`` then division by the maximum.

    Args:
      raw: ``[B, M]`` raw weights ``-dL_g/dw``.
      sel: the S-form selection (``pos`` / ``neg`` masks ``[B, M]``).
      normalization: ``"joint"`` (official: one maximum over all selected
        pairs) or ``"separate"`` (positives and negatives each by their own
        maximum).
      fallback: what to do when no selected raw weight is positive:
        ``"skip"`` / ``"zeros"`` return zeros (``"skip"`` also reports the
        step as not to be applied), ``"uniform"`` returns 1 on every selected
        pair.

    Returns:
      ``(w [B, M] in [0, 1], apply)``: ``apply`` is a scalar bool, False only
      for ``fallback="skip"`` when no weight is positive. Never NaN.
    """
    check_choice("normalization", normalization, NORMALIZATIONS)
    check_choice("fallback", fallback, FALLBACKS)
    pos = tf.cast(sel["pos"], raw.dtype)
    neg = tf.cast(sel["neg"], raw.dtype)
    r = tf.nn.relu(raw) * (pos + neg)
    r = tf.where(tf.math.is_finite(r), r, tf.zeros_like(r))
    if normalization == "joint":
        m = tf.reduce_max(r)
        w = tf.math.divide_no_nan(r, m)
        defined = m > 0.0
    else:
        mp = tf.reduce_max(r * pos)
        mn = tf.reduce_max(r * neg)
        w = tf.math.divide_no_nan(r * pos, mp) + tf.math.divide_no_nan(
            r * neg, mn
        )
        defined = tf.logical_or(mp > 0.0, mn > 0.0)
    if fallback == "uniform":
        w = tf.where(defined, w, pos + neg)
        return w, tf.constant(True)
    if fallback == "zeros":
        return w, tf.constant(True)
    return w, defined


def _permute_within(w_flat, mask_flat, key):
    """Permutes the entries of ``w_flat`` under ``mask_flat`` among
    themselves (random order from ``key``); other entries stay in place."""
    big = tf.cast(tf.size(w_flat), tf.float32)
    position = tf.cast(tf.range(tf.size(w_flat)), tf.float32)
    # selected positions first, in place order / in random order; the
    # unselected ones follow in the same (place) order in both
    in_place = tf.argsort(tf.where(mask_flat, position, big + position))
    shuffled = tf.argsort(tf.where(mask_flat, key, 2.0 + position))
    values = tf.gather(w_flat, shuffled)
    return tf.scatter_nd(in_place[:, None], values, tf.shape(w_flat))


def shuffle_weights(w, sel, seed):
    """The "random weights with MMSI's sparsity" control.

    Permutes the weights of the selected positive pairs among themselves and
    those of the selected negative pairs among themselves (stateless random
    order from ``seed``, a pair of ints): the fraction of zeros and the
    distribution of the weights of each polarity are exactly the meta
    weights', but which pair gets which weight is chance.

    Args:
      w: ``[B, M]`` weights (zero outside the selection).
      sel: the S-form selection (``pos`` / ``neg`` masks ``[B, M]``).
      seed: shape ``[2]`` int seed of ``tf.random.stateless_uniform``.

    Returns:
      ``[B, M]`` permuted weights.
    """
    shape = tf.shape(w)
    flat = tf.reshape(tf.cast(w, tf.float32), [-1])
    key = tf.random.stateless_uniform(
        tf.shape(flat), seed=tf.cast(seed, tf.int64)
    )
    out = tf.zeros_like(flat)
    for name in ("pos", "neg"):
        mask = tf.reshape(sel[name], [-1])
        part = tf.where(mask, flat, 0.0)
        out = out + tf.where(mask, _permute_within(part, mask, key), 0.0)
    return tf.reshape(out, shape)


def _similarity(base, e):
    return base.similarity(e, e)


def similarity_jvp(base, e, e_dot):
    """``(S, dS)`` of the batch similarity ``S = n(e) n(e)^T`` and its JVP
    along the embedding tangent ``e_dot`` (``n`` = L2 normalisation when
    ``base.normalize``)."""
    e = tf.cast(e, tf.float32)
    e_dot = tf.cast(e_dot, tf.float32)
    if base.normalize:
        norm = tf.maximum(tf.norm(e, axis=1, keepdims=True), 1e-12)
        n = e / norm
        n_dot = (e_dot - n * tf.reduce_sum(n * e_dot, 1, keepdims=True)) / norm
    else:
        n, n_dot = e, e_dot
    s = tf.matmul(n, n, transpose_b=True)
    ds = tf.matmul(n_dot, n, transpose_b=True) + tf.matmul(
        n, n_dot, transpose_b=True
    )
    return s, ds


def meta_loss(base, emb_val, y_val, ref, ref_labels, ref_valid):
    """G-form: mean over validation anchors against the dictionary."""
    refs = References(ref, ref_labels, valid=ref_valid)
    per = base.per_anchor(emb_val, y_val, refs)
    return tf.reduce_mean(per)


def _embed(encoder, tv, ntv, x):
    out, new_ntv = encoder.stateless_call(tv, ntv, x, training=True)
    if not isinstance(out, dict) or "embeddings" not in out:
        raise ValueError(
            "The encoder must return a dict with 'embeddings'; received "
            f"{type(out).__name__}."
        )
    return out, new_ntv


def _batch_masks(labels, ids=None):
    """Masks of the batch against itself; self-pairs excluded by id."""
    if ids is None:
        ids = tf.range(tf.shape(labels)[0], dtype=tf.int32)
    return ops.pair_masks(labels, labels, ids, ids)


def _zeros_for_none(grads, values):
    return [tf.zeros_like(v) if g is None else g for g, v in zip(grads, values)]


def nested_raw_weights(
    encoder: keras.Model,
    base: MMSIPairLoss,
    trainable: Sequence[tf.Variable],
    non_trainable: Sequence[tf.Variable],
    x: tf.Tensor,
    y: tf.Tensor,
    x_val: tf.Tensor,
    y_val: tf.Tensor,
    ref: tf.Tensor,
    ref_labels: tf.Tensor,
    ref_valid: tf.Tensor,
    virtual_lr: float = 1e-5,
    ids: tf.Tensor | None = None,
) -> tuple[tf.Tensor, dict[str, tf.Tensor], tf.Tensor]:
    """Reference path: the literal virtual step with nested tapes.

    Single replica only. Returns ``(raw [B, B], sel, L_g)``.
    """
    tv = list(trainable)
    ntv = list(non_trainable)
    labels = tf.reshape(tf.cast(y, tf.int32), [-1])
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            inner.watch(tv)
            out, _ = _embed(encoder, tv, ntv, x)
            e = tf.cast(out["embeddings"], tf.float32)
            sim = _similarity(base, e)
            pos, neg = _batch_masks(labels, ids)
            sel = base.select(sim, pos, neg)
            eps = tf.zeros_like(sim)
            outer.watch(eps)
            inner.watch(eps)
            l_f = tf.reduce_mean(base.weighted(sim, sel, eps))
        g = inner.gradient(
            l_f, tv, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        g = _zeros_for_none(g, tv)
        tv_p = [v - virtual_lr * gi for v, gi in zip(tv, g)]
        out_v, _ = _embed(encoder, tv_p, ntv, x_val)
        l_g = meta_loss(
            base, out_v["embeddings"], y_val, ref, ref_labels, ref_valid
        )
    g_eps = outer.gradient(
        l_g, eps, unconnected_gradients=tf.UnconnectedGradients.ZERO
    )
    return -g_eps, sel, l_g


def meta_direction(encoder, base, tv, ntv, x_val, y_val, ref, ref_lab, valid):
    """``v = grad_theta L_g(theta)`` (all-reduced over replicas) and L_g."""
    with tf.GradientTape() as tape:
        tape.watch(tv)
        out_v, _ = _embed(encoder, tv, ntv, x_val)
        emb_v = all_gather(tf.cast(out_v["embeddings"], tf.float32))
        y_v = all_gather(tf.reshape(tf.cast(y_val, tf.int32), [-1]))
        l_g = meta_loss(base, emb_v, y_v, ref, ref_lab, valid)
        scaled = scale_loss_for_distribution(l_g)
    v = tape.gradient(
        scaled, tv, unconnected_gradients=tf.UnconnectedGradients.ZERO
    )
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync > 1:
        v = ctx.all_reduce(tf.distribute.ReduceOp.SUM, v)
    return list(v), l_g


def fast_raw_weights(
    encoder: keras.Model,
    base: MMSIPairLoss,
    trainable: Sequence[tf.Variable],
    non_trainable: Sequence[tf.Variable],
    x: tf.Tensor,
    y: tf.Tensor,
    x_val: tf.Tensor,
    y_val: tf.Tensor,
    ref: tf.Tensor,
    ref_labels: tf.Tensor,
    ref_valid: tf.Tensor,
    virtual_lr: float = 1e-5,
    ids: tf.Tensor | None = None,
) -> tuple[tf.Tensor, dict[str, tf.Tensor], tf.Tensor]:
    """Closed form of the meta weights: ``raw = lr * a * JVP_v(S)``.

    Single-call convenience for tests; :class:`MMSIModel` inlines the same
    computation so that the real step reuses the forward pass. Returns
    ``(raw [B, B], sel, L_g)``.
    """
    tv = list(trainable)
    ntv = list(non_trainable)
    v, l_g = meta_direction(
        encoder, base, tv, ntv, x_val, y_val, ref, ref_labels, ref_valid
    )
    with tf.autodiff.ForwardAccumulator(tv, v) as acc:
        out, _ = _embed(encoder, tv, ntv, x)
        e = tf.cast(out["embeddings"], tf.float32)
    e_dot = acc.jvp(e, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    labels = tf.reshape(tf.cast(y, tf.int32), [-1])
    sim, ds = similarity_jvp(base, e, e_dot)
    pos, neg = _batch_masks(labels, ids)
    sel = base.select(sim, pos, neg)
    raw = virtual_lr * base.coefficients(sim, sel) * ds
    return raw, sel, l_g


@registry.register
class MMSIModel(DMLModel):
    """:class:`tfdml.models.DMLModel` with MMSI's meta-weighted train step.

    Args:
      encoder: the embedding model (dict output with ``"embeddings"``).
      memory, augmenter: must be None (MMSI uses its own class dictionary);
        kept for the DMLModel constructor contract.
      base_loss: an :class:`tfdml.meta.forms.MMSIPairLoss`, or
        ``"contrastive"`` / ``"ms"`` / ``"triplet"``, or a registry spec.
      num_classes: number of training classes (labels in ``[0, C)``); needed
        unless ``dictionary`` is given.
      d_size: per-class dictionary capacity.
      dictionary: an existing :class:`tfdml.memory.ClassDictionary`.
      min_classes_before_update: warm-up gate (official 98 / 1000).
      virtual_lr: learning rate of the virtual step (no effect on the
        weights, see the module docstring; official: the real lr).
      path: ``"fast"`` (default) or ``"nested"`` (reference; one replica).
      normalization: ``"joint"`` (official) or ``"separate"``.
      fallback: ``"skip"`` / ``"uniform"`` / ``"zeros"`` (see
        :func:`normalize_weights`).
      weights_mode: the pair weights of the real step: ``"meta"`` (MMSI,
        default); ``"ones"`` (control "MMSI base with w = 1": weight 1 on
        every pair the S-form selects, no meta step; the dictionary and
        ``meta_loss`` are still updated for comparison); ``"random_sparse"``
        (control "random weights with MMSI's sparsity": the meta weights
        permuted at random within each polarity, :func:`shuffle_weights`).
      weights_seed: seed of the ``"random_sparse"`` permutation (with the
        optimizer step, so every step draws anew and replicas agree).
      **kwargs: passed to :class:`DMLModel` (``name``;
        ``classification_loss_weight`` must stay 0).

    Layer regularisation losses of the encoder are not added to the W-form
    loss (the encoder runs through ``stateless_call``).

    ``fit`` takes a zipped dataset ``((x, y), (x_val, y_val))``, e.g. from
    :func:`meta_dataset`. Logged: ``loss`` (W-form), ``pos_sim``,
    ``neg_sim``, ``meta_loss`` (G-form), ``weight_positive_fraction``
    (selected pairs with ``w > 0``) and ``gate_open`` (1 when this step's
    update was applied).

    Under a distribution strategy the weights are computed from the gathered
    global batch (identical on every replica). A step that is not applied
    (gate closed or ``fallback="skip"``) is skipped exactly with
    ``tf.cond`` on one replica; on several replicas it applies zero
    gradients instead (an exact no-op before the first update, since the
    optimizer's moments are still zero; later, momentum may move the
    weights).
    """

    def __init__(
        self,
        encoder: keras.Model,
        memory: None = None,
        augmenter: None = None,
        base_loss: MMSIPairLoss | str | Mapping[str, Any] = "contrastive",
        num_classes: int | None = None,
        d_size: int = 1,
        dictionary: ClassDictionary | None = None,
        min_classes_before_update: int = 0,
        virtual_lr: float = 1e-5,
        path: str = "fast",
        normalization: str = "joint",
        fallback: str = "skip",
        weights_mode: str = "meta",
        weights_seed: int = 0,
        **kwargs,
    ):
        if memory is not None or augmenter is not None:
            raise ValueError(
                "MMSIModel uses its own class dictionary; `memory` and "
                f"`augmenter` must be None; received memory={memory!r}, "
                f"augmenter={augmenter!r}."
            )
        if kwargs.get("classification_loss_weight", 0.0):
            raise ValueError(
                "MMSIModel has no classification loss; received "
                "classification_loss_weight="
                f"{kwargs['classification_loss_weight']!r}."
            )
        super().__init__(encoder, **kwargs)
        self.base_loss = get_base(base_loss)
        self.meta_path = check_choice("path", path, PATHS)
        self.normalization = check_choice(
            "normalization", normalization, NORMALIZATIONS
        )
        self.fallback = check_choice("fallback", fallback, FALLBACKS)
        self.weights_mode = check_choice(
            "weights_mode", weights_mode, WEIGHTS_MODES
        )
        self.weights_seed = int(weights_seed)
        self.virtual_lr = check_positive("virtual_lr", virtual_lr)
        self.min_classes_before_update = check_int(
            "min_classes_before_update", min_classes_before_update, 0
        )
        if dictionary is None:
            if num_classes is None:
                raise ValueError(
                    "MMSIModel needs `num_classes` (or a `dictionary`); "
                    "received num_classes=None."
                )
            dictionary = ClassDictionary(
                num_classes, _embedding_dim(encoder), d_size
            )
        elif not isinstance(dictionary, ClassDictionary):
            raise ValueError(
                "`dictionary` must be a tfdml.memory.ClassDictionary; "
                f"received dictionary={dictionary!r}."
            )
        self.dictionary = dictionary
        self.meta_loss_tracker = keras.metrics.Mean(name="meta_loss")

    def compile(
        self,
        optimizer: str | keras.optimizers.Optimizer = "adam",
        loss: MMSIPairLoss | str | Mapping[str, Any] | None = None,
        **kwargs,
    ) -> None:
        """As :meth:`DMLModel.compile`; the loss defaults to the base loss
        (used as the G-form by ``evaluate``).

        ``jit_compile`` defaults to False: on CPU (TF 2.20) XLA's
        convolutions are slower than oneDNN's, for the plain step as for
        MMSI's forward-mode pass (benchmarks/mmsi.py). Pass
        ``jit_compile=True`` explicitly to use it (e.g. on GPU); a skipped
        step is then branch-free (see :meth:`_apply`).
        """
        kwargs.setdefault("jit_compile", False)
        if loss is None:
            loss = self.base_loss
        super().compile(optimizer=optimizer, loss=loss, **kwargs)

    # -- the meta step -----------------------------------------------------
    def _snapshot(self):
        enc = self.encoder
        tv = [
            tf.identity(tf.convert_to_tensor(v))
            for v in enc.trainable_variables
        ]
        ntv = [
            tf.identity(tf.convert_to_tensor(v))
            for v in enc.non_trainable_variables
        ]
        return tv, ntv

    def _gate(self):
        return (
            self.dictionary.num_classes_seen() >= self.min_classes_before_update
        )

    def train_step(self, data: Any) -> dict[str, tf.Tensor]:
        if not (isinstance(data, (tuple, list)) and len(data) == 2):
            raise ValueError(
                "MMSIModel.train_step expects ((x, y), (x_val, y_val)) from a "
                "zipped dataset (see tfdml.meta.meta_dataset)."
            )
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data[0])
        x_val, y_val, _ = keras.utils.unpack_x_y_sample_weight(data[1])
        if y is None or y_val is None:
            raise ValueError("MMSIModel needs labels for both batches.")
        for name, lab in (("y", y), ("y_val", y_val)):
            check_class_ids(
                tf.convert_to_tensor(lab),
                "MMSIModel's class dictionary",
                name,
                fix=": use DMLModel with a pair loss",
            )
        base = self.base_loss
        tv, ntv = self._snapshot()
        replicas = self.distribute_strategy.num_replicas_in_sync
        if self.meta_path == "nested":
            if replicas > 1:
                raise ValueError(
                    "path='nested' supports one replica only; received "
                    f"{replicas} replicas (use path='fast')."
                )
            out1, new_ntv = _embed(self.encoder, tv, ntv, x)
            batch = self.forward(x, y, sample_weight, outputs=out1)
            self.dictionary.enqueue(batch["embeddings"], batch["labels"])
            ref, ref_lab, valid = self.dictionary.entries()
            raw, sel, l_g = nested_raw_weights(
                self.encoder, base, tv, ntv, x, y, x_val, y_val,
                ref, ref_lab, valid, self.virtual_lr, ids=batch["ids"],
            )  # fmt: skip
            w, applied = normalize_weights(
                raw, sel, self.normalization, self.fallback
            )
            w, applied = self._mode_weights(w, sel, applied)
            w = tf.stop_gradient(w)
            with tf.GradientTape() as tape:
                tape.watch(tv)
                out, _ = _embed(self.encoder, tv, ntv, x)
                batch = self.forward(x, y, sample_weight, outputs=out)
                loss, scaled = self._real_loss(batch, sel, w)
        elif self.weights_mode == "ones":
            out1, _ = _embed(self.encoder, tv, ntv, x)
            feats = all_gather(tf.cast(out1["embeddings"], tf.float32))
            labs = all_gather(tf.reshape(tf.cast(y, tf.int32), [-1]))
            self.dictionary.enqueue(tf.stop_gradient(feats), labs)
            ref, ref_lab, valid = self.dictionary.entries()
            out_v, _ = _embed(self.encoder, tv, ntv, x_val)
            emb_v = all_gather(tf.cast(out_v["embeddings"], tf.float32))
            y_v = all_gather(tf.reshape(tf.cast(y_val, tf.int32), [-1]))
            l_g = meta_loss(base, emb_v, y_v, ref, ref_lab, valid)
            with tf.GradientTape() as tape:
                tape.watch(tv)
                out, new_ntv = _embed(self.encoder, tv, ntv, x)
                batch = self.forward(x, y, sample_weight, outputs=out)
                sim0 = _similarity(base, tf.stop_gradient(batch["embeddings"]))
                sel = self._select(sim0, batch)
                w, applied = self._mode_weights(None, sel, tf.constant(True))
                loss, scaled = self._real_loss(batch, sel, w)
        else:
            # v = grad L_g needs this step's features in the dictionary
            # first (official order), hence one plain forward before.
            out1, _ = _embed(self.encoder, tv, ntv, x)
            feats = all_gather(tf.cast(out1["embeddings"], tf.float32))
            labs = all_gather(tf.reshape(tf.cast(y, tf.int32), [-1]))
            self.dictionary.enqueue(tf.stop_gradient(feats), labs)
            ref, ref_lab, valid = self.dictionary.entries()
            v, l_g = meta_direction(
                self.encoder, base, tv, ntv, x_val, y_val, ref, ref_lab, valid
            )
            with tf.GradientTape() as tape:
                tape.watch(tv)
                with tf.autodiff.ForwardAccumulator(tv, v) as acc:
                    out, new_ntv = _embed(self.encoder, tv, ntv, x)
                    e_local = tf.cast(out["embeddings"], tf.float32)
                e_dot = acc.jvp(
                    e_local, unconnected_gradients=tf.UnconnectedGradients.ZERO
                )
                batch = self.forward(x, y, sample_weight, outputs=out)
                e_dot = all_gather(tf.stop_gradient(e_dot))
                sim0, ds = similarity_jvp(
                    base, tf.stop_gradient(batch["embeddings"]), e_dot
                )
                sel = self._select(sim0, batch)
                raw = self.virtual_lr * base.coefficients(sim0, sel) * ds
                w, applied = normalize_weights(
                    raw, sel, self.normalization, self.fallback
                )
                w, applied = self._mode_weights(w, sel, applied)
                w = tf.stop_gradient(w)
                loss, scaled = self._real_loss(batch, sel, w)
        grads = tape.gradient(
            scaled, tv, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        gate = self._gate()
        applied = tf.logical_and(applied, gate)
        self._apply(grads, new_ntv, applied, replicas)
        self.apply_updates({"labels": batch["labels"]})
        return self._logs(loss, batch, sel, w, l_g, applied)

    def _mode_weights(self, w, sel, applied):
        """The real step's weights for ``weights_mode`` (from the meta
        weights ``w``)."""
        if self.weights_mode == "ones":
            both = tf.logical_or(sel["pos"], sel["neg"])
            return tf.cast(both, tf.float32), tf.constant(True)
        if self.weights_mode == "random_sparse":
            step = tf.cast(self.optimizer.iterations, tf.int64)
            seed = tf.stack([tf.constant(self.weights_seed, tf.int64), step])
            return shuffle_weights(w, sel, seed), applied
        return w, applied

    def _select(self, sim, batch):
        pos, neg = ops.pair_masks(
            batch["labels"], batch["labels"], batch["ids"], batch["ids"]
        )
        return self.base_loss.select(sim, pos, neg)

    def _real_loss(self, batch, sel, w):
        """W-form loss with fixed selection and weights (call under the
        step's tape); returns ``(loss, scaled loss)``."""
        e = batch["embeddings"]
        sim = _similarity(self.base_loss, e)
        per = self.base_loss.weighted(sim, sel, w)
        sw = batch.get("sample_weight")
        if sw is not None:
            per = per * sw
        loss = tf.reduce_mean(per)
        scaled = scale_loss_for_distribution(loss)
        if self.optimizer is not None:
            scaled = self.optimizer.scale_loss(scaled)
        return loss, scaled

    def _apply(self, grads, new_ntv, applied, replicas):
        variables = self.encoder.trainable_variables

        def do_apply():
            self.optimizer.apply(grads, variables)
            for var, value in zip(
                self.encoder.non_trainable_variables, new_ntv
            ):
                var.assign(value)
            return tf.constant(0)

        if replicas > 1 or tf.distribute.has_strategy():
            # No merge_call inside tf.cond: apply zero gradients instead.
            scale = tf.cast(applied, tf.float32)
            self.optimizer.apply([g * scale for g in grads], variables)
            return
        if self.jit_compile:
            # Under XLA (CPU, TF 2.20) the optimizer update inside a
            # conditional made the whole step ~40x slower (benchmarks/
            # mmsi.py, "XLA"). Branch-free and still exact: apply, then put
            # back the old values of every variable the update wrote when
            # the step is skipped.
            if not self.optimizer.built:
                self.optimizer.build(variables)
            touched = (
                list(variables)
                + list(self.optimizer.variables)
                + list(self.encoder.non_trainable_variables)
            )
            old = [tf.identity(tf.convert_to_tensor(v)) for v in touched]
            do_apply()
            for var, value in zip(touched, old):
                var.assign(tf.where(applied, tf.convert_to_tensor(var), value))
            return
        tf.cond(applied, do_apply, lambda: tf.constant(0))

    def _logs(self, loss, batch, sel, w, l_g, applied):
        state = dict(batch)
        state["refs"] = References(
            batch["embeddings"],
            batch["labels"],
            batch["ids"],
            tf.ones_like(batch["labels"], dtype=tf.bool),
        )
        state["classification_loss"] = None
        logs = self.update_metrics(loss, state)
        self.meta_loss_tracker.update_state(l_g)
        selected = tf.logical_or(sel["pos"], sel["neg"])
        n_sel = tf.reduce_sum(tf.cast(selected, tf.float32))
        n_pos = tf.reduce_sum(
            tf.cast(tf.logical_and(selected, w > 0.0), tf.float32)
        )
        logs["meta_loss"] = self.meta_loss_tracker.result()
        logs["weight_positive_fraction"] = tf.math.divide_no_nan(n_pos, n_sel)
        logs["gate_open"] = tf.cast(applied, tf.float32)
        return logs

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.pop("memory", None)
        config.pop("augmenter", None)
        config.update(
            base_loss=keras.saving.serialize_keras_object(self.base_loss),
            dictionary=keras.saving.serialize_keras_object(self.dictionary),
            min_classes_before_update=self.min_classes_before_update,
            virtual_lr=self.virtual_lr,
            path=self.meta_path,
            normalization=self.normalization,
            fallback=self.fallback,
            weights_mode=self.weights_mode,
            weights_seed=self.weights_seed,
        )
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> MMSIModel:
        config = dict(config)
        for key in ("encoder", "base_loss", "dictionary"):
            if isinstance(config.get(key), dict):
                config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)


def _embedding_dim(encoder):
    out = encoder.output
    if isinstance(out, dict) and "embeddings" in out:
        dim = out["embeddings"].shape[-1]
        if dim is not None:
            return int(dim)
    raise ValueError(
        "Cannot read the embedding dimension of the encoder; pass "
        "`dictionary=ClassDictionary(num_classes, dim, d_size)`."
    )


def validation_dataset(
    images: npt.ArrayLike,
    labels: npt.ArrayLike,
    classes_per_batch: int = 10,
    seed: int = 0,
) -> tf.data.Dataset:
    """Infinite K = 1 batches of ``classes_per_batch`` distinct classes.

    MMSI's "validation" batch is a resample of the **training** set (official
    ``valid_loader``), one image per class. ``tfdml.data`` had no balanced
    sampler when this was written, so this samples in-memory arrays.

    Args:
      images: array ``[N, ...]``; labels: int array ``[N]``.
      classes_per_batch: distinct classes per batch (official: 10).
      seed: sampling seed.

    Returns:
      ``tf.data.Dataset`` of ``(images [P, ...], labels [P])``.
    """
    labels = np.asarray(labels).astype(np.int32).reshape(-1)
    classes, inverse = np.unique(labels, return_inverse=True)
    if classes_per_batch < 1 or classes_per_batch > len(classes):
        raise ValueError(
            "`classes_per_batch` must be in [1, number of classes = "
            f"{len(classes)}]; received "
            f"classes_per_batch={classes_per_batch!r}."
        )
    counts = np.bincount(inverse)
    table = np.full((len(classes), counts.max()), -1, np.int64)
    for c in range(len(classes)):
        rows = np.flatnonzero(inverse == c)
        table[c, : len(rows)] = rows
    images_t = tf.constant(images)
    labels_t = tf.constant(labels)
    table_t = tf.constant(table)
    counts_t = tf.constant(counts, tf.int64)
    num = len(classes)

    def sample(step):
        s = tf.stack([tf.cast(seed, tf.int64), step])
        key = tf.random.stateless_uniform([num], seed=s)
        chosen = tf.argsort(key)[:classes_per_batch]
        u = tf.random.stateless_uniform(
            [classes_per_batch], seed=s + 1, dtype=tf.float32
        )
        cnt = tf.gather(counts_t, chosen)
        col = tf.minimum(
            tf.cast(u * tf.cast(cnt, tf.float32), tf.int64), cnt - 1
        )
        idx = tf.gather_nd(
            table_t, tf.stack([tf.cast(chosen, tf.int64), col], axis=1)
        )
        return tf.gather(images_t, idx), tf.gather(labels_t, idx)

    return tf.data.Dataset.range(2**62).map(sample)


def meta_dataset(
    train_dataset: tf.data.Dataset, val_dataset: tf.data.Dataset
) -> tf.data.Dataset:
    """Zips training and validation batches for :class:`MMSIModel`.fit."""
    return tf.data.Dataset.zip((train_dataset, val_dataset))
