"""MultiSimilarityLoss vs the NumPy float64 references."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import reference as ref
from tests import reference_weighting as refw
from tests.conftest import edge_batches
from tests.conftest import make_batch
from tfdml.losses import MultiSimilarityLoss
from tfdml.losses import References

RTOL = 1e-5


def per_anchor(loss, emb, labels, **kw):
    return loss.per_anchor(tf.constant(emb), tf.constant(labels), **kw).numpy()


@pytest.mark.parametrize("coefficient", [1.0, 2.0])
@pytest.mark.parametrize("epsilon", [0.1, 0.05, None])
@pytest.mark.parametrize("seed", [0, 3])
def test_per_anchor_matches_reference(coefficient, epsilon, seed):
    emb, labels = make_batch(seed)
    loss = MultiSimilarityLoss(epsilon=epsilon, coefficient=coefficient)
    got = per_anchor(loss, emb, labels)
    want = ref.multi_similarity(
        emb,
        labels,
        epsilon=0.0 if epsilon is None else epsilon,
        coefficient=coefficient,
        mine=epsilon is not None,
    )
    assert np.any(want > 0)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6)


def test_mining_off_differs_from_mining_on():
    emb, labels = make_batch(0)
    on = per_anchor(MultiSimilarityLoss(epsilon=0.0), emb, labels)
    off = per_anchor(MultiSimilarityLoss(epsilon=None), emb, labels)
    assert not np.allclose(on, off)


@pytest.mark.parametrize("name", sorted(edge_batches()))
def test_edge_batches(name):
    emb, labels = edge_batches()[name]
    loss = MultiSimilarityLoss()
    x = tf.Variable(emb)
    with tf.GradientTape() as tape:
        per = loss.per_anchor(x, tf.constant(labels))
        total = tf.reduce_mean(per)
    grad = tape.gradient(total, x)
    np.testing.assert_allclose(
        per.numpy(), ref.multi_similarity(emb, labels), rtol=RTOL, atol=1e-6
    )
    assert np.all(np.isfinite(grad.numpy()))
    if name in ("one_class", "all_singletons"):
        assert float(total) == 0.0


def test_reference_set_of_another_size():
    emb, labels = make_batch(0, classes=4, per_class=3)
    bank, bank_labels = make_batch(5, classes=5, per_class=4)
    ids = np.arange(12)
    bank_ids = np.arange(100, 120)
    bank_ids[0] = 0  # the anchor 0 itself is in the bank: never a positive
    bank[0] = emb[0]
    bank_labels[0] = labels[0]
    loss = MultiSimilarityLoss(epsilon=0.2)
    got = loss.per_anchor(
        emb, labels, References(bank, bank_labels, bank_ids), ids
    ).numpy()
    want = ref.multi_similarity(
        emb, labels, bank, bank_labels, ids, bank_ids, epsilon=0.2
    )
    assert got.shape == (12,)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("on_similarity", [False, True])
@pytest.mark.parametrize("epsilon", [0.1, None])
def test_pair_weights(on_similarity, epsilon):
    emb, labels = make_batch(2)
    rng = np.random.default_rng(0)
    w = rng.uniform(0.2, 1.5, size=(16, 16)).astype(np.float32)
    w[0, 1] = 0.0
    loss = MultiSimilarityLoss(
        epsilon=epsilon, weights_on_similarity=on_similarity, coefficient=2.0
    )
    got = per_anchor(loss, emb, labels, pair_weights=w)
    want = refw.multi_similarity_weighted(
        emb,
        labels,
        w,
        epsilon=0.0 if epsilon is None else epsilon,
        coefficient=2.0,
        on_similarity=on_similarity,
        mine=epsilon is not None,
    )
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6)
    plain = per_anchor(loss, emb, labels)
    assert not np.allclose(got, plain)
    ones = per_anchor(loss, emb, labels, pair_weights=np.ones_like(w))
    np.testing.assert_allclose(ones, plain, rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("epsilon", [0.1, None])
def test_gradient_matches_finite_differences(epsilon):
    emb, labels = make_batch(4, classes=3, per_class=3, dim=5)
    loss = MultiSimilarityLoss(epsilon=epsilon, beta=10.0)
    x = tf.Variable(emb.astype(np.float64).astype(np.float32))
    with tf.GradientTape() as tape:
        total = tf.reduce_mean(loss.per_anchor(x, labels))
    got = tape.gradient(total, x).numpy()

    def fn(e):
        return ref.multi_similarity(
            e,
            labels,
            beta=10.0,
            epsilon=0.0 if epsilon is None else epsilon,
            mine=epsilon is not None,
        ).mean()

    want = refw.numeric_grad(fn, emb)
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=2e-4)


def test_xla_equals_eager():
    emb, labels = make_batch(1)
    loss = MultiSimilarityLoss()

    def f(e, y):
        return loss.per_anchor(e, y)

    eager = f(emb, labels)
    xla = tf.function(f, jit_compile=True)(emb, labels)
    np.testing.assert_allclose(xla.numpy(), eager.numpy(), rtol=1e-5, atol=1e-6)


def test_keras_entry_point_and_reduction():
    emb, labels = make_batch(0)
    want = ref.multi_similarity(emb, labels)
    mean = MultiSimilarityLoss()(labels[:, None], emb)
    np.testing.assert_allclose(float(mean), want.mean(), rtol=RTOL)
    none = MultiSimilarityLoss(reduction=None)(labels, emb)
    np.testing.assert_allclose(none.numpy(), want, rtol=RTOL, atol=1e-6)


def test_config_round_trip():
    loss = MultiSimilarityLoss(
        alpha=3.0,
        beta=30.0,
        base=0.6,
        epsilon=None,
        coefficient=2.0,
        weights_on_similarity=True,
    )
    again = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(loss)
    )
    assert again.get_config() == loss.get_config()
    emb, labels = make_batch(0)
    np.testing.assert_allclose(
        per_anchor(again, emb, labels), per_anchor(loss, emb, labels)
    )


def test_fit_smoke():
    emb, labels = make_batch(0, classes=4, per_class=8, dim=6)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8),
            keras.layers.UnitNormalization(),
        ]
    )
    model.compile(keras.optimizers.SGD(0.1), loss=MultiSimilarityLoss())
    hist = model.fit(emb, labels, batch_size=32, epochs=3, verbose=0)
    losses = hist.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"alpha": 0}, "alpha"),
        ({"beta": -1}, "beta"),
        ({"epsilon": -0.1}, "epsilon"),
        ({"coefficient": 0}, "coefficient"),
    ],
)
def test_bad_hyper_parameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MultiSimilarityLoss(**kwargs)


def test_bad_inputs():
    loss = MultiSimilarityLoss()
    with pytest.raises(ValueError, match="embeddings"):
        loss(np.zeros(4, np.int32), np.zeros((4, 2, 2), np.float32))
    with pytest.raises(ValueError, match="labels"):
        # Rank 3 (rank 2 [B, C] is multi-hot: tests/losses/test_multilabel.py).
        loss(np.zeros((4, 3, 1), np.int32), np.zeros((4, 2), np.float32))
