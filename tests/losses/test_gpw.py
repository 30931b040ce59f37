"""GeneralPairWeightingLoss: gradient identities with the losses it mimics."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import reference as ref
from tests import reference_weighting as refw
from tests.conftest import edge_batches
from tests.conftest import make_batch
from tfdml.losses import BinomialDevianceLoss
from tfdml.losses import ContrastiveLoss
from tfdml.losses import GeneralPairWeightingLoss as GPW
from tfdml.losses import LiftedStructureLoss
from tfdml.losses import MultiSimilarityLoss
from tfdml.losses import References
from tfdml.mining import MultiSimilarityMiner
from tfdml.weighting import BinomialWeighting
from tfdml.weighting import ConstantWeighting
from tfdml.weighting import MultiSimilarityWeighting

PAIRS = [
    ("ms", lambda: MultiSimilarityLoss(), lambda: GPW.multi_similarity()),
    (
        "ms_no_mining_c2_euclid",
        lambda: MultiSimilarityLoss(epsilon=None, coefficient=2.0),
        lambda: GPW.multi_similarity(
            epsilon=None, coefficient=2.0, distance="euclidean"
        ),
    ),
    (
        "ms_eps_0.3",
        lambda: MultiSimilarityLoss(epsilon=0.3, alpha=3.0, beta=20.0),
        lambda: GPW.from_preset(
            "multi_similarity", epsilon=0.3, alpha=3.0, beta=20.0
        ),
    ),
    (
        "contrastive_distance_avg_nonzero",
        lambda: ContrastiveLoss(pos_margin=0.2, neg_margin=1.2),
        lambda: GPW.contrastive(pos_margin=0.2, neg_margin=1.2),
    ),
    (
        "contrastive_distance_sum",
        lambda: ContrastiveLoss(pair_reduction="sum"),
        lambda: GPW.contrastive(pair_reduction="sum"),
    ),
    (
        "contrastive_similarity",
        lambda: ContrastiveLoss(form="similarity"),
        lambda: GPW.contrastive(form="similarity"),
    ),
    ("binomial", lambda: BinomialDevianceLoss(), lambda: GPW.binomial()),
    (
        "binomial_sum_euclid",
        lambda: BinomialDevianceLoss(pair_reduction="sum", cost=10.0),
        lambda: GPW.binomial(
            pair_reduction="sum", cost=10.0, distance="euclidean"
        ),
    ),
    (
        "lifted_generalized",
        lambda: LiftedStructureLoss(form="generalized", neg_margin=1.0),
        lambda: GPW.lifted(neg_margin=1.0),
    ),
]


def value_and_grad(loss, emb, labels, **kw):
    x = tf.Variable(emb)
    with tf.GradientTape() as tape:
        per = loss.per_anchor(x, tf.constant(labels), **kw)
        total = tf.reduce_mean(per)
    return per.numpy(), tape.gradient(total, x).numpy()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name, make_loss, make_gpw", PAIRS)
def test_gradient_identity(name, make_loss, make_gpw, seed):
    emb, labels = make_batch(seed, classes=4, per_class=5, dim=8)
    v_loss, g_loss = value_and_grad(make_loss(), emb, labels)
    v_gpw, g_gpw = value_and_grad(make_gpw(), emb, labels)
    assert np.abs(g_loss).max() > 1e-3
    np.testing.assert_allclose(g_gpw, g_loss, rtol=1e-5, atol=1e-6)
    assert not np.allclose(v_gpw, v_loss)  # values differ


@pytest.mark.parametrize("name, make_loss, make_gpw", PAIRS)
@pytest.mark.parametrize("edge", ["duplicates", "some_singletons", "tiny"])
def test_gradient_identity_edge_batches(name, make_loss, make_gpw, edge):
    emb, labels = edge_batches()[edge]
    _, g_loss = value_and_grad(make_loss(), emb, labels)
    _, g_gpw = value_and_grad(make_gpw(), emb, labels)
    assert np.all(np.isfinite(g_gpw))
    np.testing.assert_allclose(g_gpw, g_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(edge_batches()))
def test_edge_batches_no_pairs(name):
    emb, labels = edge_batches()[name]
    per, grad = value_and_grad(GPW.multi_similarity(), emb, labels)
    assert np.all(np.isfinite(per)) and np.all(np.isfinite(grad))
    if name in ("one_class", "all_singletons"):
        assert np.all(per == 0.0) and np.all(grad == 0.0)


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_value_matches_reference(distance):
    emb, labels = make_batch(3)
    sim = ref.cosine(emb)
    lists = [
        ref.ms_mine(sim[i], p, n, 0.1)
        for i, (p, n) in enumerate(ref.pos_neg_lists(labels))
    ]
    wp, wn = refw.ms_weights(sim, lists)
    d = np.sqrt(np.maximum(2 - 2 * sim, 0))
    if distance == "euclidean":  # chain rule: |dL/dd| = |dL/dS| d
        wp, wn = wp * d, wn * d
    want = refw.gpw_value(sim, wp, wn, distance)
    got = GPW.multi_similarity(distance=distance).per_anchor(emb, labels)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_binomial_value_matches_reference_on_another_reference_set():
    emb, labels = make_batch(0, classes=3, per_class=3)
    bank, bank_labels = make_batch(8, classes=4, per_class=4)
    sim = ref.cosine(emb, bank)
    lists = ref.pos_neg_lists(labels, bank_labels)
    wp, wn = refw.binomial_weights(sim, lists)
    want = refw.gpw_value(sim, wp, wn)
    got = GPW.binomial().per_anchor(emb, labels, References(bank, bank_labels))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    # and the gradient identity on that reference set
    x = tf.Variable(emb)
    grads = []
    for loss in (GPW.binomial(), BinomialDevianceLoss()):
        with tf.GradientTape() as tape:
            t = tf.reduce_mean(
                loss.per_anchor(x, labels, References(bank, bank_labels))
            )
        grads.append(tape.gradient(t, x).numpy())
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_gradient_finite_differences():
    # The surrogate's gradient is the MS gradient: compare to FD of MS.
    emb, labels = make_batch(4, classes=3, per_class=3, dim=5)
    _, got = value_and_grad(GPW.multi_similarity(beta=10.0), emb, labels)
    want = refw.numeric_grad(
        lambda e: ref.multi_similarity(e, labels, beta=10.0).mean(), emb
    )
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=2e-4)


def test_pair_weights_scale_the_weights():
    emb, labels = make_batch(2)
    loss = GPW.binomial()
    plain = loss.per_anchor(emb, labels).numpy()
    double = loss.per_anchor(emb, labels, pair_weights=2 * np.ones((16, 16)))
    np.testing.assert_allclose(double.numpy(), 2 * plain, rtol=1e-6)


def test_custom_combination_and_context():
    emb, labels = make_batch(2)
    loss = GPW(
        miner=MultiSimilarityMiner(0.1),
        weighting=BinomialWeighting(),
        distance="euclidean",
    )
    per, grad = value_and_grad(loss, emb, labels)
    assert np.all(np.isfinite(grad)) and np.any(per != 0)
    caa = GPW(weighting="CAAWeighting")
    probs = np.linspace(0.1, 0.9, 16).astype(np.float32)
    out = caa.per_anchor(emb, labels, probs=probs)
    assert np.all(np.isfinite(out.numpy()))
    with pytest.raises(ValueError, match="probs"):
        caa.per_anchor(emb, labels)


def test_xla_equals_eager():
    emb, labels = make_batch(1)
    loss = GPW.multi_similarity(distance="euclidean")
    eager = loss.per_anchor(emb, labels)
    xla = tf.function(loss.per_anchor, jit_compile=True)(emb, labels)
    np.testing.assert_allclose(xla.numpy(), eager.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, make_loss, make_gpw", PAIRS)
def test_config_serialises_nested_miner_and_weighting(
    name, make_loss, make_gpw
):
    loss = make_gpw()
    spec = keras.saving.serialize_keras_object(loss)
    again = keras.saving.deserialize_keras_object(spec)
    assert type(again.weighting) is type(loss.weighting)
    assert type(again.miner) is type(loss.miner)
    assert again.get_config() == loss.get_config()
    emb, labels = make_batch(0)
    np.testing.assert_allclose(
        again.per_anchor(emb, labels).numpy(),
        loss.per_anchor(emb, labels).numpy(),
    )


def test_build_from_plain_dict_spec():
    loss = GPW(
        miner={"name": "MultiSimilarityMiner", "epsilon": 0.2},
        weighting={"name": "MultiSimilarityWeighting", "beta": 30.0},
    )
    assert isinstance(loss.weighting, MultiSimilarityWeighting)
    assert loss.miner.epsilon == 0.2 and loss.weighting.beta == 30.0
    assert isinstance(GPW().weighting, ConstantWeighting)


def test_fit_smoke():
    emb, labels = make_batch(0, classes=4, per_class=8, dim=6)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8),
            keras.layers.UnitNormalization(),
        ]
    )
    model.compile(keras.optimizers.SGD(0.05), loss=GPW.multi_similarity())
    before = float(MultiSimilarityLoss()(labels, model(emb)))
    hist = model.fit(emb, labels, batch_size=32, epochs=3, verbose=0)
    after = float(MultiSimilarityLoss()(labels, model(emb)))
    assert np.all(np.isfinite(hist.history["loss"]))
    assert after < before  # descending the surrogate descends MS


def test_bad_arguments():
    with pytest.raises(ValueError, match="distance"):
        GPW(distance="manhattan")
    with pytest.raises(ValueError, match="preset"):
        GPW.from_preset("npairs")
    with pytest.raises(ValueError, match="pair_reduction"):
        GPW.contrastive(pair_reduction="mean")
    with pytest.raises(ValueError, match="NoSuchWeighting"):
        GPW(weighting="NoSuchWeighting")
    with pytest.raises(ValueError, match="embeddings"):
        GPW()(np.zeros(3, np.int32), np.zeros((3, 1, 1), np.float32))
