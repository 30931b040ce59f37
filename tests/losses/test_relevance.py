"""Relevance beyond one label (issue 16): a relevance function on the loss
(``PairLoss(relevance=fn)``) and a relevance matrix per call
(``per_anchor(relevance=)``), against the NumPy float64 references with
the same relevance rule, through Keras' ``loss(y_true, y_pred)``, eager and
XLA, with a reference set and a cross-batch memory.

The rule used here, ``|a - b| <= 1`` on ordinal labels, is not
transitive: no relabelling expresses it, so the tests can only pass if the
rule itself reaches the masks.
"""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import reference
from tfdml import ops
from tfdml.losses import ContrastiveLoss
from tfdml.losses import MultiSimilarityLoss
from tfdml.losses import NPairsLoss
from tfdml.losses import References
from tfdml.losses import SupConLoss
from tfdml.losses import TripletMarginLoss
from tfdml.memory import CrossBatchMemory

RTOL = 1e-5


@keras.saving.register_keras_serializable(package="tfdml_tests")
def ordinal(labels, ref_labels):
    """Relevant iff the ordinal labels differ by at most 1."""
    diff = tf.abs(labels[:, None] - ref_labels[None, :])
    return diff <= 1


def np_ordinal(a, b):
    return bool(abs(int(a) - int(b)) <= 1)


LOSSES = {
    "contrastive": (
        lambda **kw: ContrastiveLoss(**kw),
        functools.partial(reference.contrastive),
    ),
    "contrastive_similarity_sum": (
        lambda **kw: ContrastiveLoss(form="similarity", **kw),
        functools.partial(
            reference.contrastive,
            form="similarity",
            pos_margin=0.8,
            neg_margin=0.5,
            pair_reduction="sum",
        ),
    ),
    "multi_similarity_mined": (
        lambda **kw: MultiSimilarityLoss(beta=10.0, **kw),
        functools.partial(reference.multi_similarity, beta=10.0),
    ),
    "triplet_semi_hard": (
        lambda **kw: TripletMarginLoss(mining="semi-hard", margin=0.2, **kw),
        functools.partial(
            reference.triplet_margin, mining="semi-hard", margin=0.2
        ),
    ),
}


@pytest.fixture
def ordinal_reference(monkeypatch):
    """The NumPy references with ``relevant`` replaced by the rule."""
    monkeypatch.setattr(reference, "relevant", np_ordinal)


def batch(n=12, d=6, seed=0, levels=5):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, d)).astype("float32")
    labels = rng.integers(0, levels, n).astype("int32")
    return emb, labels


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_relevance_function_matches_the_reference(name, ordinal_reference):
    build, ref_fn = LOSSES[name]
    emb, labels = batch()
    want = ref_fn(emb.astype(np.float64), labels)
    loss = build(relevance=ordinal)
    got = loss.per_anchor(emb, labels).numpy()
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6)
    # Keras' entry point (y_true converted to float32; the class ids, not
    # their first positions, must reach the function).
    np.testing.assert_allclose(
        float(loss(labels, emb)), want.mean(), rtol=RTOL, atol=1e-6
    )
    # The plain label rule gives something else (the test can fail).
    plain = build().per_anchor(emb, labels).numpy()
    assert np.abs(plain - want).max() > 1e-3


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_relevance_matrix_per_call_matches_the_reference(
    name, ordinal_reference
):
    build, ref_fn = LOSSES[name]
    emb, labels = batch(seed=1)
    ref_emb, ref_labels = batch(n=9, seed=2)
    want = ref_fn(
        emb.astype(np.float64),
        labels,
        ref=ref_emb.astype(np.float64),
        ref_labels=ref_labels,
    )
    rel = np.abs(labels[:, None] - ref_labels[None, :]) <= 1
    refs = References(ref_emb, ref_labels)
    loss = build()
    got = loss.per_anchor(emb, labels, refs, relevance=rel).numpy()
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6)
    # A matrix wins over the loss's own function.
    other = build(relevance=lambda a, b: tf.equal(a[:, None], b[None, :]))
    got = other.per_anchor(emb, labels, refs, relevance=rel).numpy()
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_xla_matches_eager_values_and_gradients(jit):
    emb, labels = batch(seed=3)
    loss = MultiSimilarityLoss(beta=10.0, relevance=ordinal)

    def step(e, y):
        with tf.GradientTape() as tape:
            tape.watch(e)
            value = tf.reduce_mean(loss.per_anchor(e, y))
        return value, tape.gradient(value, e)

    e, y = tf.constant(emb), tf.constant(labels)
    want = step(e, y)
    got = tf.function(step, jit_compile=jit)(e, y)
    np.testing.assert_allclose(got[0], want[0], rtol=RTOL)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-6)


def test_gradient_matches_finite_differences(ordinal_reference):
    emb, labels = batch(n=8, d=4, seed=4)
    loss = ContrastiveLoss(relevance=ordinal)
    e = tf.constant(emb.astype(np.float64))
    with tf.GradientTape() as tape:
        tape.watch(e)
        value = tf.reduce_sum(loss.per_anchor(tf.cast(e, tf.float32), labels))
    grad = tape.gradient(value, e).numpy()
    h, num = 1e-4, np.zeros_like(emb, np.float64)
    for i in range(emb.shape[0]):
        for j in range(emb.shape[1]):
            up, down = emb.astype(np.float64), emb.astype(np.float64)
            up[i, j] += h
            down[i, j] -= h
            num[i, j] = (
                reference.contrastive(up, labels).sum()
                - reference.contrastive(down, labels).sum()
            ) / (2 * h)
    np.testing.assert_allclose(grad, num, rtol=2e-2, atol=2e-3)


def test_memory_splits_the_matrix_like_the_references(ordinal_reference):
    emb, labels = batch(n=8, seed=5)
    mem_emb, mem_labels = batch(n=16, seed=6)
    memory = CrossBatchMemory(16, emb.shape[1])
    memory.enqueue(mem_emb, mem_labels, np.arange(16, dtype=np.int32) + 100)
    m_emb, m_lab, m_ids, m_valid = memory.references()
    ids = np.arange(8, dtype=np.int32)
    refs = References(
        tf.concat([emb, m_emb], 0),
        tf.concat([labels, m_lab], 0),
        tf.concat([ids, m_ids], 0),
        tf.concat([tf.ones([8], tf.bool), m_valid], 0),
    )
    all_labels = np.concatenate([labels, mem_labels])
    rel = np.abs(labels[:, None] - all_labels[None, :]) <= 1
    loss = ContrastiveLoss()
    got = memory.per_anchor(loss, emb, labels, ids, refs, relevance=rel)
    with_fn = memory.per_anchor(
        ContrastiveLoss(relevance=ordinal), emb, labels, ids, refs
    )
    # Batch term + memory term (avg_nonzero each), from the reference.
    e64 = emb.astype(np.float64)
    want = reference.contrastive(e64, labels) + reference.contrastive(
        e64, labels, ref=mem_emb.astype(np.float64), ref_labels=mem_labels
    )
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(with_fn, want, rtol=RTOL, atol=1e-6)


def test_relevance_matching_the_labels_gives_the_label_loss():
    # Fused contrastive path (labels) vs generic path (matrix), SupCon.
    emb, labels = batch(seed=7)
    same = labels[:, None] == labels[None, :]
    for loss in (ContrastiveLoss(), SupConLoss()):
        np.testing.assert_allclose(
            loss.per_anchor(emb, labels, relevance=same),
            loss.per_anchor(emb, labels),
            rtol=RTOL,
            atol=1e-6,
        )


def test_pair_masks_exclude_self_and_invalid_with_a_matrix():
    labels = tf.constant([0, 1, 2])
    rel = tf.ones([3, 3], tf.bool)
    pos, neg = ops.pair_masks(
        labels,
        labels,
        ids=[0, 1, 2],
        ref_ids=[0, 1, 2],
        ref_valid=[True, True, False],
        relevance=rel,
    )
    np.testing.assert_array_equal(
        pos.numpy(), [[0, 1, 0], [1, 0, 0], [1, 1, 0]]
    )
    assert not neg.numpy().any()


def test_bad_relevance_is_refused_clearly():
    emb, labels = batch(n=4)
    with pytest.raises(ValueError, match="bool"):
        ContrastiveLoss().per_anchor(
            emb, labels, relevance=np.ones((4, 4), np.float32)
        )
    with pytest.raises(ValueError, match="3 rows; the pair set has 4"):
        ContrastiveLoss().per_anchor(
            emb, labels, relevance=np.ones((3, 4), bool)
        )
    with pytest.raises(ValueError, match="rank 2"):
        ContrastiveLoss().per_anchor(emb, labels, relevance=np.ones(4, bool))
    with pytest.raises(ValueError, match="must be a function"):
        ContrastiveLoss(relevance=np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="function's result must be a bool"):
        ContrastiveLoss(relevance=lambda a, b: tf.zeros([4, 4])).per_anchor(
            emb, labels
        )
    with pytest.raises(ValueError, match="one positive per class"):
        NPairsLoss(relevance=ordinal).per_anchor(emb, labels)


def test_config_round_trip_keeps_a_registered_function(ordinal_reference):
    emb, labels = batch(seed=8)
    loss = MultiSimilarityLoss(beta=10.0, relevance=ordinal)
    config = keras.saving.serialize_keras_object(loss)
    back = keras.saving.deserialize_keras_object(config)
    assert back.relevance is ordinal
    np.testing.assert_allclose(
        back.per_anchor(emb, labels),
        reference.multi_similarity(emb.astype(np.float64), labels, beta=10.0),
        rtol=RTOL,
        atol=1e-6,
    )
    assert "relevance" not in MultiSimilarityLoss().get_config()


def test_dml_model_trains_with_a_relevance_function():
    from tfdml.models import DMLModel
    from tfdml.models import L2Normalization

    emb, labels = batch(n=32, d=8, seed=9)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    raw = keras.layers.Dense(4)(inputs)
    model = DMLModel(
        keras.Model(inputs, {"embeddings": L2Normalization()(raw), "raw": raw})
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=ContrastiveLoss(relevance=ordinal),
    )
    hist = model.fit(
        emb, labels, batch_size=16, epochs=2, verbose=0, shuffle=False
    ).history
    assert np.isfinite(hist["loss"]).all()
    assert hist["loss"][-1] < hist["loss"][0]
