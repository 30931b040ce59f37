"""Classification-style losses on normalised class weights: normalised
softmax (Zhai and Wu, BMVC 2019), CosFace (Wang et al., CVPR 2018), ArcFace
(Deng et al., CVPR 2019) and sub-centre ArcFace (Deng et al., ECCV 2020).

Each owns its ``[num_classes * K, embedding_dim]`` class weights as a
:class:`tfdml.losses.proxy.ProxyLoss` (see that module for the pattern) and
returns the softmax cross-entropy per anchor over the logits below, with
``cos`` the cosine between the L2-normalised embedding and class weight.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import keras
import numpy.typing as npt
import tensorflow as tf

from tfdml import registry
from tfdml.losses.proxy import ProxyLoss
from tfdml.losses.proxy import _check_count
from tfdml.losses.proxy import class_mask
from tfdml.losses.proxy import softmax_cross_entropy
from tfdml.validation import check_non_negative
from tfdml.validation import check_positive


def normalized_softmax(cos, labels, temperature=0.05):
    """``[B]``: ``CE(cos / T)``."""
    return softmax_cross_entropy(cos / temperature, labels)


def cosface(cos, labels, num_classes, margin=0.35, scale=64.0):
    """``[B]``: ``CE(s (cos - m 1[c = y]))`` (Wang et al. 2018, Eq. 4)."""
    target = tf.cast(class_mask(labels, num_classes), cos.dtype)
    return softmax_cross_entropy(scale * (cos - margin * target), labels)


def arcface_target(cos_y, margin):
    """``cos(theta_y + m)`` where ``theta_y <= pi - m``, else ``cos theta_y -
    m sin m`` (the authors' code keeps the logit decreasing in theta beyond
    ``pi - m``). ``sin theta`` is floored at ``sqrt(1e-7)`` so that the
    gradient stays finite when an embedding equals its class weight."""
    sin = tf.sqrt(tf.maximum(1.0 - cos_y * cos_y, 1e-7))
    plus = cos_y * math.cos(margin) - sin * math.sin(margin)
    fallback = cos_y - margin * math.sin(margin)
    return tf.where(cos_y > -math.cos(margin), plus, fallback)


def arcface(cos, labels, num_classes, margin=0.5, scale=64.0):
    """``[B]``: ``CE(s cos(theta_c + m 1[c = y]))`` (Deng et al. 2019,
    Eq. 3), with the fallback of :func:`arcface_target`."""
    target = class_mask(labels, num_classes)
    cos_y = tf.reduce_sum(tf.where(target, cos, tf.zeros_like(cos)), axis=1)
    new = arcface_target(cos_y, margin)
    logits = tf.where(target, new[:, None], cos)
    return softmax_cross_entropy(scale * logits, labels)


class _MarginSoftmax(ProxyLoss):
    def default_initializer(self) -> keras.initializers.Initializer:
        return keras.initializers.RandomNormal(stddev=0.01)

    def class_cosine(
        self, embeddings: tf.Tensor | npt.ArrayLike, proxies: tf.Tensor
    ) -> tf.Tensor:
        return self.similarities(embeddings, proxies)[:, :, 0]


@registry.register
class NormalizedSoftmaxLoss(_MarginSoftmax):
    """Normalised softmax (Zhai and Wu, "Classification is a Strong Baseline
    for Deep Metric Learning", BMVC 2019): ``CE(cos(x, w_c) / T)`` with
    ``T = 0.05`` (the paper's temperature).

    Class weights initialised normal with std 0.01 (the paper does not say).
    pytorch-metric-learning 2.9 ``NormalizedSoftmaxLoss(num_classes,
    embedding_size, temperature=0.05)``: the same formula and default (its
    weights: ``torch.nn.init.normal_``, std 1).
    """

    def __init__(
        self,
        num_classes: int | None = None,
        embedding_dim: int | None = None,
        temperature: float = 0.05,
        initializer: str
        | Mapping[str, Any]
        | keras.initializers.Initializer
        | None = None,
        name: str = "normalized_softmax_loss",
        **kwargs,
    ):
        self.temperature = check_positive("temperature", temperature)
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
        cos = self.class_cosine(embeddings, proxies)
        return normalized_softmax(cos, labels, self.temperature)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(temperature=self.temperature)
        return config


@registry.register
class CosFaceLoss(_MarginSoftmax):
    """CosFace / large margin cosine loss (Wang et al., CVPR 2018), Eq. 4:
    ``CE(s (cos(x, w_c) - m 1[c = y]))``; the paper's ``s = 64``,
    ``m = 0.35``.

    Class weights initialised normal with std 0.01. pytorch-metric-learning
    2.9 ``CosFaceLoss(num_classes, embedding_size, margin=0.35, scale=64)``:
    the same formula and defaults (its weights: ``torch.nn.init.normal_``,
    std 1).
    """

    def __init__(
        self,
        num_classes: int | None = None,
        embedding_dim: int | None = None,
        margin: float = 0.35,
        scale: float = 64.0,
        initializer: str
        | Mapping[str, Any]
        | keras.initializers.Initializer
        | None = None,
        name: str = "cosface_loss",
        **kwargs,
    ):
        self.margin = check_non_negative("margin", margin)
        self.scale = check_positive("scale", scale)
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
        cos = self.class_cosine(embeddings, proxies)
        return cosface(cos, labels, self.num_classes, self.margin, self.scale)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(margin=self.margin, scale=self.scale)
        return config


@registry.register
class ArcFaceLoss(_MarginSoftmax):
    """ArcFace / additive angular margin (Deng, Guo, Xue and Zafeiriou, CVPR
    2019), Eq. 3: ``CE(s cos(theta_c + m 1[c = y]))``, ``theta_c`` the angle
    between the embedding and class weight ``c``; the paper's ``s = 64``,
    ``m = 0.5`` rad (28.6 degrees). Beyond ``theta_y > pi - m`` the target
    logit is ``cos theta_y - m sin m`` (the authors' code). Class weights
    initialised normal with std 0.01 (the authors' code).

    pytorch-metric-learning 2.9 ``ArcFaceLoss(num_classes, embedding_size,
    margin=28.6, scale=64)``: the same formula and fallback, but its
    ``margin`` is in **degrees** (tfdml's in radians); weights
    ``torch.nn.init.normal_`` (std 1).
    """

    def __init__(
        self,
        num_classes: int | None = None,
        embedding_dim: int | None = None,
        margin: float = 0.5,
        scale: float = 64.0,
        initializer: str
        | Mapping[str, Any]
        | keras.initializers.Initializer
        | None = None,
        name: str = "arcface_loss",
        **kwargs,
    ):
        self.margin = check_non_negative("margin", margin)
        if self.margin >= math.pi:
            raise ValueError(
                "`margin` is an angle in radians below pi; received "
                f"margin={margin!r}."
            )
        self.scale = check_positive("scale", scale)
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
        cos = self.class_cosine(embeddings, proxies)
        return arcface(cos, labels, self.num_classes, self.margin, self.scale)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(margin=self.margin, scale=self.scale)
        return config


@registry.register
class SubCenterArcFaceLoss(ArcFaceLoss):
    """Sub-centre ArcFace (Deng, Guo, Liu, Zafeiriou et al., ECCV 2020):
    ``K`` sub-centres per class; the class cosine is the largest of its
    sub-centres' (Eq. 2), then ArcFace. The paper's ``K = 3``, ``s = 64``,
    ``m = 0.5`` rad.

    pytorch-metric-learning 2.9 ``SubCenterArcFaceLoss(...,
    sub_centers=3)``: the same, margin in degrees. Rows ``c * K ... c * K +
    K - 1`` of :attr:`proxies` are class ``c``'s sub-centres.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        embedding_dim: int | None = None,
        sub_centers: int = 3,
        margin: float = 0.5,
        scale: float = 64.0,
        initializer: str
        | Mapping[str, Any]
        | keras.initializers.Initializer
        | None = None,
        name: str = "sub_center_arcface_loss",
        **kwargs,
    ):
        self.proxies_per_class = _check_count("sub_centers", sub_centers, False)
        super().__init__(
            num_classes,
            embedding_dim,
            margin=margin,
            scale=scale,
            initializer=initializer,
            name=name,
            **kwargs,
        )

    @property
    def sub_centers(self):
        return self.proxies_per_class

    def class_cosine(
        self, embeddings: tf.Tensor | npt.ArrayLike, proxies: tf.Tensor
    ) -> tf.Tensor:
        return tf.reduce_max(self.similarities(embeddings, proxies), axis=2)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(sub_centers=self.sub_centers)
        return config
