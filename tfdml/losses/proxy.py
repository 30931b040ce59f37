"""Proxy losses: the base class that owns trainable class proxies, and the
proxy-based losses of Kim et al. (Proxy Anchor, CVPR 2020) and
Movshovitz-Attias et al. (ProxyNCA, ICCV 2017; ProxyNCA++, Teh et al.,
ECCV 2020).

The pattern (see ``docs/adding_a_loss.md``): a :class:`ProxyLoss` is a
``keras.losses.Loss`` that holds a small registered layer,
:class:`ProxyWeights`, with the ``[num_classes * proxies_per_class,
embedding_dim]`` weight matrix. ``DMLModel.compile`` tracks that layer as a
sub-layer, so ``model.trainable_variables``, ``model.fit``, checkpoints
(``tf.train.Checkpoint``, the run's ``Checkpointer``) and MirroredStrategy
(the variables are created under the active strategy scope) all see the
proxies. ``get_config`` holds the hyper-parameters only (never the weights).

Labels are class ids in ``[0, num_classes)`` (``[B]`` or ``[B, 1]``, integer
or integral floats); an id outside that range raises ``ValueError`` (static
labels) or ``InvalidArgumentError`` (run time; under XLA, where asserts are
compiled away, the loss becomes NaN). Multi-hot labels are rejected.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import numpy as np
import numpy.typing as npt
import tensorflow as tf

from tfdml import ops
from tfdml import registry
from tfdml.losses.base import check_labels
from tfdml.losses.base import nan_if_not_finite
from tfdml.validation import check_non_negative
from tfdml.validation import check_positive


def _check_count(name, value, allow_none=True):
    if value is None and allow_none:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < 1
    ):
        raise ValueError(
            f"`{name}` must be an int >= 1; received {name}={value!r}."
        )
    return int(value)


@registry.register
class ProxyWeights(keras.layers.Layer):
    """The trainable proxies of a :class:`ProxyLoss` (a Keras layer, so that
    models, checkpoints and strategies track them).

    Args:
      num_classes, embedding_dim: shape of the classes and of a proxy.
      proxies_per_class: ``K`` proxies per class (sub-centres, SoftTriple
        centres); rows ``c * K ... c * K + K - 1`` belong to class ``c``.
      initializer: a Keras initializer (or its name / config).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        proxies_per_class: int = 1,
        initializer: str
        | Mapping[str, Any]
        | keras.initializers.Initializer = "random_normal",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_classes = _check_count("num_classes", num_classes, False)
        self.embedding_dim = _check_count("embedding_dim", embedding_dim, False)
        self.proxies_per_class = _check_count(
            "proxies_per_class", proxies_per_class, False
        )
        self.initializer = keras.initializers.get(initializer)

    def build(self, input_shape: tuple[int | None, ...] | None = None) -> None:
        self.proxies = self.add_weight(
            shape=(
                self.num_classes * self.proxies_per_class,
                self.embedding_dim,
            ),
            initializer=self.initializer,
            trainable=True,
            dtype="float32",
            name="proxies",
        )

    def call(self, inputs: Any = None) -> tf.Tensor:
        return self.proxies

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            embedding_dim=self.embedding_dim,
            proxies_per_class=self.proxies_per_class,
            initializer=keras.initializers.serialize(self.initializer),
        )
        return config


def check_class_labels(labels, embeddings, num_classes, name="labels"):
    """``(int32 labels [B], embeddings [B, d])``: integral class ids in
    ``[0, num_classes)``, one per row (see the module docstring)."""
    labels = tf.convert_to_tensor(labels)
    if labels.shape.rank == 2 and labels.shape[-1] != 1:
        raise ValueError(
            f"`{name}` must be class ids [batch] (or [batch, 1]) for a proxy "
            f"loss (one proxy set per class); received shape {labels.shape} "
            "(multi-hot labels are not supported)."
        )
    labels, embeddings = check_labels(labels, embeddings, name=name)
    value = tf.get_static_value(labels)
    if value is not None:
        value = np.asarray(value)
        bad = value[(value < 0) | (value >= num_classes)]
        if bad.size:
            raise ValueError(
                f"`{name}` must be class ids in [0, num_classes={num_classes})"
                f"; received {sorted(set(bad.tolist()))[:5]}."
            )
        return labels, embeddings
    ok = tf.reduce_all((labels >= 0) & (labels < num_classes))
    check = tf.debugging.Assert(
        ok,
        [f"`{name}` must be class ids in [0, num_classes={num_classes})."],
        name="labels_in_range",
    )
    with tf.control_dependencies([check] if check is not None else []):
        labels = tf.identity(labels)
    # XLA drops the assert (and gathers clip): make the loss NaN instead.
    nan = tf.constant(float("nan"), embeddings.dtype)
    embeddings = embeddings + tf.where(ok, tf.zeros([], embeddings.dtype), nan)
    return labels, embeddings


class ProxyLoss(keras.losses.Loss):
    """Base class of the losses that own trainable proxies / class weights.

    Keras entry point ``loss(y_true=labels [B], y_pred=embeddings [B, d])``
    -> the mean over anchors (``[B]`` per-anchor values with
    ``reduction=None``). Functional entry point :meth:`per_anchor`
    ``(embeddings, labels) -> [B]``, whose mean is the loss (losses that do
    not decompose over anchors, such as Proxy Anchor, return the batch loss
    in every entry).

    Args:
      num_classes: number of classes (labels are ids in ``[0,
        num_classes)``). May be left ``None`` and set before the proxies are
        created (``train.py`` fills it from the data).
      embedding_dim: proxy dimension; ``None`` takes it from the first batch
        or from the model (``DMLModel.compile``).
      initializer: Keras initializer of the proxies (default: the paper's).
      **kwargs: ``keras.losses.Loss`` arguments (``name``, ``reduction``).

    The weights are created by :meth:`build` (called by the first use,
    ``DMLModel.compile`` or :attr:`proxies` once both sizes are known);
    create them under ``strategy.scope()`` when a strategy is used. Fix them
    in tests with ``loss.proxies.assign(value)``.
    """

    proxies_per_class = 1

    def __init__(
        self,
        num_classes: int | None = None,
        embedding_dim: int | None = None,
        initializer: str
        | Mapping[str, Any]
        | keras.initializers.Initializer
        | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_classes = _check_count("num_classes", num_classes)
        self.embedding_dim = _check_count("embedding_dim", embedding_dim)
        if initializer is None:
            initializer = self.default_initializer()
        self.initializer = keras.initializers.get(initializer)
        self.proxy_layer = None
        if self.num_classes is not None and self.embedding_dim is not None:
            self.build()

    # -- proxies -----------------------------------------------------------
    def default_initializer(self) -> keras.initializers.Initializer:
        return keras.initializers.RandomNormal(stddev=1.0)

    @property
    def built(self):
        return self.proxy_layer is not None

    def build(
        self, embedding_dim: int | None = None, num_classes: int | None = None
    ) -> None:
        """Creates the proxies (once). Sizes given here fill the ones left
        ``None`` at construction and must agree with the others."""
        for key, value in (
            ("embedding_dim", embedding_dim),
            ("num_classes", num_classes),
        ):
            value = _check_count(key, value)
            have = getattr(self, key)
            if value is not None and have is not None and value != have:
                raise ValueError(
                    f"`{key}`={value} does not match the loss's {key}={have}."
                )
            if have is None:
                setattr(self, key, value)
        if self.proxy_layer is not None:
            return
        for key in ("num_classes", "embedding_dim"):
            if getattr(self, key) is None:
                raise ValueError(
                    f"{type(self).__name__} needs `{key}` to create its "
                    f"proxies; received {key}=None."
                )
        # A fresh initializer: an unseeded one draws its seed now (after
        # keras.utils.set_random_seed in a run), not when the loss was
        # configured, so that seeded runs start from the same proxies.
        initializer = keras.initializers.get(
            keras.initializers.serialize(self.initializer)
        )
        with tf.init_scope():
            layer = ProxyWeights(
                self.num_classes,
                self.embedding_dim,
                proxies_per_class=self.proxies_per_class,
                initializer=initializer,
                name=f"{self.name}_proxies",
            )
            layer.build()
        self.proxy_layer = layer

    @property
    def proxies(self):
        """The ``[num_classes * proxies_per_class, embedding_dim]`` weight
        variable (created on first access)."""
        self.build()
        return self.proxy_layer.proxies

    @property
    def trainable_variables(self):
        return [] if self.proxy_layer is None else [self.proxy_layer.proxies]

    # -- Keras entry point -------------------------------------------------
    def __call__(
        self,
        y_true: tf.Tensor | npt.ArrayLike,
        y_pred: tf.Tensor | npt.ArrayLike,
        sample_weight: tf.Tensor | npt.ArrayLike | None = None,
    ) -> tf.Tensor:
        y_pred = tf.convert_to_tensor(y_pred)
        if not self.built and y_pred.shape.rank == 2:
            self.build(embedding_dim=y_pred.shape[-1])
        labels, checked = check_class_labels(y_true, y_pred, self.num_classes)
        if labels.shape[0] == 0 and self.reduction not in (None, "none"):
            return tf.cast(tf.reduce_sum(checked), self.dtype)
        # Keras converts y_true to the loss dtype: ids < 2**24 stay exact.
        return super().__call__(labels, checked, sample_weight=sample_weight)

    def call(
        self,
        y_true: tf.Tensor | npt.ArrayLike,
        y_pred: tf.Tensor | npt.ArrayLike,
    ) -> tf.Tensor:
        return self.per_anchor(y_pred, y_true)

    # -- functional entry point --------------------------------------------
    def per_anchor(
        self,
        embeddings: tf.Tensor | npt.ArrayLike,
        labels: tf.Tensor | npt.ArrayLike,
    ) -> tf.Tensor:
        """Per-anchor loss ``[B]`` (``embeddings [B, d]``, ``labels [B]``)."""
        embeddings = tf.convert_to_tensor(embeddings)
        if not self.built and embeddings.shape.rank == 2:
            self.build(embedding_dim=embeddings.shape[-1])
        self.build()
        labels, embeddings = check_class_labels(
            labels, embeddings, self.num_classes
        )
        emb = ops.l2_normalize(embeddings)
        proxies = tf.convert_to_tensor(self.proxies)
        loss = self.proxy_loss(
            emb, ops.l2_normalize(proxies), labels, raw_proxies=proxies
        )
        return nan_if_not_finite(loss, embeddings, proxies)

    def similarities(
        self, embeddings: tf.Tensor | npt.ArrayLike, proxies: tf.Tensor
    ) -> tf.Tensor:
        """``[B, C, K]`` cosine similarities (inputs already normalised)."""
        sim = tf.matmul(embeddings, proxies, transpose_b=True)
        return tf.reshape(sim, [-1, self.num_classes, self.proxies_per_class])

    def proxy_loss(
        self,
        embeddings: tf.Tensor | npt.ArrayLike,
        proxies: tf.Tensor,
        labels: tf.Tensor | npt.ArrayLike,
        raw_proxies: tf.Tensor | None = None,
    ) -> tf.Tensor:
        """Per-anchor loss ``[B]`` from unit embeddings and proxies."""
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            embedding_dim=self.embedding_dim,
            initializer=keras.initializers.serialize(self.initializer),
        )
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ProxyLoss:
        return cls(**config)


def class_mask(labels, num_classes):
    """``[B, C]`` bool: ``labels[i] == c``."""
    return tf.equal(labels[:, None], tf.range(num_classes)[None, :])


def softmax_cross_entropy(logits, labels):
    """``[B]`` sparse softmax cross-entropy (float32)."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=labels, logits=logits
    )


def proxy_anchor_terms(sim, labels, num_classes, alpha, delta):
    """Per-proxy terms of Proxy Anchor (Kim et al., CVPR 2020, Eq. 4).

    Args:
      sim: ``[B, C]`` cosine similarity of each embedding to each proxy.
      labels: ``[B]`` class ids.

    Returns ``(pos [C], has_pos [C] bool, neg [C])``:
    ``pos_p = log(1 + sum_{x in X_p+} exp(-alpha (s(x, p) - delta)))``,
    ``neg_p = log(1 + sum_{x in X_p-} exp(alpha (s(x, p) + delta)))``.
    """
    one_hot = class_mask(labels, num_classes)
    pos = ops.masked_logsumexp(
        -alpha * (sim - delta), one_hot, axis=0, add_one=True
    )
    neg = ops.masked_logsumexp(
        alpha * (sim + delta), tf.logical_not(one_hot), axis=0, add_one=True
    )
    has_pos = tf.reduce_any(one_hot, axis=0)
    return pos, has_pos, neg


def proxy_anchor(sim, labels, num_classes, alpha=32.0, delta=0.1):
    """Proxy Anchor loss (scalar): mean of ``pos_p`` over the proxies with a
    positive in the batch plus mean of ``neg_p`` over all proxies."""
    pos, has_pos, neg = proxy_anchor_terms(
        sim, labels, num_classes, alpha, delta
    )
    n_pos = tf.reduce_sum(tf.cast(has_pos, sim.dtype))
    pos_term = tf.math.divide_no_nan(
        tf.reduce_sum(tf.where(has_pos, pos, tf.zeros_like(pos))), n_pos
    )
    return pos_term + tf.reduce_mean(neg)


@registry.register
class ProxyAnchorLoss(ProxyLoss):
    """Proxy Anchor loss (Kim, Kim, Cho and Kwak, CVPR 2020), Eq. 4.

    ``l = 1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} e^{-alpha (s(x,p) -
    delta)}) + 1/|P| sum_{p in P} log(1 + sum_{x in X_p-} e^{alpha (s(x,p) +
    delta)})``, ``s`` the cosine similarity, ``P+`` the proxies of the
    classes present in the batch. Defaults from the paper: ``alpha=32``,
    ``delta=0.1``; proxies initialised as in the authors' code (PyTorch
    ``kaiming_normal_(mode="fan_out")`` on ``[C, d]``: normal with std
    ``sqrt(2 / C)``). The paper trains the proxies at 100x the backbone
    learning rate (``optimizer.proxy_lr_multiplier`` in train.py configs).

    The loss does not decompose over anchors: :meth:`per_anchor` (and
    ``reduction=None``) return the batch loss in every entry, so the mean
    is the loss and ``sample_weight`` scales it by the mean weight.

    pytorch-metric-learning 2.9 ``ProxyAnchorLoss(num_classes,
    embedding_size, margin=0.1, alpha=32)``: the same formula, defaults and
    initialisation (``margin`` is ``delta``).
    """

    def __init__(
        self,
        num_classes: int | None = None,
        embedding_dim: int | None = None,
        alpha: float = 32.0,
        delta: float = 0.1,
        initializer: str
        | Mapping[str, Any]
        | keras.initializers.Initializer
        | None = None,
        name: str = "proxy_anchor_loss",
        **kwargs,
    ):
        self.alpha = check_positive("alpha", alpha)
        self.delta = check_non_negative("delta", delta)
        super().__init__(
            num_classes, embedding_dim, initializer, name=name, **kwargs
        )

    def default_initializer(self) -> keras.initializers.Initializer:
        # kaiming_normal_(fan_out) on torch's [C, d] = std sqrt(2 / C); Keras
        # reads fan_in from shape[0] of a 2-D weight.
        return keras.initializers.VarianceScaling(
            2.0, mode="fan_in", distribution="untruncated_normal"
        )

    def proxy_loss(
        self,
        embeddings: tf.Tensor | npt.ArrayLike,
        proxies: tf.Tensor,
        labels: tf.Tensor | npt.ArrayLike,
        raw_proxies: tf.Tensor | None = None,
    ) -> tf.Tensor:
        sim = self.similarities(embeddings, proxies)[:, :, 0]
        loss = proxy_anchor(
            sim, labels, self.num_classes, self.alpha, self.delta
        )
        return tf.fill(tf.shape(labels), loss)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(alpha=self.alpha, delta=self.delta)
        return config


def proxy_nca(
    sim, labels, num_classes, temperature=1.0, include_positive=False
):
    """ProxyNCA per anchor ``[B]``: ``d = |x - p|^2 = 2 - 2 s`` (unit
    vectors), ``-log(e^{-d(x, p_y)/T} / sum_z e^{-d(x, p_z)/T})`` with ``z``
    over the other classes (Movshovitz-Attias et al. 2017, Eq. 8) or over
    all classes (``include_positive``, ProxyNCA++)."""
    logits = -(2.0 - 2.0 * sim) / temperature
    one_hot = class_mask(labels, num_classes)
    target = tf.reduce_sum(
        tf.where(one_hot, logits, tf.zeros_like(logits)), axis=1
    )
    mask = tf.ones_like(one_hot) if include_positive else ~one_hot
    return ops.masked_logsumexp(logits, mask, axis=1) - target


@registry.register
class ProxyNCALoss(ProxyLoss):
    """ProxyNCA (Movshovitz-Attias, Toshev, Leung, Ioffe and Singh, ICCV
    2017), with the ProxyNCA++ temperature (Teh, DeVries and Taylor, ECCV
    2020) as an option.

    Per anchor: ``-log(exp(-d(x, p_y) / T) / sum_z exp(-d(x, p_z) / T))``,
    ``d`` the squared Euclidean distance between the L2-normalised
    embedding and proxies. Defaults: the original loss (``temperature=1``,
    the sum over the *other* classes, ``include_positive=False``; it can go
    below 0). ProxyNCA++: ``temperature=1/9``, ``include_positive=True``
    (a softmax cross-entropy over the classes).

    pytorch-metric-learning 2.9 ``ProxyNCALoss(num_classes, embedding_size,
    softmax_scale=1)``: the ProxyNCA++ form (the positive proxy is in the
    denominator) with ``softmax_scale = 1 / temperature``; initialised with
    ``torch.nn.init.normal_`` (std 1), as here.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        embedding_dim: int | None = None,
        temperature: float = 1.0,
        include_positive: bool = False,
        initializer: str
        | Mapping[str, Any]
        | keras.initializers.Initializer
        | None = None,
        name: str = "proxy_nca_loss",
        **kwargs,
    ):
        self.temperature = check_positive("temperature", temperature)
        self.include_positive = bool(include_positive)
        if num_classes == 1 and not self.include_positive:
            raise ValueError(
                "ProxyNCALoss with include_positive=False needs num_classes "
                ">= 2 (the denominator sums over the other classes); "
                "received num_classes=1."
            )
        super().__init__(
            num_classes, embedding_dim, initializer, name=name, **kwargs
        )

    def proxy_loss(
        self,
        embeddings: tf.Tensor | npt.ArrayLike,
        proxies: tf.Tensor,
        labels: tf.Tensor | npt.ArrayLike,
        raw_proxies: tf.Tensor | None = None,
    ) -> tf.Tensor:
        sim = self.similarities(embeddings, proxies)[:, :, 0]
        return proxy_nca(
            sim,
            labels,
            self.num_classes,
            self.temperature,
            self.include_positive,
        )

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            temperature=self.temperature,
            include_positive=self.include_positive,
        )
        return config


def kaiming_uniform_sqrt5():
    """PyTorch's ``kaiming_uniform_(a=sqrt(5))`` (the ``nn.Linear`` default)
    on ``[C, d]`` with fan ``C``: uniform in ``+-1/sqrt(C)``."""
    return keras.initializers.VarianceScaling(
        1.0 / 3.0, mode="fan_in", distribution="uniform"
    )


__all__ = [
    "ProxyAnchorLoss",
    "ProxyLoss",
    "ProxyNCALoss",
    "ProxyWeights",
    "check_class_labels",
    "class_mask",
    "kaiming_uniform_sqrt5",
    "proxy_anchor",
    "proxy_anchor_terms",
    "proxy_nca",
    "softmax_cross_entropy",
]
