"""Precise BatchNorm: moving statistics that describe the trained weights.

Inference-mode BatchNormalization normalizes with *moving* statistics, an
exponential average (Keras momentum 0.99 by default) of the batch statistics
seen during training. Early in training from scratch at a usual learning rate
the weights move faster than that average follows: the moving statistics then
describe weights from hundreds of steps ago, and the inference-mode embedding
of an image can be unrelated to its training-mode embedding (cosine near 0).
Any evaluation, export or estimate made in inference mode then measures
stale statistics instead of the trained network.

:func:`recalibrate_batchnorm` ("precise BN", Wu & Johnson 2021, "Rethinking
'Batch' in BatchNorm") fixes this without touching a weight: it runs
training-mode forward passes over a few training batches and sets each
trainable BatchNormalization layer's moving mean and variance to the average
of the per-batch statistics, i.e. the statistics the training-mode network
actually normalizes with. Frozen (non-trainable) BatchNorm layers run in
inference mode in Keras 3 and are left as they are.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import numpy.typing as npt
import tensorflow as tf

from tfdml import registry
from tfdml.data.pipeline import without_autotune

# cuDNN refuses a smaller epsilon (TF's fused_batch_norm wrapper raises any
# smaller value to this one); the CPU kernel takes any epsilon.
_CUDNN_MIN_EPSILON = 1.001e-5


@registry.register
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` computed by TF's fused kernel.

    Keras 3 computes BatchNorm with separate TensorFlow ops (``tf.nn.moments``
    then ``tf.nn.batch_normalization``), forward and backward: about ten
    passes over each activation where TF's ``FusedBatchNormV3`` kernel
    (what ``tf.keras`` 2 used, and what PyTorch's BatchNorm is) makes two or
    three. On a CPU training step of a small CNN (4 conv blocks, 64x64x1,
    batch 128, 2 cores) the Keras layers cost ~30% of the step; this layer
    removes most of it (``BENCHMARKS.md``).

    Same weights, arguments, config and semantics as the Keras layer (a
    subclass: ``isinstance(layer, keras.layers.BatchNormalization)`` holds,
    :func:`recalibrate_batchnorm` and ``freeze_batchnorm_layers`` treat it
    alike): training mode normalises with the batch mean and *biased*
    variance and moves the moving statistics by ``momentum`` towards them
    (the kernel returns the unbiased variance; it is converted back);
    inference mode uses the moving statistics. Outputs and gradients equal
    the Keras layer's within float32 rounding (tests).

    The fused kernel runs for a 4-D input with the channel axis last, no
    mask, ``renorm=False``, ``synchronized=False`` and the TensorFlow
    backend (on a visible GPU only with ``epsilon >= 1.001e-5``, cuDNN's
    floor); anything else takes the Keras code path unchanged.
    """

    def _fused_ok(self, inputs, mask):
        if (
            keras.backend.backend() != "tensorflow"
            or mask is not None
            or self.renorm
            or self.synchronized
            or len(inputs.shape) != 4
            or self.axis not in (-1, 3)
        ):
            return False
        if self.epsilon < _CUDNN_MIN_EPSILON and tf.config.list_logical_devices(
            "GPU"
        ):
            return False
        return True

    def call(
        self,
        inputs: tf.Tensor,
        training: bool | None = None,
        mask: tf.Tensor | None = None,
    ) -> tf.Tensor:
        if not self._fused_ok(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        x = tf.cast(inputs, tf.float32)
        channels = x.shape[-1]
        scale = (
            tf.cast(self.gamma, tf.float32)
            if self.scale
            else tf.ones((channels,), tf.float32)
        )
        offset = (
            tf.cast(self.beta, tf.float32)
            if self.center
            else tf.zeros((channels,), tf.float32)
        )
        moving_mean = tf.cast(self.moving_mean, tf.float32)
        moving_variance = tf.cast(self.moving_variance, tf.float32)
        training = bool(training and self.trainable)
        # Training mode: batch statistics (the kernel takes empty means);
        # inference mode: the moving ones.
        empty = tf.zeros((0,), tf.float32)
        y, mean, unbiased, _, _, _ = tf.raw_ops.FusedBatchNormV3(
            x=x,
            scale=scale,
            offset=offset,
            mean=empty if training else moving_mean,
            variance=empty if training else moving_variance,
            epsilon=self.epsilon,
            data_format="NHWC",
            is_training=training,
        )
        if training:
            # The kernel returns the variance times n / (n - 1) (n the
            # values per channel, n - 1 floored at 1); Keras' moving
            # variance follows the biased batch variance.
            shape = tf.shape(x)
            n = tf.cast(shape[0] * shape[1] * shape[2], tf.float32)
            variance = unbiased * (tf.maximum(n - 1.0, 1.0) / n)
            momentum = self.momentum
            self.moving_mean.assign(
                tf.cast(
                    moving_mean * momentum + mean * (1.0 - momentum),
                    self.moving_mean.dtype,
                )
            )
            self.moving_variance.assign(
                tf.cast(
                    moving_variance * momentum + variance * (1.0 - momentum),
                    self.moving_variance.dtype,
                )
            )
        return tf.cast(y, self.compute_dtype)


def with_fused_batchnorm(model: keras.Model) -> keras.Model:
    """A copy of a functional or Sequential ``model`` whose plain
    ``keras.layers.BatchNormalization`` layers are
    :class:`FusedBatchNormalization` (same config, names and weights; every
    other layer cloned as Keras clones it). Returns ``model`` itself when it
    has no such layer. Used by ``build_embedding_model`` for the
    ``keras.applications`` backbones.
    """
    plain = [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if type(layer) is keras.layers.BatchNormalization
    ]
    if not plain:
        return model

    def clone(layer):
        if type(layer) is keras.layers.BatchNormalization:
            return FusedBatchNormalization.from_config(layer.get_config())
        return layer.__class__.from_config(layer.get_config())

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    for old, new in zip(
        model._flatten_layers(include_self=False, recursive=True),
        copy._flatten_layers(include_self=False, recursive=True),
    ):
        new.trainable = old.trainable
    return copy


def batchnorm_layers(
    model: keras.Model, trainable_only: bool = True
) -> list[keras.layers.BatchNormalization]:
    """Every ``BatchNormalization`` layer inside ``model`` (recursively)."""
    out = []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            if layer.trainable or not trainable_only:
                out.append(layer)
    return out


def has_trainable_batchnorm(model: keras.Model) -> bool:
    """True when ``model`` has a BatchNorm layer that training updates."""
    return bool(model.trainable and batchnorm_layers(model))


def _images_of(batch):
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("images", "x"):
            if key in batch:
                return batch[key]
        raise ValueError(
            "A dict batch needs an 'images' key; received keys "
            f"{sorted(batch)}."
        )
    return batch


def _batches(data, num_batches, batch_size):
    if isinstance(data, tf.data.Dataset):
        ds = data if num_batches is None else data.take(num_batches)
        for batch in without_autotune(ds):
            yield _images_of(batch)
        return
    x = np.asarray(_images_of(data))
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(
            "`data` must be a non-empty image array or a tf.data.Dataset; "
            f"received an array of shape {x.shape}."
        )
    n = math.ceil(len(x) / batch_size)
    if num_batches is not None:
        n = min(n, num_batches)
    for i in range(n):
        yield x[i * batch_size : (i + 1) * batch_size]


def recalibrate_batchnorm(
    model: keras.Model,
    data: tf.data.Dataset | npt.ArrayLike,
    num_batches: int | None = None,
    batch_size: int = 128,
) -> int:
    """Sets BatchNorm moving statistics to those of training-mode batches.

    The model's weights are not changed. For every trainable
    ``keras.layers.BatchNormalization`` layer of ``model`` (nested models
    included), the moving mean and moving variance become the average over
    ``num_batches`` batches of the layer's training-mode batch mean and
    (biased) batch variance, with every earlier layer also in training
    mode, exactly as during a training step. Batches should look like
    training batches (same size and composition, e.g. P x K batches of
    training images) since BatchNorm's statistics depend on them.

    Args:
      model: a Keras model (its output may be a dict).
      data: a ``tf.data.Dataset`` of image batches or of ``(images,
        labels)`` batches, or an image array ``[N, H, W, C]``.
      num_batches: how many batches to use (default: all of ``data``;
        an infinite dataset needs it).
      batch_size: batch size for an array.

    Returns:
      The number of BatchNorm layers recalibrated (0: nothing to do).

    Raises:
      ValueError: no batch in ``data``, or non-finite statistics (the
        moving statistics are then left unchanged).
    """
    if num_batches is not None and int(num_batches) < 1:
        raise ValueError(
            f"`num_batches` must be >= 1 or None; received {num_batches!r}."
        )
    layers = batchnorm_layers(model) if model.trainable else []
    if not layers:
        return 0
    if not model.built:
        raise ValueError("Build the model (call it once) before recalibrating.")
    stat_vars = []
    for layer in layers:
        stat_vars += [layer.moving_mean, layer.moving_variance]
    ids = {id(v): i for i, v in enumerate(stat_vars)}
    non_trainable = list(model.non_trainable_variables)
    where = [ids.get(id(v)) for v in non_trainable]
    if sorted(i for i in where if i is not None) != list(range(len(stat_vars))):
        raise ValueError(
            "Could not find every BatchNorm moving statistic among the "
            "model's non-trainable variables."
        )

    momenta = [layer.momentum for layer in layers]
    try:
        for layer in layers:
            layer.momentum = 0.0  # one training-mode call = batch statistics

        @tf.function(reduce_retracing=True)
        def batch_stats(x):
            _, new_non_trainable = model.stateless_call(
                [v.value for v in model.trainable_variables],
                [v.value for v in non_trainable],
                x,
                training=True,
            )
            out = [None] * len(stat_vars)
            for i, value in zip(where, new_non_trainable):
                if i is not None:
                    out[i] = tf.cast(value, tf.float64)
            return out

        sums, count = None, 0
        for x in _batches(data, num_batches, batch_size):
            stats = batch_stats(tf.convert_to_tensor(x))
            sums = (
                [s.numpy() for s in stats]
                if sums is None
                else [a + s.numpy() for a, s in zip(sums, stats)]
            )
            count += 1
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    if count == 0:
        raise ValueError("`data` yielded no batch to recalibrate with.")
    means = [s / count for s in sums]
    if not all(np.all(np.isfinite(m)) for m in means):
        raise ValueError(
            "BatchNorm recalibration produced non-finite statistics (NaN or "
            "Inf in the data or the weights); moving statistics unchanged."
        )
    for var, value in zip(stat_vars, means):
        var.assign(value.astype(var.dtype))
    return len(layers)
