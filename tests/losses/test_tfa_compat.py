"""tfa-compatible losses vs tfa's own NumPy test formulas (tests/reference)."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import reference
from tests.conftest import edge_batches
from tests.losses import pair_loss_checks as checks
from tfdml.losses import LiftedStructLoss
from tfdml.losses import NpairsLoss
from tfdml.losses import TfaContrastiveLoss
from tfdml.losses import TripletHardLoss
from tfdml.losses import TripletSemiHardLoss
from tfdml.losses import lifted_struct_loss
from tfdml.losses import npairs_loss
from tfdml.losses import tfa_contrastive_loss
from tfdml.losses import triplet_hard_loss
from tfdml.losses import triplet_semihard_loss


def tfa_batch(seed, num_data=10, dim=6, classes=4):
    # tfa's tests: uniform [0, 1) embeddings (not normalised), random labels.
    rng = np.random.default_rng(seed)
    emb = rng.random((num_data, dim)).astype(np.float32)
    labels = rng.integers(0, classes, size=num_data).astype(np.int32)
    labels[:2] = 0  # at least one positive pair
    labels[2] = 1  # at least one negative
    return emb, labels


SEED_METRIC = [(0, "squared-L2"), (1, "L2"), (2, "angular"), (3, "squared-L2")]


@pytest.mark.parametrize(
    "seed, metric", SEED_METRIC, ids=[f"seed{s}_{m}" for s, m in SEED_METRIC]
)
def test_semihard_scalar_matches_tfa_formula(seed, metric):
    emb, labels = tfa_batch(seed)
    want = reference.tfa_triplet_semihard_scalar(labels, emb, 1.0, metric)
    loss = TripletSemiHardLoss(distance_metric=metric)
    np.testing.assert_allclose(float(loss(labels, emb)), want, rtol=1e-5)
    fn = triplet_semihard_loss(labels, tf.constant(emb), distance_metric=metric)
    np.testing.assert_allclose(float(fn), want, rtol=1e-5)


@pytest.mark.parametrize("soft", [False, True], ids=["hinge", "soft"])
@pytest.mark.parametrize(
    "seed, metric", SEED_METRIC, ids=[f"seed{s}_{m}" for s, m in SEED_METRIC]
)
def test_hard_scalar_matches_tfa_formula(seed, metric, soft):
    emb, labels = tfa_batch(seed, num_data=20)
    want = reference.tfa_triplet_hard_scalar(labels, emb, 1.0, soft, metric)
    loss = TripletHardLoss(soft=soft, distance_metric=metric)
    np.testing.assert_allclose(float(loss(labels, emb)), want, rtol=1e-5)
    fn = triplet_hard_loss(
        labels, tf.constant(emb), soft=soft, distance_metric=metric
    )
    np.testing.assert_allclose(float(fn), want, rtol=1e-5)


@pytest.mark.parametrize(
    "seed, margin", [(0, 1.0), (1, 0.5)], ids=["seed0_m1", "seed1_m0.5"]
)
def test_lifted_scalar_matches_tfa_formula(seed, margin):
    emb, labels = tfa_batch(seed)
    want = reference.tfa_lifted_struct_scalar(labels, emb, margin)
    got = float(LiftedStructLoss(margin=margin)(labels, emb))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    fn = lifted_struct_loss(labels.astype(np.float32), tf.constant(emb), margin)
    np.testing.assert_allclose(float(fn), want, rtol=1e-5)


def semihard_ref(**kw):
    return functools.partial(reference.tfa_triplet_semihard, **kw)


def hard_ref(**kw):
    return functools.partial(reference.tfa_triplet_hard, **kw)


def lifted_ref(margin=1.0):
    def fn(
        emb,
        labels,
        ref=None,
        ref_labels=None,
        ids=None,
        ref_ids=None,
        ref_valid=None,
    ):
        return reference.lifted_structure(
            emb,
            labels,
            ref,
            ref_labels,
            ids,
            ref_ids,
            ref_valid,
            neg_margin=margin,
            dist=reference.euclidean(emb, ref),
        )

    return fn


CASES = {
    "semihard": (TripletSemiHardLoss(), semihard_ref()),
    "semihard_angular": (
        TripletSemiHardLoss(distance_metric="angular", margin=0.5),
        semihard_ref(metric="angular", margin=0.5),
    ),
    "hard": (TripletHardLoss(), hard_ref()),
    "hard_soft_l1": (
        TripletHardLoss(soft=True, distance_metric="L2"),
        hard_ref(soft=True, metric="L2"),
    ),
    "lifted": (LiftedStructLoss(), lifted_ref()),
}


PAIRS = checks.case_batch_params(CASES, full=("semihard", "hard", "lifted"))


@pytest.mark.parametrize("case, batch", PAIRS, ids=checks.ids(PAIRS))
def test_per_anchor_matches_reference(case, batch):
    loss, ref_fn = CASES[case]
    emb, labels = edge_batches()[batch]
    checks.check_matches_reference(loss, ref_fn, emb, labels, atol=2e-6)


@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_reference_set_of_another_size(case):
    checks.check_reference_set(*CASES[case])


@pytest.mark.parametrize("case", ["semihard", "hard", "lifted"], ids=str)
def test_gradient_matches_finite_differences(case):
    checks.check_gradient_vs_finite_differences(*CASES[case])


@pytest.mark.parametrize("case", ["semihard", "lifted"], ids=str)
def test_no_positive_pair_is_zero_not_nan(case):
    # tfa divides by the number of positive pairs (0/0 = NaN); tfdml gives 0.
    checks.check_no_pairs_zero_finite_grad(CASES[case][0])
    emb, labels = edge_batches()["all_singletons"]
    assert float(CASES[case][0](labels, emb)) == 0.0


def test_hard_without_pairs_follows_tfa():
    # tfa: no positive -> d_ap = 0; no negative -> d_an = d_ap (loss = margin).
    emb, labels = edge_batches()["one_class"]
    got = TripletHardLoss(reduction=None)(labels, emb).numpy()
    np.testing.assert_allclose(got, 1.0, rtol=1e-6)


@pytest.mark.parametrize(
    "case", ["semihard", "hard_soft_l1", "lifted"], ids=str
)
def test_graph_and_xla_match_eager(case):
    checks.check_xla_matches_eager(CASES[case][0])


@pytest.mark.parametrize("case", ["semihard", "hard", "lifted"], ids=str)
def test_model_fit_smoke(case):
    checks.check_model_fit_smoke(CASES[case][0])


@pytest.mark.parametrize("case", ["semihard_angular", "lifted"], ids=str)
def test_float16_close_to_float32(case):
    checks.check_float16_close(CASES[case][0], atol=5e-2)


@pytest.mark.parametrize("case", ["semihard", "hard", "lifted"], ids=str)
def test_bad_inputs_raise(case):
    checks.check_bad_inputs(CASES[case][0])


@pytest.mark.parametrize(
    "build, word",
    [
        (lambda: TripletSemiHardLoss(margin=-1.0), "margin"),
        (lambda: TripletHardLoss(margin=-0.5), "margin"),
        (lambda: LiftedStructLoss(margin=-2.0), "margin"),
        (lambda: TfaContrastiveLoss(margin=-1.0), "margin"),
        (lambda: TripletSemiHardLoss(distance_metric="L_3"), "distance_metric"),
        (lambda: TripletHardLoss(miner="AllPairsMiner"), "miner"),
    ],
    ids=["semihard", "hard", "lifted", "contrastive", "metric", "miner"],
)
def test_bad_hyperparameters_raise(build, word):
    with pytest.raises(ValueError, match=word):
        build()


# -- npairs (similarity-matrix contract)


def test_npairs_matches_tfa_unit_test_value():
    # tfa's npairs_test.test_unweighted: 0.253856.
    f = np.array(
        [[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], np.float32
    )
    y = np.array([0, 1, 2, 3], np.int64)
    sim = f @ f.T
    np.testing.assert_allclose(float(NpairsLoss()(y, sim)), 0.253856, atol=1e-6)
    np.testing.assert_allclose(float(npairs_loss(y, sim)), 0.253856, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1], ids=lambda s: f"seed{s}")
def test_npairs_rows_match_reference(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(8, 5)).astype(np.float32)
    b = rng.normal(size=(8, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=8).astype(np.int32)
    sim = a @ b.T
    want = reference.tfa_npairs_rows(y, sim)
    got = NpairsLoss(reduction=None)(y, sim).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        float(npairs_loss(y, sim)), want.mean(), rtol=1e-5
    )
    x = tf.Variable(sim)
    with tf.GradientTape() as tape:
        value = NpairsLoss()(y, x)
    grad = tape.gradient(value, x).numpy()
    eps = 1e-5
    fd = np.zeros_like(sim, dtype=np.float64)
    for idx in np.ndindex(*sim.shape):
        p, m = sim.astype(np.float64), sim.astype(np.float64)
        p[idx] += eps
        m[idx] -= eps
        fd[idx] = (
            reference.tfa_npairs_rows(y, p).mean()
            - reference.tfa_npairs_rows(y, m).mean()
        ) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-5)
    xla = tf.function(lambda s: NpairsLoss()(y, s), jit_compile=True)(sim)
    np.testing.assert_allclose(float(xla), want.mean(), rtol=1e-5)


@pytest.mark.parametrize(
    "y, sim",
    [
        (np.zeros((4, 2)), np.zeros((4, 4), np.float32)),
        (np.zeros(4), np.zeros((4, 3), np.float32)),
        (np.zeros(4), np.zeros((4, 4, 1), np.float32)),
        (np.array(["a"] * 4), np.zeros((4, 4), np.float32)),
    ],
    ids=["labels_rank", "not_square", "pred_rank", "labels_dtype"],
)
def test_npairs_bad_inputs_raise(y, sim):
    with pytest.raises(ValueError):
        NpairsLoss()(y, sim)


def test_npairs_model_fit_smoke():
    # A model that outputs the similarity of two halves of its input.
    inp = keras.Input((8,))
    dense = keras.layers.Dense(3)
    a = dense(inp[:, :4])
    b = dense(inp[:, 4:])
    out = keras.ops.matmul(a, keras.ops.transpose(b))
    model = keras.Model(inp, out)
    model.compile(optimizer="sgd", loss=NpairsLoss())
    x = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    y = np.arange(6, dtype=np.int32)
    hist = model.fit(x, y, batch_size=6, epochs=1, verbose=0)
    assert np.isfinite(hist.history["loss"][0])


# -- contrastive (pair labels + distances)

Y = np.array([0, 0, 1, 1, 0, 1], np.int64)
D = np.array([0.1, 0.3, 1.3, 0.7, 1.1, 0.5], np.float32)


@pytest.mark.parametrize("margin", [1.0, 2.0], ids=lambda m: f"m{m}")
def test_tfa_contrastive_matches_reference(margin):
    want = reference.tfa_contrastive(Y, D, margin)
    loss = TfaContrastiveLoss(margin=margin)
    np.testing.assert_allclose(float(loss(Y, D)), want.mean(), rtol=1e-6)
    none = TfaContrastiveLoss(margin=margin, reduction=None)(Y, D).numpy()
    np.testing.assert_allclose(none, want, rtol=1e-6)
    np.testing.assert_allclose(
        tfa_contrastive_loss(Y, D, margin).numpy(), want, rtol=1e-6
    )


def test_tfa_contrastive_unit_test_values():
    # tfa contrastive_test: unweighted 0.621666, sample weights 0.4425.
    np.testing.assert_allclose(
        float(TfaContrastiveLoss()(Y, D)), 0.621666, atol=1e-6
    )
    w = np.array([1.2, 0.8, 0.5, 0.4, 1.5, 1.0], np.float32)
    np.testing.assert_allclose(
        float(TfaContrastiveLoss()(Y, D, sample_weight=w)), 0.4425, atol=1e-6
    )


def test_tfa_contrastive_gradient_and_xla():
    x = tf.Variable(D)
    with tf.GradientTape() as tape:
        value = TfaContrastiveLoss()(Y, x)
    grad = tape.gradient(value, x).numpy()
    # d/dd [y d^2 + (1-y) relu(1-d)^2] / n
    want = (2 * Y * D - 2 * (1 - Y) * np.maximum(1 - D, 0)) / len(D)
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)
    xla = tf.function(lambda d: TfaContrastiveLoss()(Y, d), jit_compile=True)(D)
    np.testing.assert_allclose(float(xla), float(value), rtol=1e-6)


@pytest.mark.parametrize(
    "y, d",
    [
        (Y, D.astype(np.int32)),
        (Y.reshape(2, 3), D.reshape(2, 3)),
        (np.array(["a"] * 6), D),
    ],
    ids=["int_distances", "rank2", "string_labels"],
)
def test_tfa_contrastive_bad_inputs_raise(y, d):
    with pytest.raises(ValueError):
        TfaContrastiveLoss()(y, d)


def test_tfa_doctest_value_with_default_euclidean_distance():
    """tfa 0.23 documents 2.4142137 for this input with its defaults."""
    y_true = np.array([0, 0], np.int32)
    y_pred = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
    value = float(TripletSemiHardLoss()(y_true, y_pred))
    np.testing.assert_allclose(value, 2.4142137, rtol=1e-6)
