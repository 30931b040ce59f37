"""Embedding models: backbone -> pooling -> Dense head -> L2 normalisation.

:func:`build_embedding_model` returns a functional ``keras.Model`` whose input
is a float32 image batch ``[None, H, W, C]`` with values in ``[0, 1]`` and
whose output is a dict (see ``docs/architecture.md``):

* ``"embeddings"`` ``[B, d]``: L2-normalised, float32,
* ``"raw"`` ``[B, d]``: the head output before normalisation, float32,
* ``"logits"`` ``[B, C]``: only with ``num_classes`` (OSM + CAA); computed
  from the pooled backbone features (OSM's "head 3" on pool5).

Backbones: ``"small_cnn"`` (trains on CPU), the ``keras.applications``
``"resnet50"``, ``"inception_v3"`` and ``"efficientnet_b0"`` (their own
input preprocessing is inside the model, so inputs stay in ``[0, 1]``;
grayscale inputs are tiled to 3 channels), or any ``keras.Model`` returning
a feature map ``[B, h, w, c]`` or a feature vector ``[B, c]``.

GeM pooling: Radenović, Tolias and Chum, "Fine-tuning CNN Image Retrieval
with No Human Annotation", TPAMI 2018 (arXiv 1711.02512).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfdml import registry
from tfdml.models.batchnorm import FusedBatchNormalization
from tfdml.models.batchnorm import with_fused_batchnorm
from tfdml.validation import check_choice
from tfdml.validation import check_positive

BACKBONES = ("small_cnn", "resnet50", "inception_v3", "efficientnet_b0")
POOLINGS = ("avg", "max", "avgmax", "gem")

# name -> (application constructor name, preprocessing mode, min input size)
_APPLICATIONS = {
    "resnet50": ("ResNet50", "caffe", 32),
    "inception_v3": ("InceptionV3", "tf", 75),
    "efficientnet_b0": ("EfficientNetB0", "raw255", 32),
}


@registry.register
class BackbonePreprocessing(keras.layers.Layer):
    """Maps ``[0, 1]`` images to what a ``keras.applications`` net expects.

    Args:
      mode: ``"caffe"`` (ResNet50: RGB->BGR, 0-255, ImageNet mean
        subtracted), ``"tf"`` (Inception: ``[-1, 1]``), ``"torch"``
        (``[0, 1]`` then ImageNet mean/std), ``"raw255"`` (EfficientNet:
        0-255, the net normalises itself) or ``"none"``.
      to_rgb: tile a 1-channel input to 3 channels first.
      **kwargs: passed to ``keras.layers.Layer``.
    """

    MODES = ("caffe", "tf", "torch", "raw255", "none")

    def __init__(self, mode: str = "none", to_rgb: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.mode = check_choice("mode", mode, self.MODES)
        self.to_rgb = bool(to_rgb)

    def call(self, x: tf.Tensor) -> tf.Tensor:
        x = tf.cast(x, self.compute_dtype)
        if self.to_rgb:
            x = tf.tile(x, [1, 1, 1, 3])
        if self.mode == "caffe":
            mean = tf.constant([103.939, 116.779, 123.68], x.dtype)
            return x[..., ::-1] * 255.0 - mean
        if self.mode == "tf":
            return x * 2.0 - 1.0
        if self.mode == "torch":
            mean = tf.constant([0.485, 0.456, 0.406], x.dtype)
            std = tf.constant([0.229, 0.224, 0.225], x.dtype)
            return (x - mean) / std
        if self.mode == "raw255":
            return x * 255.0
        return x

    def compute_output_shape(
        self, input_shape: Sequence[int | None]
    ) -> tuple[int | None, ...]:
        if self.to_rgb:
            return tuple(input_shape[:-1]) + (3,)
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(mode=self.mode, to_rgb=self.to_rgb)
        return config


@registry.register
class GeneralizedMeanPooling(keras.layers.Layer):
    """GeM pooling: ``(mean_{h,w} max(x, eps)^p)^(1/p)`` per channel.

    ``p = 1`` is average pooling and ``p -> inf`` max pooling. ``p`` is a
    trainable scalar (initial 3, as in the paper), clipped to ``>= 1``.

    Args:
      p: initial exponent (> 0).
      trainable_p: learn ``p`` (paper default) or keep it fixed.
      epsilon: clamp of the activations before the power.
      **kwargs: passed to ``keras.layers.Layer``.

    Reference: Radenović et al., TPAMI 2018, Eq. (2).
    """

    def __init__(
        self,
        p: float = 3.0,
        trainable_p: bool = True,
        epsilon: float = 1e-6,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.initial_p = check_positive("p", p)
        self.trainable_p = bool(trainable_p)
        self.epsilon = check_positive("epsilon", epsilon)
        self.p = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(self.initial_p),
            trainable=self.trainable_p,
            dtype="float32",
            autocast=False,
            name="p",
        )

    def call(self, x: tf.Tensor) -> tf.Tensor:
        x = tf.cast(x, tf.float32)
        p = tf.maximum(tf.convert_to_tensor(self.p), 1.0)
        x = tf.pow(tf.maximum(x, self.epsilon), p)
        x = tf.reduce_mean(x, axis=[1, 2])
        out = tf.pow(x, 1.0 / p)
        return tf.cast(out, self.compute_dtype)

    def compute_output_shape(
        self, input_shape: Sequence[int | None]
    ) -> tuple[int | None, ...]:
        return (input_shape[0], input_shape[-1])

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            p=self.initial_p,
            trainable_p=self.trainable_p,
            epsilon=self.epsilon,
        )
        return config


@registry.register
class AvgMaxPooling(keras.layers.Layer):
    """Global average + global max pooling (summed, as in Proxy-Anchor)."""

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return tf.reduce_mean(x, axis=[1, 2]) + tf.reduce_max(x, axis=[1, 2])

    def compute_output_shape(
        self, input_shape: Sequence[int | None]
    ) -> tuple[int | None, ...]:
        return (input_shape[0], input_shape[-1])


@registry.register
class L2Normalization(keras.layers.Layer):
    """L2 normalisation along the last axis, computed in float32."""

    def __init__(self, epsilon: float = 1e-12, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def call(self, x: tf.Tensor) -> tf.Tensor:
        x = tf.cast(x, tf.float32)
        return tf.math.l2_normalize(x, axis=-1, epsilon=self.epsilon)

    def compute_output_shape(
        self, input_shape: Sequence[int | None]
    ) -> tuple[int | None, ...]:
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(epsilon=self.epsilon)
        return config


# BatchNorm defaults of tfdml-built networks: PyTorch's (momentum 0.1 in its
# convention = 0.9 in Keras', epsilon 1e-5), not Keras' 0.99 / 1e-3. With
# 0.99 the moving statistics lag hundreds of steps behind weights trained
# from scratch; see tfdml.models.recalibrate_batchnorm for the full fix.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def small_cnn(
    input_shape: Sequence[int] = (64, 64, 1),
    filters: Sequence[int] = (32, 64, 128),
    name: str | None = None,
    bn_momentum: float = BN_MOMENTUM,
    bn_epsilon: float = BN_EPSILON,
) -> keras.Model:
    """A small conv net (Conv-BN-ReLU blocks) that trains on CPU.

    BatchNorm uses ``bn_momentum`` 0.9 and ``bn_epsilon`` 1e-5 (PyTorch's
    defaults, what pytorch-metric-learning users run), computed by TF's
    fused kernel (:class:`tfdml.models.FusedBatchNormalization`).

    Returns a ``keras.Model`` ``[B, H, W, C] -> [B, h, w, filters[-1]]``.
    """
    inputs = keras.Input(shape=input_shape)
    x = inputs
    for i, f in enumerate(filters):
        x = keras.layers.Conv2D(
            f,
            3,
            strides=1 if i == 0 else 2,
            padding="same",
            use_bias=False,
            name=f"conv{i}",
        )(x)
        x = FusedBatchNormalization(
            momentum=bn_momentum, epsilon=bn_epsilon, name=f"bn{i}"
        )(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    x = keras.layers.Conv2D(
        filters[-1], 3, padding="same", use_bias=False, name="conv_out"
    )(x)
    x = FusedBatchNormalization(
        momentum=bn_momentum, epsilon=bn_epsilon, name="bn_out"
    )(x)
    x = keras.layers.ReLU(name="relu_out")(x)
    return keras.Model(inputs, x, name=name or "small_cnn")


def freeze_batchnorm_layers(model: keras.Model) -> int:
    """Sets every BatchNormalization layer of ``model`` non-trainable.

    In Keras 3 a non-trainable BN layer runs in inference mode (moving
    statistics, no updates) even when called with ``training=True``.
    Returns the number of layers frozen.
    """
    count = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
            count += 1
    return count


def _check_weights(weights, backbone):
    if weights is None or weights == "imagenet":
        return
    if not isinstance(weights, str):
        raise ValueError(
            "`weights` must be None, 'imagenet' or a path to a weights file; "
            f"received weights={weights!r}."
        )
    if not tf.io.gfile.exists(weights):
        raise ValueError(
            f"`weights` file not found; received weights={weights!r}."
        )


def _build_backbone(backbone, weights, shape):
    """Returns (backbone model, preprocessing layer or None)."""
    channels = shape[-1]
    if isinstance(backbone, keras.Model):
        if weights == "imagenet":
            raise ValueError(
                "`weights='imagenet'` needs a named backbone; received a "
                f"keras.Model backbone {backbone.name!r}."
            )
        if weights is not None:
            backbone.load_weights(weights)
        want = backbone.inputs[0].shape[-1] if backbone.inputs else None
        pre = None
        if want == 3 and channels == 1:
            pre = BackbonePreprocessing("none", to_rgb=True, name="to_rgb")
        return backbone, pre
    if backbone == "small_cnn":
        if weights == "imagenet":
            raise ValueError(
                "`weights='imagenet'` is not available for the small CNN; "
                "received backbone='small_cnn', weights='imagenet'."
            )
        net = small_cnn(shape)
        if weights is not None:
            net.load_weights(weights)
        return net, None
    ctor_name, mode, min_size = _APPLICATIONS[backbone]
    if min(shape[0], shape[1]) < min_size:
        raise ValueError(
            f"backbone={backbone!r} needs inputs of at least "
            f"{min_size}x{min_size}; received input_shape={shape!r}."
        )
    if channels not in (1, 3):
        raise ValueError(
            f"backbone={backbone!r} needs 1 or 3 input channels; received "
            f"input_shape={shape!r}."
        )
    ctor = getattr(keras.applications, ctor_name)
    # A local path goes to the application itself (it calls load_weights on
    # the headless net, e.g. a manually downloaded *_notop.h5 file).
    net = ctor(
        include_top=False,
        weights=weights,
        input_shape=(shape[0], shape[1], 3),
        pooling=None,
    )
    # Same weights, TF's fused BatchNorm kernel (tfdml.models.batchnorm).
    net = with_fused_batchnorm(net)
    pre = BackbonePreprocessing(
        mode, to_rgb=channels == 1, name="backbone_preprocessing"
    )
    return net, pre


def build_embedding_model(
    input_shape: Sequence[int] = (64, 64, 1),
    backbone: str | keras.Model = "small_cnn",
    weights: str | None = None,
    pooling: str = "avg",
    embedding_dim: int = 128,
    freeze_batchnorm: bool = False,
    num_classes: int | None = None,
    name: str = "embedding_model",
) -> keras.Model:
    """Builds the tfdml encoder: images in ``[0, 1]`` -> dict of outputs.

    Args:
      input_shape: ``(H, W, C)`` of the float32 input images in ``[0, 1]``.
      backbone: ``"small_cnn"``, ``"resnet50"``, ``"inception_v3"``,
        ``"efficientnet_b0"`` or a ``keras.Model`` (feature map or vector).
      weights: ``None`` (random init), ``"imagenet"`` (the Keras download;
        applications only) or a local path to backbone weights.
      pooling: ``"avg"``, ``"max"``, ``"avgmax"`` (avg + max) or ``"gem"``
        (trainable p); ignored when the backbone returns a vector.
      embedding_dim: size ``d`` of the embedding.
      freeze_batchnorm: put every BatchNormalization layer of the backbone
        in inference mode and make it non-trainable (common for fine-tuning
        with small DML batches).
      num_classes: add a ``"logits"`` output (Dense on the pooled features).
      name: model name.

    Returns:
      A functional ``keras.Model`` with outputs ``{"embeddings", "raw"}``
      (and ``"logits"``), savable as ``.keras``.

    Example::

      encoder = build_embedding_model((64, 64, 1), embedding_dim=64)
      encoder(images)["embeddings"]  # [B, 64], unit norm
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(
            "`input_shape` must be (height, width, channels); received "
            f"input_shape={input_shape!r}."
        )
    if not isinstance(backbone, keras.Model) and backbone not in BACKBONES:
        raise ValueError(
            f"`backbone` must be one of {list(BACKBONES)} or a keras.Model; "
            f"received backbone={backbone!r}."
        )
    if pooling not in POOLINGS:
        raise ValueError(
            f"`pooling` must be one of {list(POOLINGS)}; received "
            f"pooling={pooling!r}."
        )
    if not isinstance(embedding_dim, (int, np.integer)) or embedding_dim < 1:
        raise ValueError(
            "`embedding_dim` must be a positive integer; received "
            f"embedding_dim={embedding_dim!r}."
        )
    if num_classes is not None and (
        not isinstance(num_classes, (int, np.integer)) or num_classes < 2
    ):
        raise ValueError(
            "`num_classes` must be None or an integer >= 2; received "
            f"num_classes={num_classes!r}."
        )
    _check_weights(weights, backbone)
    net, pre = _build_backbone(backbone, weights, shape)
    if freeze_batchnorm:
        freeze_batchnorm_layers(net)

    inputs = keras.Input(shape=shape, dtype="float32", name="images")
    x = pre(inputs) if pre is not None else inputs
    features = net(x)
    if len(features.shape) == 4:
        if pooling == "avg":
            features = keras.layers.GlobalAveragePooling2D(name="pool")(
                features
            )
        elif pooling == "max":
            features = keras.layers.GlobalMaxPooling2D(name="pool")(features)
        elif pooling == "avgmax":
            features = AvgMaxPooling(name="pool")(features)
        else:
            features = GeneralizedMeanPooling(name="pool")(features)
    elif len(features.shape) != 2:
        raise ValueError(
            "The backbone must return [B, h, w, c] or [B, c]; received "
            f"output shape {features.shape}."
        )
    head = keras.layers.Dense(embedding_dim, name="embedding_head")(features)
    raw = keras.layers.Activation("linear", dtype="float32", name="raw")(head)
    emb = L2Normalization(name="embeddings")(raw)
    outputs = {"embeddings": emb, "raw": raw}
    if num_classes is not None:
        outputs["logits"] = keras.layers.Dense(
            int(num_classes), dtype="float32", name="logits"
        )(features)
    return keras.Model(inputs, outputs, name=name)
