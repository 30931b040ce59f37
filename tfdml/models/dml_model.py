"""``DMLModel``: a ``keras.Model`` with the deep-metric-learning train step.

The step (see ``docs/architecture.md``):

1. ``out = encoder(x, training=True)``;
2. under a distribution strategy, all-gathers embeddings, labels (and raw
   head outputs, logits, sample weights) so that the loss sees the global
   batch in replica order (replica 0's rows first) with
   :func:`tfdml.distribute.all_gather`; gradients flow back through
   ``ReplicaContext.all_gather``;
3. gives every example of every step a unique id (a running counter);
4. builds the references (a :class:`tfdml.losses.References`): the batch,
   plus the augmenter's synthetic rows (IAA), plus the memory's valid slots
   (XBM);
5. ``per = loss.per_anchor(emb, labels, refs, ids, probs=...,
   ref_probs=...)`` (with a memory:
   ``memory.per_anchor(loss, emb, labels, ids, refs, ...)``, which weights
   and reduces the memory
   term, see :mod:`tfdml.memory.xbm`); loss = weighted mean over
   anchors + ``classification_loss_weight`` x sparse CE on the logits +
   the layers' regularisation losses, scaled for distribution;
6. applies the gradients, then enqueues the (gathered, stop-gradient)
   batch into the memory;
7. logs ``loss``, ``pos_sim`` and ``neg_sim`` (mean similarity of the
   positive / negative pairs), ``classification_loss`` when used and
   ``xbm_drift`` (mean cosine between a batch embedding and its own copies in
   the memory, before the step's enqueue) when the data carries stable
   example ids: ``y = {"labels": [B], "example_ids": [B]}``.

The augmenter hook (IAA; any object with this method)::

  augmenter.synthesize(raw, labels, ids, embeddings=None)
      -> (ref_embeddings [S, d], ref_labels [S], ref_ids [S][, owner_ids [S]])

``raw`` are the (gathered) pre-normalisation head outputs ``[B, d]``,
``embeddings`` the L2-normalised ones, ``labels`` and ``ids`` the batch's
class and example ids. The returned rows are appended to the references
(never anchors) and must be differentiable functions of ``raw`` if their
gradient should count. ``owner_ids`` (optional) are the example ids of the
batch rows each synthetic row was made from; they select the ``ref_probs``
of the synthetic rows. Only the arguments named in the method's signature are
passed (``raw``, ``labels``, ``ids``, ``embeddings``), so both
``synthesize(raw, labels, ids)`` and ``synthesize(raw, embeddings, labels,
ids)`` work. A method ``synthesize`` is called in training steps only.

Multi-worker training (``tf.distribute.MultiWorkerMirroredStrategy``)::

  # On every worker: the same script, with its own TF_CONFIG, e.g. worker 0:
  # TF_CONFIG='{"cluster": {"worker": ["host0:12345", "host1:12345"]},
  #             "task": {"type": "worker", "index": 0}}'
  strategy = tf.distribute.MultiWorkerMirroredStrategy()
  with strategy.scope():
      encoder = tfdml.models.build_embedding_model(...)
      memory = tfdml.memory.CrossBatchMemory(8192, 128)
      model = tfdml.models.DMLModel(encoder, memory=memory)
      model.compile(optimizer="adam", loss=MultiSimilarityLoss(),
                    jit_compile=False)
  # The dataset yields GLOBAL batches (P x K over all workers); tf.distribute
  # splits each batch across the workers' replicas and DMLModel all-gathers
  # the embeddings again, so the loss (and the memory) sees the whole batch.
  model.fit(dataset, epochs=..., callbacks=[
      keras.callbacks.BackupAndRestore(shared_dir)])  # resumable

Every worker ends with identical weights and an identical memory. Write
checkpoints and models from worker 0 only (``strategy.cluster_resolver.
task_id == 0``); the others write to a temporary directory. XLA is turned
off under Mirrored/MultiWorker strategies: TF 2.20 cannot compile a step
that touches per-replica variables on CPU.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING
from typing import Any

import keras
import numpy.typing as npt
import tensorflow as tf

from tfdml import ops
from tfdml import registry
from tfdml.distribute import all_gather
from tfdml.losses.base import PairLoss
from tfdml.losses.base import References
from tfdml.losses.proxy import ProxyLoss
from tfdml.validation import check_non_negative

if TYPE_CHECKING:
    from tfdml.memory.xbm import CrossBatchMemory

try:  # Keras 3 keeps these helpers outside the public API.
    from keras.src.losses.loss import scale_loss_for_distribution
    from keras.src.losses.loss import unscale_loss_for_distribution
except ImportError:  # pragma: no cover - fallback for other Keras versions

    def scale_loss_for_distribution(value):
        n = tf.distribute.get_strategy().num_replicas_in_sync
        return value / n if n > 1 else value

    def unscale_loss_for_distribution(value):
        n = tf.distribute.get_strategy().num_replicas_in_sync
        return value * n if n > 1 else value


ID_MODULUS = 2**30  # example ids wrap around here (int32, never negative)


def _unpack(data):
    return keras.utils.unpack_x_y_sample_weight(data)


@registry.register
class DMLModel(keras.Model):
    """Wraps an encoder with the DML train step (memory, IAA, CE head).

    Args:
      encoder: a ``keras.Model`` returning ``{"embeddings", "raw"[,
        "logits"]}`` (see :func:`tfdml.models.build_embedding_model`).
      memory: optional :class:`tfdml.memory.CrossBatchMemory`.
      augmenter: optional object with ``synthesize(...)`` (module
        docstring), e.g. IAA.
      classification_loss_weight: weight of the classification loss on
        ``"logits"`` (needs an encoder with a classifier).
      classification_loss: ``"sparse_ce"`` (default: sparse categorical
        cross-entropy) or ``"gaussian_weighted"`` (the official OSM + CAA
        head loss, ``tfdml.losses.osm_caa.gaussian_weighted_cross_entropy``).
      **kwargs: passed to ``keras.Model`` (``name``).

    Compile with a :class:`tfdml.losses.PairLoss` (an instance, a registered
    class name or a ``{"name": ..., **kwargs}`` spec)::

      model = DMLModel(encoder, memory=CrossBatchMemory(8192, 128))
      model.compile(optimizer="adam", loss=MultiSimilarityLoss())
      model.fit(dataset)          # yields (images, labels) batches

    Create encoder, memory and model under ``strategy.scope()`` when a
    distribution strategy is used. Subclasses (``MMSIModel``) reuse
    :meth:`forward`, :meth:`build_references`, :meth:`per_anchor_loss`,
    :meth:`per_step_loss`, :meth:`apply_updates` and :meth:`update_metrics`.
    """

    def __init__(
        self,
        encoder: keras.Model,
        memory: CrossBatchMemory | None = None,
        augmenter: Any = None,
        classification_loss_weight: float = 0.0,
        classification_loss: str = "sparse_ce",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(encoder, keras.Model):
            raise ValueError(
                "`encoder` must be a keras.Model; received "
                f"encoder={encoder!r}."
            )
        if memory is not None and not all(
            hasattr(memory, a) for a in ("references", "enqueue")
        ):
            raise ValueError(
                "`memory` must provide references() and enqueue(); "
                f"received memory={memory!r}."
            )
        if augmenter is not None and not callable(
            getattr(augmenter, "synthesize", None)
        ):
            raise ValueError(
                "`augmenter` must provide a synthesize(...) method; "
                f"received augmenter={augmenter!r}."
            )
        check_non_negative(
            "classification_loss_weight", classification_loss_weight
        )
        self.encoder = encoder
        self.memory = memory
        self.augmenter = augmenter
        self.classification_loss_weight = float(classification_loss_weight)
        if classification_loss not in CLASSIFICATION_LOSSES:
            raise ValueError(
                "`classification_loss` must be one of "
                f"{list(CLASSIFICATION_LOSSES)}; received "
                f"classification_loss={classification_loss!r}."
            )
        self.classification_loss_name = classification_loss
        self._synth_args = None
        if augmenter is not None:
            self._synth_args = _accepted_args(augmenter.synthesize)
        self.examples_seen = keras.Variable(
            0,
            dtype="int32",
            trainable=False,
            autocast=False,
            aggregation="only_first_replica",
            synchronization="on_write",
            name="examples_seen",
        )
        self.pos_sim_tracker = keras.metrics.Mean(name="pos_sim")
        self.neg_sim_tracker = keras.metrics.Mean(name="neg_sim")
        self.cls_loss_tracker = keras.metrics.Mean(name="classification_loss")
        self.drift_tracker = keras.metrics.Mean(name="xbm_drift")
        self.built = True

    # -- Keras plumbing ----------------------------------------------------
    def call(
        self, inputs: tf.Tensor | npt.ArrayLike, training: bool | None = None
    ) -> dict[str, tf.Tensor]:
        return self.encoder(inputs, training=training)

    def compile(
        self,
        optimizer: str | keras.optimizers.Optimizer = "adam",
        loss: PairLoss | ProxyLoss | str | Mapping[str, Any] | None = None,
        proxy_optimizer: keras.optimizers.Optimizer | None = None,
        **kwargs,
    ) -> None:
        """``keras.Model.compile`` with a pair loss (instance or spec) or a
        proxy loss (:class:`tfdml.losses.ProxyLoss`, e.g. Proxy Anchor).

        A proxy loss's weights become a sub-layer of the model (created here,
        under the active strategy scope, with the encoder's embedding size),
        so ``trainable_variables`` and checkpoints include them.
        ``proxy_optimizer`` (proxy losses only): a second Keras optimizer
        for the proxies (e.g. the same optimizer at 100x the learning rate);
        without it ``optimizer`` updates them too.

        ``jit_compile`` is forced off under a multi-replica strategy (XLA
        cannot compile a MirroredStrategy step on CPU in TF 2.20).
        """
        if loss is None:
            raise ValueError(
                "DMLModel.compile needs a pair loss; received loss=None."
            )
        if not isinstance(loss, (PairLoss, ProxyLoss)):
            loss = registry.build(_loss_base(loss), loss)
            if loss is None or not isinstance(loss, (PairLoss, ProxyLoss)):
                raise ValueError(
                    "`loss` must be a tfdml.losses.PairLoss or ProxyLoss or "
                    f"its spec; received loss={loss!r}."
                )
        if isinstance(loss, ProxyLoss):
            self._attach_proxies(loss)
        elif proxy_optimizer is not None:
            raise ValueError(
                "`proxy_optimizer` is only used with a proxy loss "
                f"(tfdml.losses.ProxyLoss); received loss={loss!r}."
            )
        if kwargs.get("jit_compile") is True and self._mirrored():
            warnings.warn(
                "jit_compile=True is not supported under a mirrored "
                "strategy; using jit_compile=False.",
                stacklevel=2,
            )
            kwargs["jit_compile"] = False
        # Keras' CompileLoss would try to map the loss onto the dict outputs
        # (and fails to under a strategy); the pair loss is kept on its own.
        super().compile(optimizer=optimizer, loss=None, **kwargs)
        self.loss = loss
        compile_config = getattr(self, "_compile_config", None)
        if compile_config is not None:  # so that .keras files keep the loss
            compile_config.config["loss"] = loss
        if self._mirrored():
            self.jit_compile = False
        resolve = getattr(self.memory, "resolve_reduction", None)
        if resolve is not None:
            resolve(loss)  # an unsupported memory reduction fails here
        self.proxy_optimizer = None
        if proxy_optimizer is not None:
            proxy_optimizer = keras.optimizers.get(proxy_optimizer)
            if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
                raise ValueError(
                    "`proxy_optimizer` does not combine with loss scaling "
                    "(a mixed_float16 policy); use one optimizer."
                )
            self.proxy_optimizer = proxy_optimizer
            with self.distribute_strategy.scope():
                proxy_optimizer.build(loss.trainable_variables)
                # Built now, over the encoder's variables only: Keras would
                # otherwise build it over every trainable variable (when a
                # strategy's fit builds the model symbolically), giving it
                # unused slots (Adam moments) shaped like the proxies.
                if self.optimizer is not None:
                    self.optimizer.build(self.main_trainable_variables)

    @property
    def main_trainable_variables(self):
        """The trainable variables ``optimizer`` updates: all of them, less
        the proxy loss's proxies when a ``proxy_optimizer`` updates those
        (build the main optimizer over these)."""
        variables = self.trainable_variables
        if getattr(self, "proxy_optimizer", None) is None:
            return variables
        proxy_ids = {id(v) for v in self.loss.trainable_variables}
        return [v for v in variables if id(v) not in proxy_ids]

    def _attach_proxies(self, loss):
        """Checks that the model can train a proxy loss and tracks its
        weights (:class:`tfdml.losses.proxy.ProxyWeights`) as a sub-layer."""
        if self.memory is not None or self.augmenter is not None:
            raise ValueError(
                f"{type(loss).__name__} is a proxy loss: it compares "
                "embeddings with class proxies, not with reference rows, so "
                "it cannot use a memory bank (XBM) or IAA references; "
                f"received memory={self.memory!r}, "
                f"augmenter={self.augmenter!r}."
            )
        if type(self).train_step is not DMLModel.train_step:
            raise ValueError(
                f"{type(self).__name__} (e.g. MMSI) needs a pair loss; "
                f"received the proxy loss {type(loss).__name__}."
            )
        dim = None
        output = getattr(self.encoder, "output", None)
        if isinstance(output, dict) and "embeddings" in output:
            dim = output["embeddings"].shape[-1]
        if not loss.built and dim is None and loss.embedding_dim is None:
            raise ValueError(
                f"Cannot tell the embedding size of {self.encoder.name}: "
                f"create {type(loss).__name__} with embedding_dim=..."
            )
        with self.distribute_strategy.scope():
            loss.build(embedding_dim=dim)
        self.proxy_layer = loss.proxy_layer

    def _mirrored(self):
        strategy = self.distribute_strategy
        return strategy.num_replicas_in_sync > 1 or isinstance(
            strategy,
            (
                tf.distribute.MirroredStrategy,
                tf.distribute.MultiWorkerMirroredStrategy,
            ),
        )

    def compile_from_config(self, config: Mapping[str, Any]) -> None:
        """Re-compiles a loaded ``.keras`` model (optimizer, pair loss)."""
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.optimizer is not None and self.built:
            self.optimizer.build(self.main_trainable_variables)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras' version reduces a PerReplica data batch with
        # strategy.reduce, which fails eagerly under
        # MultiWorkerMirroredStrategy. DMLModel is built at construction, so
        # only the optimizer (and compiled metrics, if any) need building.
        if self._distribute_strategy is None:
            return
        metrics = getattr(self, "_compile_metrics", None)
        if metrics is not None and not metrics.built:
            return super()._maybe_symbolic_build(iterator, data_batch)
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=None)

    @property
    def pair_loss(self):
        """The compiled :class:`tfdml.losses.PairLoss`."""
        loss = getattr(self, "loss", None)
        if not isinstance(loss, PairLoss):
            raise ValueError(
                "DMLModel must be compiled with a tfdml PairLoss; received "
                f"loss={loss!r}."
            )
        return loss

    # -- building blocks (overridable; used by MMSIModel) -----------------
    def forward(
        self,
        x: tf.Tensor | npt.ArrayLike,
        y: tf.Tensor | npt.ArrayLike,
        sample_weight: tf.Tensor | npt.ArrayLike | None = None,
        training: bool = True,
        outputs: Mapping[str, tf.Tensor] | None = None,
    ) -> dict[str, Any]:
        """Encodes and gathers the batch.

        Args:
          x, y, sample_weight: the (local) batch.
          training: passed to the encoder.
          outputs: precomputed encoder outputs (e.g. from
            ``encoder.stateless_call`` in a meta step); ``x`` is then not
            encoded again.

        Returns a dict: ``embeddings``, ``raw``, ``logits`` (or None),
        ``labels`` (int32 [B]), ``ids`` (int32 [B]), ``probs`` (softmax of
        the logits at the true label, no gradient, or None),
        ``sample_weight`` (or None), all for the global batch.
        """
        keys = None
        if isinstance(y, dict):
            if "labels" not in y:
                raise ValueError(
                    "A dict `y` must hold 'labels' (and optionally "
                    f"'example_ids'); received keys {sorted(y)}."
                )
            keys = y.get("example_ids")
            y = y["labels"]
        out = outputs
        if out is None:
            out = self.encoder(x, training=training)
        if not isinstance(out, dict) or "embeddings" not in out:
            raise ValueError(
                "The encoder must return a dict with 'embeddings'; received "
                f"{type(out).__name__}."
            )
        labels, emb = ops.check_labels_embeddings(y, out["embeddings"])
        emb = tf.cast(emb, tf.float32)
        raw = out.get("raw")
        logits = out.get("logits")
        batch = {
            "embeddings": all_gather(emb),
            "labels": all_gather(labels),
            "raw": None,
            "logits": None,
            "probs": None,
            "sample_weight": None,
        }
        if raw is not None and training and self.augmenter is not None:
            batch["raw"] = all_gather(tf.cast(raw, tf.float32))
        if logits is not None:
            logits = all_gather(tf.cast(logits, tf.float32))
            batch["logits"] = logits
            probs = tf.gather(
                tf.nn.softmax(logits), batch["labels"], batch_dims=1
            )
            batch["probs"] = tf.stop_gradient(probs)
        if sample_weight is not None:
            sw = tf.reshape(tf.cast(sample_weight, tf.float32), [-1])
            batch["sample_weight"] = all_gather(sw)
        batch["keys"] = None
        if keys is not None:
            batch["keys"] = all_gather(
                tf.reshape(tf.cast(keys, tf.int32), [-1])
            )
        n = tf.shape(batch["labels"])[0]
        batch["ids"] = self.example_ids(n)
        return batch

    def example_ids(self, n: int | tf.Tensor) -> tf.Tensor:
        """Ids ``seen, seen + 1, ...`` for the next ``n`` examples."""
        seen = tf.convert_to_tensor(self.examples_seen)
        return tf.math.floormod(seen + tf.range(n, dtype=tf.int32), ID_MODULUS)

    def build_references(
        self, batch: Mapping[str, Any], training: bool = True
    ) -> dict[str, Any]:
        """Batch + augmenter rows (training only) + memory slots.

        Returns a dict: ``refs``, a :class:`tfdml.losses.References`
        (embeddings, labels, ids, valid), and ``ref_probs`` (when the batch
        has probs; memory rows get 1).
        """
        emb, labels, ids = batch["embeddings"], batch["labels"], batch["ids"]
        parts_e, parts_y, parts_i = [emb], [labels], [ids]
        parts_v = [tf.ones(tf.shape(labels)[:1], dtype=tf.bool)]
        if labels.shape.rank == 2:
            c = labels.shape[-1]
            if training and self.augmenter is not None:
                raise ValueError(
                    f"multi-hot `labels` (shape {labels.shape}) do not work "
                    "with an augmenter (IAA): it synthesizes rows of one int "
                    "class id; train without it."
                )
            width = getattr(self.memory, "multi_hot_classes", None)
            if self.memory is not None and width != c:
                raise ValueError(
                    f"multi-hot `labels` (shape {labels.shape}) need a "
                    "memory that stores label rows of the same width: "
                    f"CrossBatchMemory(..., multi_hot_classes={c}); "
                    f"received memory={self.memory!r} (multi_hot_classes="
                    f"{width})."
                )
        elif getattr(self.memory, "multi_hot_classes", None) is not None:
            raise ValueError(
                "The memory stores multi-hot label rows (multi_hot_classes="
                f"{self.memory.multi_hot_classes}); `labels` are class ids "
                f"of shape {labels.shape}: give [batch, "
                f"{self.memory.multi_hot_classes}] multi-hot labels or a "
                "memory without multi_hot_classes."
            )
        probs = batch.get("probs")
        parts_p = [probs] if probs is not None else None
        if training and self.augmenter is not None:
            synth = self._synthesize(batch)
            s_emb, s_lab, s_ids = synth[0], synth[1], synth[2]
            s_lab = tf.cast(s_lab, tf.int32)
            parts_e.append(tf.cast(s_emb, tf.float32))
            parts_y.append(s_lab)
            parts_i.append(tf.cast(s_ids, tf.int32))
            parts_v.append(tf.ones_like(s_lab, dtype=tf.bool))
            if parts_p is not None:
                if len(synth) > 3 and synth[3] is not None:
                    owner = tf.cast(synth[3], tf.int32)
                    # The owner's position in the batch (ids are contiguous).
                    pos = tf.math.floormod(owner - ids[0], ID_MODULUS)
                    parts_p.append(tf.gather(probs, pos))
                else:
                    parts_p.append(tf.ones_like(s_lab, dtype=tf.float32))
        if self.memory is not None:
            m_emb, m_lab, m_ids, m_valid = self.memory.references()
            parts_e.append(tf.cast(m_emb, tf.float32))
            parts_y.append(tf.cast(m_lab, tf.int32))
            parts_i.append(tf.cast(m_ids, tf.int32))
            parts_v.append(tf.cast(m_valid, tf.bool))
            if parts_p is not None:  # one per row (labels may be [M, C])
                parts_p.append(tf.ones_like(m_ids, dtype=tf.float32))
        refs = {
            "refs": References(
                tf.concat(parts_e, 0),
                tf.concat(parts_y, 0),
                tf.concat(parts_i, 0),
                tf.concat(parts_v, 0),
            )
        }
        if parts_p is not None:
            refs["ref_probs"] = tf.concat(parts_p, 0)
        return refs

    def _synthesize(self, batch):
        available = {
            "raw": batch["raw"],
            "embeddings": batch["embeddings"],
            "labels": batch["labels"],
            "ids": batch["ids"],
        }
        if self._synth_args is None:
            kwargs = available
        else:
            kwargs = {
                k: v for k, v in available.items() if k in self._synth_args
            }
        out = self.augmenter.synthesize(**kwargs)
        if not isinstance(out, (tuple, list)) or len(out) not in (3, 4):
            raise ValueError(
                "augmenter.synthesize must return (embeddings, labels, ids"
                f"[, owner_ids]); received {type(out).__name__}."
            )
        return out

    def per_anchor_loss(
        self, batch: Mapping[str, Any], refs: Mapping[str, Any]
    ) -> tf.Tensor:
        """The compiled pair loss per anchor ``[B]`` (global batch).

        External per-pair weights are not a step input: MMSI weights its
        pairs with its own W-form (:meth:`tfdml.meta.forms.MMSIPairLoss.
        weighted`) on a fixed selection; ``PairLoss.per_anchor(...,
        pair_weights=...)`` is the functional entry point for them.
        """
        if isinstance(getattr(self, "loss", None), ProxyLoss):
            return self.loss.per_anchor(batch["embeddings"], batch["labels"])
        context = {}
        if batch.get("probs") is not None:
            context["probs"] = batch["probs"]
            if "ref_probs" in refs:
                context["ref_probs"] = refs["ref_probs"]
        if self.memory is not None and hasattr(self.memory, "per_anchor"):
            return self.memory.per_anchor(
                self.pair_loss,
                batch["embeddings"],
                batch["labels"],
                batch["ids"],
                refs["refs"],
                **context,
            )
        return self.pair_loss.per_anchor(
            batch["embeddings"],
            batch["labels"],
            refs["refs"],
            batch["ids"],
            **context,
        )

    def classification_loss(self, batch: Mapping[str, Any]) -> tf.Tensor | None:
        """Sparse categorical CE on the logits (0 without weight)."""
        if self.classification_loss_weight == 0.0:
            return None
        if batch.get("logits") is None:
            raise ValueError(
                "classification_loss_weight="
                f"{self.classification_loss_weight} needs an encoder with a "
                "'logits' output (build_embedding_model(num_classes=...))."
            )
        if self.classification_loss_name == "gaussian_weighted":
            from tfdml.losses.osm_caa import gaussian_weighted_cross_entropy

            return gaussian_weighted_cross_entropy(
                batch["labels"], batch["logits"], batch.get("sample_weight")
            )
        ce = keras.losses.sparse_categorical_crossentropy(
            batch["labels"], batch["logits"], from_logits=True
        )
        return _weighted_mean(ce, batch.get("sample_weight"))

    def per_step_loss(
        self,
        x: tf.Tensor | npt.ArrayLike,
        y: tf.Tensor | npt.ArrayLike,
        sample_weight: tf.Tensor | npt.ArrayLike | None = None,
        training: bool = True,
        outputs: Mapping[str, tf.Tensor] | None = None,
    ) -> tuple[tf.Tensor, dict[str, Any]]:
        """Forward pass and total (unscaled) loss of one step.

        Args:
          x, y, sample_weight: the batch.
          training: training mode (augmenter rows only when True).
          outputs: precomputed encoder outputs (see :meth:`forward`).

        Returns ``(loss, state)``; ``state`` holds the batch dict entries,
        the references, ``per_anchor``, ``pair_loss`` and
        ``classification_loss``. The loss is not scaled for distribution.
        """
        batch = self.forward(
            x, y, sample_weight, training=training, outputs=outputs
        )
        refs = self.build_references(batch, training=training)
        per = self.per_anchor_loss(batch, refs)
        pair = _weighted_mean(per, batch["sample_weight"])
        total = pair
        cls = self.classification_loss(batch)
        if cls is not None:
            total = total + self.classification_loss_weight * cls
        if self.losses:
            total = total + tf.add_n(
                [tf.cast(v, tf.float32) for v in self.losses]
            )
        # Pair masks silently drop NaN similarities (every comparison is
        # False), so a diverged encoder could report a finite loss. Make a
        # non-finite embedding show up as a NaN loss (TerminateOnNaN).
        finite = tf.reduce_all(tf.math.is_finite(batch["embeddings"]))
        total = tf.where(finite, total, tf.constant(float("nan")))
        state = dict(batch)
        state.update(refs)
        state.update(per_anchor=per, pair_loss=pair, classification_loss=cls)
        if (
            training
            and batch.get("keys") is not None
            and hasattr(self.memory, "drift")
        ):
            # before apply_updates enqueues this batch
            state["xbm_drift"] = self.memory.drift(
                batch["embeddings"], batch["keys"]
            )
        return total, state

    def apply_updates(self, state: Mapping[str, Any]) -> None:
        """After the optimizer step: fills the memory, advances the ids."""
        if self.memory is not None:
            extra = {}
            if state.get("keys") is not None:
                extra["keys"] = state["keys"]
            self.memory.enqueue(
                tf.stop_gradient(state["embeddings"]),
                state["labels"],
                state["ids"],
                **extra,
            )
        n = tf.shape(state["labels"])[0]
        seen = tf.convert_to_tensor(self.examples_seen)
        self.examples_seen.assign(tf.math.floormod(seen + n, ID_MODULUS))

    def update_metrics(
        self, loss: tf.Tensor, state: Mapping[str, Any]
    ) -> dict[str, tf.Tensor]:
        """Updates loss / pos_sim / neg_sim trackers; returns the logs."""
        n = tf.shape(state["labels"])[0]
        self._loss_tracker.update_state(loss, sample_weight=n)
        refs = state["refs"]
        emb = tf.stop_gradient(state["embeddings"])
        ref = tf.stop_gradient(refs.embeddings)
        sim = ops.cosine_similarity(emb, ref)
        pos, neg = ops.pair_masks(
            state["labels"],
            refs.labels,
            state["ids"],
            refs.ids,
            refs.valid,
            # The loss's own notion of a relevant pair, if it has one.
            relevance=getattr(self.loss, "relevance", None),
        )
        for tracker, mask in (
            (self.pos_sim_tracker, pos),
            (self.neg_sim_tracker, neg),
        ):
            m = tf.cast(mask, tf.float32)
            count = tf.reduce_sum(m)
            value = tf.math.divide_no_nan(tf.reduce_sum(sim * m), count)
            tracker.update_state(
                value, sample_weight=tf.cast(count > 0, tf.float32)
            )
        logs = {
            "loss": self._loss_tracker.result(),
            "pos_sim": self.pos_sim_tracker.result(),
            "neg_sim": self.neg_sim_tracker.result(),
        }
        if state.get("classification_loss") is not None:
            self.cls_loss_tracker.update_state(state["classification_loss"])
            logs["classification_loss"] = self.cls_loss_tracker.result()
        if state.get("xbm_drift") is not None:
            drift, count = state["xbm_drift"]
            self.drift_tracker.update_state(
                drift, sample_weight=tf.cast(count, tf.float32)
            )
            logs["xbm_drift"] = self.drift_tracker.result()
        if isinstance(
            self.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy
        ):
            # Keras reduces multi-worker step outputs with
            # strategy.reduce("MEAN", v, axis=0), which rejects scalars.
            logs = {k: tf.reshape(v, [1]) for k, v in logs.items()}
        return logs

    # -- steps -------------------------------------------------------------
    def train_step(self, data: Any) -> dict[str, tf.Tensor]:
        x, y, sample_weight = _unpack(data)
        with tf.GradientTape() as tape:
            loss, state = self.per_step_loss(x, y, sample_weight, training=True)
            scaled = scale_loss_for_distribution(loss)
            if self.optimizer is not None:
                scaled = self.optimizer.scale_loss(scaled)
        variables = self.trainable_variables
        grads = tape.gradient(scaled, variables)
        if getattr(self, "proxy_optimizer", None) is not None:
            proxy_ids = {id(v) for v in self.loss.trainable_variables}
            for opt, own in (
                (self.optimizer, False),
                (self.proxy_optimizer, True),
            ):
                pairs = [
                    (g, v)
                    for g, v in zip(grads, variables)
                    if (id(v) in proxy_ids) == own
                ]
                opt.apply([g for g, _ in pairs], [v for _, v in pairs])
        else:
            self.optimizer.apply(grads, variables)
        self.apply_updates(state)
        return self.update_metrics(loss, state)

    def test_step(self, data: Any) -> dict[str, tf.Tensor]:
        x, y, sample_weight = _unpack(data)
        loss, state = self.per_step_loss(x, y, sample_weight, training=False)
        return self.update_metrics(loss, state)

    def predict_step(self, data: Any) -> dict[str, tf.Tensor]:
        x, _, _ = _unpack(data)
        return self.encoder(x, training=False)

    # -- serialisation -----------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        config = {
            "name": self.name,
            "encoder": keras.saving.serialize_keras_object(self.encoder),
            "memory": keras.saving.serialize_keras_object(self.memory),
            "augmenter": (
                keras.saving.serialize_keras_object(self.augmenter)
                if hasattr(self.augmenter, "get_config")
                else None
            ),
            "classification_loss_weight": self.classification_loss_weight,
            "classification_loss": self.classification_loss_name,
        }
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DMLModel:
        config = dict(config)
        for key in ("encoder", "memory", "augmenter"):
            if isinstance(config.get(key), dict):
                config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)


CLASSIFICATION_LOSSES = ("sparse_ce", "gaussian_weighted")


def _loss_base(spec):
    """``ProxyLoss`` when ``spec`` names a registered proxy loss, else
    ``PairLoss`` (for :func:`tfdml.registry.build`)."""
    name = spec
    if isinstance(spec, dict):
        name = spec.get("name", spec.get("class_name", ""))
    if isinstance(name, str):
        name = name.split(">")[-1]
        if name in registry.registered(ProxyLoss):
            return ProxyLoss
    return PairLoss


def _weighted_mean(values, sample_weight=None):
    """``sum(w * v) / len(v)`` (Keras' sum_over_batch_size), float32."""
    values = tf.cast(values, tf.float32)
    n = tf.cast(tf.shape(values)[0], tf.float32)
    if sample_weight is not None:
        values = values * tf.cast(sample_weight, tf.float32)
    return tf.math.divide_no_nan(tf.reduce_sum(values), n)


def _accepted_args(fn):
    """Parameter names of ``fn`` or None when it takes ``**kwargs``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}
