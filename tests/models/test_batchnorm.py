"""Precise BN (recalibrate_batchnorm) against a NumPy float64 reference."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfdml.models import DMLModel
from tfdml.models import build_embedding_model
from tfdml.models import recalibrate_batchnorm
from tfdml.models import small_cnn


def dense_bn_model(d_in=5, d_hidden=4, momentum=0.99, trainable=True):
    """x -> Dense -> BN -> Dense: the BN input is x @ W + b (NumPy)."""
    inputs = keras.Input((d_in,))
    h = keras.layers.Dense(d_hidden, name="dense")(inputs)
    bn = keras.layers.BatchNormalization(momentum=momentum, name="bn")
    bn.trainable = trainable
    out = keras.layers.Dense(3, name="out")(bn(h))
    return keras.Model(inputs, {"embeddings": out})


def reference_stats(model, batches):
    w, b = (np.asarray(v, np.float64) for v in model.get_layer("dense").weights)
    means, variances = [], []
    for x in batches:
        h = np.asarray(x, np.float64) @ w + b
        means.append(h.mean(0))
        variances.append(h.var(0))  # biased, as BN's training mode uses
    return np.mean(means, 0), np.mean(variances, 0)


def batches_of(seed=0, n=4, size=16, d=5):
    rng = np.random.default_rng(seed)
    # shifted and scaled so the statistics are far from the init (0, 1)
    return [
        (3.0 + 2.0 * rng.standard_normal((size, d))).astype(np.float32)
        for _ in range(n)
    ]


def test_moving_stats_equal_average_of_batch_stats():
    keras.utils.set_random_seed(1)
    model = dense_bn_model()
    batches = batches_of()
    weights = [np.array(v) for v in model.trainable_variables]
    ds = tf.data.Dataset.from_tensor_slices(np.stack(batches))
    assert recalibrate_batchnorm(model, ds) == 1
    bn = model.get_layer("bn")
    mean, var = reference_stats(model, batches)
    np.testing.assert_allclose(np.array(bn.moving_mean), mean, rtol=1e-5)
    np.testing.assert_allclose(np.array(bn.moving_variance), var, rtol=1e-4)
    assert bn.momentum == 0.99  # restored
    for before, v in zip(weights, model.trainable_variables):
        np.testing.assert_array_equal(before, np.array(v))


def test_array_input_labels_tuples_and_num_batches():
    keras.utils.set_random_seed(2)
    model = dense_bn_model()
    batches = batches_of(seed=3, n=5)
    labelled = tf.data.Dataset.from_tensor_slices(
        (np.stack(batches), np.zeros((5, 16), np.int32))
    )
    recalibrate_batchnorm(model, labelled.repeat(), num_batches=2)
    mean, var = reference_stats(model, batches[:2])
    bn = model.get_layer("bn")
    np.testing.assert_allclose(np.array(bn.moving_mean), mean, rtol=1e-5)
    np.testing.assert_allclose(np.array(bn.moving_variance), var, rtol=1e-4)
    recalibrate_batchnorm(model, np.concatenate(batches), batch_size=16)
    mean, var = reference_stats(model, batches)
    np.testing.assert_allclose(np.array(bn.moving_mean), mean, rtol=1e-5)


def test_frozen_batchnorm_untouched():
    model = dense_bn_model(trainable=False)
    before = np.array(model.get_layer("bn").moving_mean)
    assert recalibrate_batchnorm(model, batches_of()[0]) == 0
    np.testing.assert_array_equal(
        before, np.array(model.get_layer("bn").moving_mean)
    )


def test_nan_data_is_an_error_and_changes_nothing():
    model = dense_bn_model()
    bad = batches_of()[0]
    bad[3, 1] = np.nan
    before = np.array(model.get_layer("bn").moving_variance)
    with pytest.raises(ValueError, match="non-finite"):
        recalibrate_batchnorm(model, bad)
    np.testing.assert_array_equal(
        before, np.array(model.get_layer("bn").moving_variance)
    )


def test_empty_data_is_an_error():
    model = dense_bn_model()
    empty = tf.data.Dataset.from_tensor_slices(np.zeros((0, 4, 5), "float32"))
    with pytest.raises(ValueError, match="no batch"):
        recalibrate_batchnorm(model, empty)
    with pytest.raises(ValueError, match="num_batches"):
        recalibrate_batchnorm(model, batches_of()[0], num_batches=0)


def test_small_cnn_uses_pytorch_batchnorm_defaults():
    net = small_cnn((16, 16, 1))
    bns = [
        layer
        for layer in net.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert bns and all(b.momentum == 0.9 for b in bns)
    assert all(b.epsilon == 1e-5 for b in bns)


def _train_mode_agreement(encoder, x):
    a = encoder(x, training=True)["embeddings"].numpy()
    b = encoder(x, training=False)["embeddings"].numpy()
    return float(np.mean(np.sum(a * b, axis=1)))


def test_recalibration_repairs_stale_statistics_after_training():
    """After a short from-scratch training (Keras' BN momentum 0.99, Adam
    1e-3) the inference-mode embedding of an image has drifted away from
    its training-mode embedding; precise BN brings them back together."""
    keras.utils.set_random_seed(0)
    backbone = small_cnn((32, 32, 1), filters=(16, 32), bn_momentum=0.99)
    encoder = build_embedding_model(
        (32, 32, 1), backbone=backbone, embedding_dim=16
    )
    rng = np.random.default_rng(0)
    centres = rng.random((8, 32, 32, 1)).astype(np.float32)
    labels = np.repeat(np.arange(8), 4).astype(np.int32)

    def batch():
        noise = 0.3 * rng.random((32, 32, 32, 1)).astype(np.float32)
        return centres[labels] * 0.7 + noise, labels

    model = DMLModel(encoder)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3), loss="MultiSimilarityLoss"
    )
    xs, ys = zip(*[batch() for _ in range(40)])
    model.fit(
        np.concatenate(xs),
        np.concatenate(ys),
        batch_size=32,
        epochs=1,
        shuffle=False,
        verbose=0,
    )
    x, _ = batch()
    before = _train_mode_agreement(encoder, x)
    recalibrate_batchnorm(encoder, np.concatenate(xs[:8]), batch_size=32)
    after = _train_mode_agreement(encoder, x)
    assert before < 0.9, before
    assert after > 0.99, after
