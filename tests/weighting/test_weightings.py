"""Pair weightings vs NumPy float64 references and vs autodiff of the losses
they come from."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import reference as ref
from tests import reference_weighting as refw
from tests.conftest import edge_batches
from tests.conftest import make_batch
from tfdml import ops
from tfdml import registry
from tfdml.losses import binomial_deviance
from tfdml.losses import lifted_structure_generalized
from tfdml.losses import multi_similarity
from tfdml.mining import MultiSimilarityMiner
from tfdml.weighting import BinomialWeighting
from tfdml.weighting import CAAWeighting
from tfdml.weighting import ConstantWeighting
from tfdml.weighting import LiftedWeighting
from tfdml.weighting import MultiSimilarityWeighting
from tfdml.weighting import OSMWeighting
from tfdml.weighting import Weighting

PROBS = np.linspace(0.05, 0.95, 16).astype(np.float32)


def contract(emb, labels, ref_emb=None, ref_labels=None):
    sim = ops.cosine_similarity(emb, ref_emb)
    pos, neg = ops.pair_masks(labels, ref_labels)
    return sim, pos, neg


def test_ms_weights_match_reference_and_autodiff():
    emb, labels = make_batch(3)
    sim, pos, neg = contract(emb, labels)
    pos, neg = MultiSimilarityMiner(0.1)(sim, pos, neg)
    w_pos, w_neg = MultiSimilarityWeighting(coefficient=2.0)(sim, pos, neg)
    s = ref.cosine(emb)
    lists = [
        ref.ms_mine(s[i], p, n, 0.1)
        for i, (p, n) in enumerate(ref.pos_neg_lists(labels))
    ]
    wp, wn = refw.ms_weights(s, lists, coefficient=2.0)
    assert wn.max() > 0 and wp.max() > 0
    np.testing.assert_allclose(w_pos.numpy(), wp, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(w_neg.numpy(), wn, rtol=1e-5, atol=1e-7)
    # |dL/dS| by autodiff
    with tf.GradientTape() as tape:
        tape.watch(sim)
        total = tf.reduce_sum(
            multi_similarity(
                sim, pos, neg, alpha=2.0, beta=40.0, base=0.5, coefficient=2.0
            )
        )
    g = tape.gradient(total, sim).numpy()
    np.testing.assert_allclose(w_pos.numpy(), -g * pos.numpy(), atol=1e-6)
    np.testing.assert_allclose(w_neg.numpy(), g * neg.numpy(), atol=1e-6)


@pytest.mark.parametrize("mean", [True, False])
def test_binomial_weights_match_reference_and_autodiff(mean):
    emb, labels = make_batch(4)
    bank, bank_labels = make_batch(9, classes=5, per_class=3)
    sim, pos, neg = contract(emb, labels, bank, bank_labels)
    red = "mean" if mean else "sum"
    w_pos, w_neg = BinomialWeighting(pair_reduction=red)(sim, pos, neg)
    lists = ref.pos_neg_lists(labels, bank_labels)
    wp, wn = refw.binomial_weights(ref.cosine(emb, bank), lists, mean=mean)
    np.testing.assert_allclose(w_pos.numpy(), wp, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(w_neg.numpy(), wn, rtol=1e-5, atol=1e-7)
    with tf.GradientTape() as tape:
        tape.watch(sim)
        total = tf.reduce_sum(
            binomial_deviance(sim, pos, neg, pair_reduction=red)
        )
    g = tape.gradient(total, sim).numpy()
    np.testing.assert_allclose(w_pos.numpy(), -g * pos.numpy(), atol=1e-5)
    np.testing.assert_allclose(w_neg.numpy(), g * neg.numpy(), atol=1e-5)


def test_lifted_weights_match_reference_and_autodiff():
    emb, labels = make_batch(5)
    sim, pos, neg = contract(emb, labels)
    w_pos, w_neg = LiftedWeighting(neg_margin=0.8)(sim, pos, neg)
    lists = ref.pos_neg_lists(labels)
    wp, wn = refw.lifted_weights(ref.cosine(emb), lists, neg_margin=0.8)
    assert wp.max() > 0
    np.testing.assert_allclose(w_pos.numpy(), wp, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(w_neg.numpy(), wn, rtol=1e-5, atol=1e-7)
    dist = ops.distance_from_similarity(sim)
    with tf.GradientTape() as tape:
        tape.watch(dist)
        total = tf.reduce_sum(
            lifted_structure_generalized(dist, pos, neg, neg_margin=0.8)
        )
    g = tape.gradient(total, dist).numpy()
    np.testing.assert_allclose(w_pos.numpy(), g * pos.numpy(), atol=1e-6)
    np.testing.assert_allclose(w_neg.numpy(), -g * neg.numpy(), atol=1e-6)


def test_osm_scores():
    emb, labels = make_batch(6)
    sim, pos, neg = contract(emb, labels)
    s_pos, s_neg = OSMWeighting()(sim, pos, neg)
    d = np.sqrt(np.maximum(2 - 2 * ref.cosine(emb), 0))
    want_p = np.exp(-(d**2) / (2 * 0.8**2)) * pos.numpy()
    want_n = np.maximum(0, 1.2 - d) * neg.numpy()
    np.testing.assert_allclose(s_pos.numpy(), want_p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s_neg.numpy(), want_n, rtol=1e-5, atol=1e-6)
    assert np.any(want_n == 0) and np.any(want_n > 0)  # the margin acts


@pytest.mark.parametrize("combine", ["min", "product"])
def test_caa_attention(combine):
    emb, labels = make_batch(0, classes=3, per_class=3)
    bank, bank_labels = make_batch(1, classes=4, per_class=3)
    p = np.linspace(0.1, 1.0, 9)
    q = np.linspace(0.0, 0.8, 12)
    sim, pos, neg = contract(emb, labels, bank, bank_labels)
    a_pos, a_neg = CAAWeighting(combine=combine)(
        sim, pos, neg, probs=p, ref_probs=q
    )
    a = refw.gaussian_pdf(p, 1.0, 0.68)
    b = refw.gaussian_pdf(q, 1.0, 0.68)
    att = (
        np.minimum(a[:, None], b[None]) if combine == "min" else np.outer(a, b)
    )
    np.testing.assert_allclose(a_pos.numpy(), att * pos.numpy(), rtol=1e-5)
    np.testing.assert_allclose(a_neg.numpy(), att * neg.numpy(), rtol=1e-5)
    # CAA's a = N(p; 1, 0.68) (Wang et al., AAAI 2019; docs/losses.md,
    # OSM + CAA) spans a(0) / a(1) = exp(-1 / (2 * 0.68**2)) = 0.339; here
    # p >= 0.1
    np.testing.assert_allclose(
        a.min() / a.max(), np.exp(-0.81 / (2 * 0.68**2)), rtol=1e-6
    )


def test_caa_needs_probs():
    sim, pos, neg = contract(*make_batch(0))
    with pytest.raises(ValueError, match="probs"):
        CAAWeighting()(sim, pos, neg)
    bank_sim = tf.zeros((16, 20))
    m = tf.zeros((16, 20), tf.bool)
    with pytest.raises(ValueError, match="ref_probs"):
        CAAWeighting()(bank_sim, m, m, probs=PROBS)


@pytest.mark.parametrize("reduction", ["sum", "avg"])
def test_constant_weighting(reduction):
    sim, pos, neg = contract(*make_batch(0))
    w_pos, w_neg = ConstantWeighting(2.0, 3.0, reduction=reduction)(
        sim, pos, neg
    )
    p, n = pos.numpy(), neg.numpy()
    if reduction == "sum":
        np.testing.assert_allclose(w_pos.numpy(), 2.0 * p)
        np.testing.assert_allclose(w_neg.numpy(), 3.0 * n)
    else:
        np.testing.assert_allclose(w_pos.numpy().sum(1), 2.0 * (p.sum(1) > 0))
        np.testing.assert_allclose(w_neg.numpy().sum(1), 3.0 * (n.sum(1) > 0))


def all_weightings():
    return [
        ConstantWeighting(),
        MultiSimilarityWeighting(),
        BinomialWeighting(),
        LiftedWeighting(),
        OSMWeighting(),
        CAAWeighting(),
    ]


@pytest.mark.parametrize("name", sorted(edge_batches()))
@pytest.mark.parametrize("w", all_weightings(), ids=lambda w: type(w).__name__)
def test_zero_outside_masks_finite_and_no_gradient(w, name):
    emb, labels = edge_batches()[name]
    sim, pos, neg = contract(emb, labels)
    probs = np.linspace(0.1, 0.9, len(labels)).astype(np.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(sim)
        w_pos, w_neg = w(sim, pos, neg, probs=probs)
        total = tf.reduce_sum(w_pos) + tf.reduce_sum(w_neg)
    assert w_pos.dtype == tf.float32 and w_neg.dtype == tf.float32
    assert np.all(np.isfinite(w_pos.numpy())) and np.all(w_pos.numpy() >= 0)
    assert np.all(w_neg.numpy() >= 0)
    assert np.all(w_pos.numpy()[~pos.numpy()] == 0)
    assert np.all(w_neg.numpy()[~neg.numpy()] == 0)
    assert tape.gradient(total, sim) is None


@pytest.mark.parametrize("w", all_weightings(), ids=lambda w: type(w).__name__)
def test_xla_equals_eager(w):
    sim, pos, neg = contract(*make_batch(2))

    def f(s, p, n):
        return w(s, p, n, probs=PROBS)

    eager = f(sim, pos, neg)
    xla = tf.function(f, jit_compile=True)(sim, pos, neg)
    for a, b in zip(eager, xla):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-7)


def test_registry_and_config_round_trip():
    names = registry.registered(Weighting)
    for expected in (
        "ConstantWeighting",
        "MultiSimilarityWeighting",
        "BinomialWeighting",
        "LiftedWeighting",
        "OSMWeighting",
        "CAAWeighting",
    ):
        assert expected in names
    for cls in names.values():
        obj = cls()
        again = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(obj)
        )
        assert type(again) is cls and again.get_config() == obj.get_config()
        assert (
            cls.from_config(obj.get_config()).get_config() == obj.get_config()
        )


@pytest.mark.parametrize(
    "cls, kwargs, name",
    [
        (ConstantWeighting, {"pos_weight": -1}, "pos_weight"),
        (ConstantWeighting, {"reduction": "max"}, "reduction"),
        (ConstantWeighting, {"space": "angle"}, "space"),
        (MultiSimilarityWeighting, {"beta": 0}, "beta"),
        (MultiSimilarityWeighting, {"alpha": "x"}, "alpha"),
        (BinomialWeighting, {"cost": 0}, "cost"),
        (BinomialWeighting, {"pair_reduction": "avg"}, "pair_reduction"),
        (LiftedWeighting, {"neg_margin": -1}, "neg_margin"),
        (OSMWeighting, {"sigma": 0}, "sigma"),
        (OSMWeighting, {"margin": -1}, "margin"),
        (CAAWeighting, {"sigma": 0}, "sigma"),
        (CAAWeighting, {"combine": "max"}, "combine"),
    ],
)
def test_bad_hyper_parameters(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(**kwargs)
