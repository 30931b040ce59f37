"""SoftTriple loss (Qian, Shang, Sun, Hu, Li and Jin, ICCV 2019).

``K`` centres per class (a :class:`tfdml.losses.proxy.ProxyLoss`; rows
``c * K ... c * K + K - 1`` of the proxies are class ``c``'s centres).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import numpy.typing as npt
import tensorflow as tf

from tfdml import registry
from tfdml.losses.proxy import ProxyLoss
from tfdml.losses.proxy import _check_count
from tfdml.losses.proxy import class_mask
from tfdml.losses.proxy import kaiming_uniform_sqrt5
from tfdml.losses.proxy import softmax_cross_entropy
from tfdml.validation import check_non_negative
from tfdml.validation import check_positive

REG_EPSILON = 1e-5  # the authors' code: sqrt(2 + 1e-5 - 2 <w_t, w_s>)


def soft_triple(sim, labels, la=20.0, gamma=0.1, margin=0.01):
    """Per anchor ``[B]`` (Eq. 8 and 10).

    ``sim [B, C, K]`` cosines to the centres; ``S_c = sum_k softmax_k(sim /
    gamma) sim_k``; ``-log(e^{la (S_y - margin)} / (e^{la (S_y - margin)} +
    sum_{c != y} e^{la S_c}))``.
    """
    prob = tf.nn.softmax(sim / gamma, axis=2)
    s = tf.reduce_sum(prob * sim, axis=2)
    target = tf.cast(class_mask(labels, tf.shape(s)[1]), s.dtype)
    return softmax_cross_entropy(la * (s - margin * target), labels)


def soft_triple_regularizer(centers, num_classes, centers_per_class):
    """``sum_c sum_{t < s} sqrt(2 + 1e-5 - 2 <w_t, w_s>) / (C K (K - 1))``
    over each class's unit centres (Eq. 12); 0 for ``K = 1``."""
    k = centers_per_class
    if k < 2:
        return tf.zeros([], centers.dtype)
    w = tf.reshape(centers, [num_classes, k, -1])
    gram = tf.matmul(w, w, transpose_b=True)
    upper = tf.constant(
        [[t < s for s in range(k)] for t in range(k)], dtype=tf.bool
    )
    upper = tf.broadcast_to(upper, tf.shape(gram))
    # the masked-out entries (diagonal) stay finite under the sqrt
    d = tf.sqrt(
        tf.where(upper, 2.0 + REG_EPSILON - 2.0 * gram, tf.ones_like(gram))
    )
    total = tf.reduce_sum(tf.where(upper, d, tf.zeros_like(d)))
    return total / float(num_classes * k * (k - 1))


@registry.register
class SoftTripleLoss(ProxyLoss):
    """SoftTriple loss (Qian et al., ICCV 2019).

    Per anchor: the relaxed similarity to class ``c`` is ``S_c = sum_k
    softmax_k(<x, w_c^k> / gamma) <x, w_c^k>`` (unit vectors), the loss
    ``-log(e^{la (S_y - delta)} / (e^{la (S_y - delta)} + sum_{c != y}
    e^{la S_c}))`` plus ``tau`` times the centre regulariser ``sum_c sum_{t <
    s} sqrt(2 + 1e-5 - 2 <w_c^t, w_c^s>) / (C K (K - 1))`` (added to every
    anchor, so that the mean is ``mean CE + tau R``). Defaults from the
    paper: ``centers_per_class=10``, ``la=20``, ``gamma=0.1``,
    ``margin=0.01``, ``tau=0.2``; centres initialised as in the authors'
    code (PyTorch ``kaiming_uniform_(a=sqrt(5))``: uniform in
    ``+-1/sqrt(C K)``).

    pytorch-metric-learning 2.9 ``SoftTripleLoss(num_classes,
    embedding_size, centers_per_class=10, la=20, gamma=0.1, margin=0.01)``:
    the same classification term (its ``gamma`` is inverted internally to
    the same ``1 / gamma``) but **no** centre regulariser (``tau`` has no
    equivalent; PML's optional weight regulariser is a different term).
    """

    def __init__(
        self,
        num_classes: int | None = None,
        embedding_dim: int | None = None,
        centers_per_class: int = 10,
        la: float = 20.0,
        gamma: float = 0.1,
        margin: float = 0.01,
        tau: float = 0.2,
        initializer: str
        | Mapping[str, Any]
        | keras.initializers.Initializer
        | None = None,
        name: str = "soft_triple_loss",
        **kwargs,
    ):
        self.proxies_per_class = _check_count(
            "centers_per_class", centers_per_class, False
        )
        self.la = check_positive("la", la)
        self.gamma = check_positive("gamma", gamma)
        self.margin = check_non_negative("margin", margin)
        self.tau = check_non_negative("tau", tau)
        super().__init__(
            num_classes, embedding_dim, initializer, name=name, **kwargs
        )

    @property
    def centers_per_class(self):
        return self.proxies_per_class

    def default_initializer(self) -> keras.initializers.Initializer:
        return kaiming_uniform_sqrt5()

    def proxy_loss(
        self,
        embeddings: tf.Tensor | npt.ArrayLike,
        proxies: tf.Tensor,
        labels: tf.Tensor | npt.ArrayLike,
        raw_proxies: tf.Tensor | None = None,
    ) -> tf.Tensor:
        sim = self.similarities(embeddings, proxies)
        per = soft_triple(sim, labels, self.la, self.gamma, self.margin)
        if self.tau > 0:
            reg = soft_triple_regularizer(
                proxies, self.num_classes, self.proxies_per_class
            )
            per = per + self.tau * reg
        return per

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            centers_per_class=self.centers_per_class,
            la=self.la,
            gamma=self.gamma,
            margin=self.margin,
            tau=self.tau,
        )
        return config


__all__ = ["SoftTripleLoss", "soft_triple", "soft_triple_regularizer"]
