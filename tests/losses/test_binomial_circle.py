"""BinomialDevianceLoss and CircleLoss vs NumPy float64 references."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import reference as ref
from tests import reference_weighting as refw
from tests.conftest import edge_batches
from tests.conftest import make_batch
from tfdml import ops
from tfdml.losses import BinomialDevianceLoss
from tfdml.losses import CircleLoss
from tfdml.losses import References
from tfdml.losses import circle

RTOL = 1e-5


def grad_of_mean(loss, emb, labels):
    x = tf.Variable(emb)
    with tf.GradientTape() as tape:
        per = loss.per_anchor(x, tf.constant(labels))
        total = tf.reduce_mean(per)
    return per.numpy(), tape.gradient(total, x).numpy()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", sorted(edge_batches()))
def test_binomial_edge_batches(name, reduction):
    emb, labels = edge_batches()[name]
    loss = BinomialDevianceLoss(pair_reduction=reduction)
    per, grad = grad_of_mean(loss, emb, labels)
    want = refw.binomial_deviance(emb, labels, reduction=reduction)
    np.testing.assert_allclose(per, want, rtol=RTOL, atol=1e-6)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("name", sorted(edge_batches()))
def test_circle_edge_batches(name):
    emb, labels = edge_batches()[name]
    loss = CircleLoss()
    per, grad = grad_of_mean(loss, emb, labels)
    want = refw.circle(emb, labels)
    np.testing.assert_allclose(per, want, rtol=RTOL, atol=1e-4)
    assert np.all(np.isfinite(grad))
    if name in ("one_class", "all_singletons"):
        assert np.all(per == 0.0)


def test_binomial_defaults_and_hyper_parameters():
    emb, labels = make_batch(3)
    for kw in ({}, {"alpha": 3.0, "beta": 0.3, "cost": 10.0}):
        got = BinomialDevianceLoss(**kw).per_anchor(emb, labels).numpy()
        want = refw.binomial_deviance(emb, labels, **kw)
        np.testing.assert_allclose(got, want, rtol=RTOL)
    loss = BinomialDevianceLoss()
    assert (loss.alpha, loss.beta, loss.cost) == (2.0, 0.5, 25.0)


def test_circle_hyper_parameters():
    emb, labels = make_batch(3)
    got = CircleLoss(margin=0.4, gamma=80).per_anchor(emb, labels).numpy()
    want = refw.circle(emb, labels, m=0.4, gamma=80)
    np.testing.assert_allclose(got, want, rtol=RTOL)
    assert (CircleLoss().margin, CircleLoss().gamma) == (0.25, 256.0)


@pytest.mark.parametrize("name", ["seeded", "some_singletons", "tiny"])
@pytest.mark.parametrize("margin, gamma", [(0.25, 256.0), (0.4, 80.0)])
def test_circle_matches_keras_core(name, margin, gamma):
    emb, labels = edge_batches()[name]
    ours = CircleLoss(margin=margin, gamma=gamma).per_anchor(emb, labels)
    # Keras removes the self-pair by the diagonal (remove_diagonal=True),
    # which is the id-based exclusion when the references are the batch.
    theirs = keras.losses.circle(
        labels, emb, remove_diagonal=True, gamma=gamma, margin=margin
    )
    np.testing.assert_allclose(ours.numpy(), np.asarray(theirs), rtol=1e-4)
    # keras' mean only averages anchors with a non-zero loss.
    k_mean = keras.losses.Circle(gamma=gamma, margin=margin)(labels, emb)
    per = ours.numpy()
    np.testing.assert_allclose(float(k_mean), per[per > 0].mean(), rtol=1e-4)


def test_reference_set_of_another_size():
    emb, labels = make_batch(0, classes=3, per_class=3)
    bank, bank_labels = make_batch(6, classes=4, per_class=5)
    refs = References(bank, bank_labels)
    got_b = BinomialDevianceLoss().per_anchor(emb, labels, refs)
    got_c = CircleLoss().per_anchor(emb, labels, refs)
    np.testing.assert_allclose(
        got_b.numpy(),
        refw.binomial_deviance(emb, labels, bank, bank_labels),
        rtol=RTOL,
    )
    np.testing.assert_allclose(
        got_c.numpy(), refw.circle(emb, labels, bank, bank_labels), rtol=RTOL
    )
    assert got_b.shape == (9,)


def test_binomial_gradient_finite_differences():
    emb, labels = make_batch(4, classes=3, per_class=3, dim=5)
    loss = BinomialDevianceLoss(cost=5.0)
    _, got = grad_of_mean(loss, emb, labels)
    want = refw.numeric_grad(
        lambda e: refw.binomial_deviance(e, labels, cost=5.0).mean(), emb
    )
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def test_circle_gradient_finite_differences():
    emb, labels = make_batch(4, classes=3, per_class=3, dim=5)
    # Without stop-gradient on alpha the gradient is the full derivative.
    loss = CircleLoss(gamma=8.0, stop_weight_gradient=False)
    _, got = grad_of_mean(loss, emb, labels)
    want = refw.numeric_grad(
        lambda e: refw.circle(e, labels, gamma=8.0).mean(), emb
    )
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    # The default treats alpha as a constant: another gradient, same value.
    per_s, got_s = grad_of_mean(CircleLoss(gamma=8.0), emb, labels)
    per_f, _ = grad_of_mean(loss, emb, labels)
    np.testing.assert_allclose(per_s, per_f, rtol=1e-6)
    assert not np.allclose(got_s, got, atol=1e-5)


def test_circle_stopped_gradient_analytic():
    # dL/ds_p = -gamma alpha_p softmax_P * sigmoid(z), alpha constant.
    emb, labels = make_batch(5, classes=3, per_class=3, dim=5)
    gamma, m = 8.0, 0.25
    x = tf.Variable(emb)
    with tf.GradientTape() as tape:
        sim = tf.matmul(
            tf.math.l2_normalize(x, 1),
            tf.math.l2_normalize(x, 1),
            transpose_b=True,
        )
        tape.watch(sim)
        pos, neg = ops.pair_masks(labels)
        total = tf.reduce_sum(circle(sim, pos, neg, margin=m, gamma=gamma))
    g = tape.gradient(total, sim).numpy()
    s = ref.cosine(emb)
    for i, (P, N) in enumerate(ref.pos_neg_lists(labels)):
        ap = np.maximum(1 + m - s[i, P], 0)
        an = np.maximum(s[i, N] + m, 0)
        lp = -gamma * ap * (s[i, P] - 1 + m)
        ln = gamma * an * (s[i, N] - m)
        z = np.logaddexp.reduce(lp) + np.logaddexp.reduce(ln)
        sig = 1 / (1 + np.exp(-z))
        want_p = -gamma * ap * np.exp(lp - np.logaddexp.reduce(lp)) * sig
        want_n = gamma * an * np.exp(ln - np.logaddexp.reduce(ln)) * sig
        np.testing.assert_allclose(g[i, P], want_p, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(g[i, N], want_n, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cls", [BinomialDevianceLoss, CircleLoss])
def test_xla_equals_eager(cls):
    emb, labels = make_batch(1)
    loss = cls()
    eager = loss.per_anchor(emb, labels)
    xla = tf.function(loss.per_anchor, jit_compile=True)(emb, labels)
    np.testing.assert_allclose(xla.numpy(), eager.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [BinomialDevianceLoss, CircleLoss])
def test_pair_weights_and_config(cls):
    emb, labels = make_batch(2)
    loss = cls()
    plain = loss.per_anchor(emb, labels).numpy()
    ones = loss.per_anchor(emb, labels, pair_weights=np.ones((16, 16))).numpy()
    np.testing.assert_allclose(ones, plain, rtol=1e-6)
    w = np.random.default_rng(0).uniform(0.5, 2, (16, 16))
    assert not np.allclose(loss.per_anchor(emb, labels, pair_weights=w), plain)
    again = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(loss)
    )
    assert again.get_config() == loss.get_config()


@pytest.mark.parametrize("cls", [BinomialDevianceLoss, CircleLoss])
def test_fit_smoke(cls):
    emb, labels = make_batch(0, classes=4, per_class=8, dim=6)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8),
            keras.layers.UnitNormalization(),
        ]
    )
    model.compile(keras.optimizers.SGD(0.01), loss=cls())
    hist = model.fit(emb, labels, batch_size=32, epochs=3, verbose=0)
    assert np.all(np.isfinite(hist.history["loss"]))
    assert hist.history["loss"][-1] < hist.history["loss"][0]


@pytest.mark.parametrize(
    "cls, kwargs, name",
    [
        (BinomialDevianceLoss, {"alpha": 0}, "alpha"),
        (BinomialDevianceLoss, {"cost": -1}, "cost"),
        (BinomialDevianceLoss, {"pair_reduction": "max"}, "pair_reduction"),
        (CircleLoss, {"margin": -0.1}, "margin"),
        (CircleLoss, {"gamma": 0}, "gamma"),
    ],
)
def test_bad_hyper_parameters(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(**kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="embeddings"):
        CircleLoss()(np.zeros(4, np.int32), np.zeros((4,), np.float32))
