"""IAA estimates what it perturbs (issue 13, "What users get" 2).

Training-mode BN for sigma without touching the BN moving statistics, the
strength metrics in the fit history, any integer label ids, a bounded
sample per class.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfdml.augment import IAAEstimator
from tfdml.augment import IAARefresh
from tfdml.augment import IAAugmenter
from tfdml.losses import MultiSimilarityLoss
from tfdml.models import DMLModel
from tfdml.models import build_embedding_model

SIZE, DIM, CLASSES = 16, 8, 4


def images(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, SIZE, SIZE, 1)).astype(np.float32)
    y = (np.arange(n) % CLASSES).astype(np.int32)
    return x, y


def small_cnn_model(seed=0, num_classes=CLASSES):
    keras.utils.set_random_seed(seed)
    encoder = build_embedding_model((SIZE, SIZE, 1), embedding_dim=DIM)
    est = IAAEstimator(num_classes, DIM)
    aug = IAAugmenter(est, num_copies=2, lam=0.8, seed=1)
    model = DMLModel(encoder, augmenter=aug)
    model.compile(
        optimizer=keras.optimizers.SGD(1e-3), loss=MultiSimilarityLoss()
    )
    return model


def bn_stats(encoder):
    return [
        v.numpy().copy()
        for layer in encoder._flatten_layers()
        if isinstance(layer, keras.layers.BatchNormalization)
        for v in (layer.moving_mean, layer.moving_variance)
    ]


def fit_first_estimate(bn_mode, epochs=2):
    x, y = images()
    model = small_cnn_model()
    refresh = IAARefresh(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(16),
        start_epoch=0,
        bn_mode=bn_mode,
    )
    hist = model.fit(
        x,
        y,
        batch_size=16,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[refresh],
    )
    return hist.history, refresh


def test_first_estimate_from_scratch_noise_is_not_negligible():
    """From scratch, the inference-mode estimate gave noise ~0.6 % of |z|
    (copies = duplicates); the training-mode estimate must be > 5 %."""
    history, _ = fit_first_estimate("training")
    for key in ("iaa_noise_ratio", "iaa_copy_cos"):
        assert key in history and len(history[key]) == 2, history.keys()
    assert history["iaa_noise_ratio"][0] > 0.05, history
    assert history["iaa_copy_cos"][0] < 0.999, history
    old, _ = fit_first_estimate("inference", epochs=1)
    assert old["iaa_noise_ratio"][0] < history["iaa_noise_ratio"][0] / 3


def test_estimate_leaves_bn_moving_statistics_unchanged():
    x, y = images()
    model = small_cnn_model()
    refresh = IAARefresh(tf.data.Dataset.from_tensor_slices((x, y)).batch(8))
    refresh.set_model(model)
    before = bn_stats(model.encoder)
    weights = [w.copy() for w in model.encoder.get_weights()]
    assert before
    refresh.refresh()
    assert model.augmenter.estimator.estimated
    for a, b in zip(before, bn_stats(model.encoder)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(weights, model.encoder.get_weights()):
        np.testing.assert_array_equal(a, b)
    # ...and the estimate is the training-mode one (batch statistics).
    raws = [
        model.encoder(x[i : i + 8], training=True)["raw"].numpy()
        for i in range(0, 32, 8)
    ]
    raw = np.concatenate(raws)
    want = np.stack([raw[y == c].var(0) for c in range(CLASSES)])
    np.testing.assert_allclose(
        model.augmenter.estimator.variance.numpy(), want, rtol=1e-3, atol=1e-6
    )


def test_arbitrary_label_ids_equal_remapped_ids():
    x, y = images(24)
    ids = np.array([1000, 7, 123456789, 42], np.int64)
    runs = {}
    for name, labels in (
        ("ids", ids[y]),
        ("remapped", np.unique(ids[y], return_inverse=True)[1]),
    ):
        labels = labels.astype(np.int32)
        model = small_cnn_model()
        refresh = IAARefresh(
            tf.data.Dataset.from_tensor_slices((x, labels)).batch(8),
            start_epoch=0,
        )
        hist = model.fit(
            x,
            labels,
            batch_size=8,
            epochs=2,
            shuffle=False,
            verbose=0,
            callbacks=[refresh],
        )
        est = model.augmenter.estimator
        runs[name] = (hist.history, est.variance.numpy(), est.class_ids.numpy())
    (h_ids, v_ids, t_ids), (h_map, v_map, _) = runs["ids"], runs["remapped"]
    np.testing.assert_array_equal(t_ids, np.sort(ids))
    np.testing.assert_allclose(v_ids, v_map, rtol=1e-6)
    np.testing.assert_allclose(h_ids["loss"], h_map["loss"], rtol=1e-6)
    assert h_ids["iaa_noise_ratio"][0] > 0
    np.testing.assert_allclose(
        h_ids["iaa_noise_ratio"], h_map["iaa_noise_ratio"], rtol=1e-6
    )


def test_estimator_lookup_unknown_ids():
    est = IAAEstimator(3, 2, class_ids=[5, -2, 9])
    rows, known = est.lookup(tf.constant([9, -2, 5, 6, 100]))
    np.testing.assert_array_equal(rows.numpy()[:3], [2, 0, 1])
    np.testing.assert_array_equal(known.numpy(), [1, 1, 1, 0, 0])
    raw = np.ones((2, 2), np.float32)
    with pytest.raises(ValueError, match="class_ids"):
        est.update(raw, [5, 6])


def test_bounded_sample_per_class():
    x, y = images(64)
    model = small_cnn_model()
    read = []

    def batches():
        for i in range(0, 64, 8):
            read.append(i)
            yield x[i : i + 8], y[i : i + 8]

    refresh = IAARefresh(batches(), max_per_class=3)
    refresh.set_model(model)
    refresh.refresh()
    est = model.augmenter.estimator
    np.testing.assert_array_equal(est.counts.numpy(), [3] * CLASSES)
    assert refresh.sample_sizes == [3 * CLASSES]
    assert len(read) == 2  # stops reading once every class is full
    everything = IAARefresh(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(8),
        max_per_class=None,
    )
    everything.set_model(model)
    everything.refresh()
    assert everything.sample_sizes == [64]
