"""Multi-hot labels [B, C] (relevant iff the label sets intersect) in every
registered pair loss and miner, against NumPy brute-force relevance."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfdml.losses
import tfdml.meta  # noqa: F401  (registers the MMSI pair losses)
import tfdml.mining
from tests import reference_contrastive_family as ref
from tests.conftest import make_batch
from tfdml import ops
from tfdml import registry
from tfdml.losses import References
from tfdml.losses.base import check_labels
from tfdml.memory import CrossBatchMemory

PAIR_LOSSES = sorted(registry.registered(tfdml.losses.PairLoss))
MINERS = sorted(registry.registered(tfdml.mining.base.Miner))
RTOL = 1e-5
ATOL = 1e-6


def multi_hot_batch(seed=0, n=12, classes=5, dim=8):
    """Embeddings clustered by label sets; rows with 1-3 labels, one row
    with none (a negative of every other row)."""
    rng = np.random.default_rng(seed)
    y = np.zeros((n, classes), np.int32)
    for i in range(n):
        y[i, rng.choice(classes, rng.integers(1, 4), replace=False)] = 1
    y[-1] = 0
    centers = rng.normal(size=(classes, dim))
    emb = y @ centers * 0.5 + rng.normal(size=(n, dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.astype(np.float32), y


def brute_masks(y, ry=None, ids=None, ref_ids=None, valid=None):
    lists = ref.pos_neg_lists(y, ry, ids, ref_ids, valid)
    m = len(y) if ry is None else len(ry)
    pos = np.zeros((len(y), m), bool)
    neg = np.zeros((len(y), m), bool)
    for i, (p, n) in enumerate(lists):
        pos[i, p] = True
        neg[i, n] = True
    return pos, neg


def context(n, m=None):
    probs = np.linspace(0.5, 0.95, n).astype(np.float32)
    ref_probs = probs if m is None else np.linspace(0.4, 0.9, m)
    return {"probs": probs, "ref_probs": ref_probs.astype(np.float32)}


def call_per_anchor(loss, emb, labels, **kw):
    try:
        return loss.per_anchor(emb, labels, **kw)
    except ValueError as e:
        if "probs" not in str(e):
            raise
        refs = kw.get("refs")
        m = None if refs is None else len(refs.labels)
        return loss.per_anchor(emb, labels, **kw, **context(emb.shape[0], m))


def bare(name):
    loss = registry.registered(tfdml.losses.PairLoss)[name]()
    if hasattr(loss, "fused"):
        loss.fused = False  # the generic path calls ops.pair_masks eagerly
    return loss


@pytest.fixture
def spy(monkeypatch):
    """Records every (pos, neg) that ops.pair_masks returns."""
    seen = []
    real = ops.pair_masks

    def spied(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(tuple(t.numpy() for t in out))
        return out

    monkeypatch.setattr(ops, "pair_masks", spied)
    return seen


@pytest.mark.parametrize("jit", [False, True])
def test_float_pair_masks_equal_the_bool_ones(jit):
    """``pair_masks(dtype=tf.float32)`` (the fused contrastive forward's
    masks): 0/1 floats equal to the bool masks, for multi-hot labels with
    an empty row, ids shared with a reference, an invalid reference, int
    labels without a reference set, eager and XLA."""
    _, y = multi_hot_batch(1)
    _, ry = multi_hot_batch(2, n=9)
    ids = np.arange(12)
    ref_ids = np.arange(100, 109)
    ref_ids[3] = 4
    valid = np.ones(9, bool)
    valid[5] = False
    ints = np.array([0, 0, 1, 1, 2, 2, 0, 3])
    cases = [
        (y, ry, ids, ref_ids, valid),
        (y, None, None, None, None),
        (ints, None, None, None, None),
        (ints, ints[::-1], np.arange(8), np.arange(8)[::-1], valid[:8]),
    ]
    for args in cases:
        fn = tf.function(
            lambda *a: ops.pair_masks(*a, dtype=tf.float32), jit_compile=jit
        )
        want = brute_masks(*args)
        got = fn(*[tf.constant(a) if a is not None else None for a in args])
        for g, w in zip(got, want):
            assert g.dtype == tf.float32
            np.testing.assert_array_equal(g.numpy(), w.astype(np.float32))


def test_pair_masks_and_relevance_vs_brute_force():
    _, y = multi_hot_batch(1)
    _, ry = multi_hot_batch(2, n=9)
    ids = np.arange(12)
    ref_ids = np.arange(100, 109)
    ref_ids[3] = 4  # anchor 4 is reference 3: never its own positive
    valid = np.ones(9, bool)
    valid[5] = False
    pos, neg = ops.pair_masks(y, ry, ids, ref_ids, valid)
    want = brute_masks(y, ry, ids, ref_ids, valid)
    np.testing.assert_array_equal(pos.numpy(), want[0])
    np.testing.assert_array_equal(neg.numpy(), want[1])
    pos, neg = ops.pair_masks(y.astype(bool))
    want = brute_masks(y)
    np.testing.assert_array_equal(pos.numpy(), want[0])
    np.testing.assert_array_equal(neg.numpy(), want[1])
    # A row with no label: a negative of every other row, never of itself.
    empty = np.flatnonzero(~y.any(axis=1))
    assert len(empty) and not neg.numpy()[empty, empty].any()
    assert neg.numpy()[empty].sum() == len(y) - 1
    # Overlap, not equality: {0, 1} and {1, 2} are relevant.
    r = ops.relevance(tf.constant([[1, 1, 0]]), tf.constant([[0, 1, 1]]))
    assert bool(r.numpy()[0, 0])
    # Int and multi-hot labels cannot be mixed.
    with pytest.raises(ValueError, match="ref_labels"):
        ops.pair_masks(y, np.arange(9))
    with pytest.raises(ValueError, match="ref_labels"):
        ops.pair_masks(np.arange(12), ry)
    with pytest.raises(ValueError, match="ref_labels"):
        ops.pair_masks(y, ry[:, :3])


@pytest.mark.parametrize("name", PAIR_LOSSES, ids=str)
def test_every_pair_loss_builds_multi_hot_masks(name, spy):
    """Each loss's masks are the brute-force intersect masks (batch and a
    reference set with ids and invalid slots), its values finite, its
    gradient finite, and the Keras entry point equals per_anchor."""
    loss = bare(name)
    emb, y = multi_hot_batch(0)
    x = tf.Variable(emb)
    with tf.GradientTape() as tape:
        per = call_per_anchor(loss, x, tf.constant(y))
        total = tf.reduce_mean(per)
    grad = tape.gradient(total, x)
    assert per.shape == (len(y),)
    assert np.all(np.isfinite(per.numpy()))
    assert grad is None or np.all(np.isfinite(grad.numpy()))
    assert spy, "the loss never built pair masks"
    want = brute_masks(y)
    for pos, neg in spy:
        np.testing.assert_array_equal(pos, want[0])
        np.testing.assert_array_equal(neg, want[1])
    spy.clear()
    bank, by = multi_hot_batch(5, n=9)
    valid = np.ones(9, bool)
    valid[2] = False
    ids = np.arange(12)
    ref_ids = np.arange(50, 59)
    per = call_per_anchor(
        loss, emb, y, refs=References(bank, by, ref_ids, valid), ids=ids
    )
    assert np.all(np.isfinite(per.numpy()))
    want = brute_masks(y, by, ids, ref_ids, valid)
    assert spy
    for pos, neg in spy:
        np.testing.assert_array_equal(pos, want[0])
        np.testing.assert_array_equal(neg, want[1])


@pytest.mark.parametrize("name", PAIR_LOSSES, ids=str)
def test_one_hot_equals_int_labels(name):
    """One label per row: multi-hot and int labels give the same losses, in
    the Keras entry point (float y_true) and in XLA."""
    loss = registry.registered(tfdml.losses.PairLoss)[name]()
    emb, labels = make_batch(0)
    labels = labels.copy()
    labels[-1] = 4  # a singleton
    onehot = np.eye(5, dtype=np.float32)[labels]
    a = call_per_anchor(loss, emb, labels).numpy()
    b = call_per_anchor(loss, emb, onehot).numpy()
    np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)
    if "probs" not in str(loss.get_config()) and name not in (
        "WeightedContrastiveLoss",
    ):
        np.testing.assert_allclose(
            float(loss(onehot, emb)), float(loss(labels, emb)), rtol=RTOL
        )

        @tf.function(jit_compile=True)
        def xla(e, y):
            return loss(y, e)

        np.testing.assert_allclose(
            float(xla(emb, onehot)), float(loss(labels, emb)), rtol=1e-4
        )


def test_contrastive_fused_path_multi_hot():
    emb, y = multi_hot_batch(3)
    fused = tfdml.losses.ContrastiveLoss()
    plain = tfdml.losses.ContrastiveLoss()
    plain.fused = False
    np.testing.assert_allclose(
        fused.per_anchor(emb, y).numpy(),
        plain.per_anchor(emb, y).numpy(),
        rtol=RTOL,
        atol=ATOL,
    )


@pytest.mark.parametrize("name", MINERS, ids=str)
def test_every_miner_with_multi_hot(name, spy):
    """A loss with each miner: the miner narrows the intersect masks and the
    loss equals the pair loss on the miner's output for brute-force masks."""
    miner = tfdml.mining.base.get(name)
    loss = tfdml.losses.ContrastiveLoss(form="similarity", miner=miner)
    emb, y = multi_hot_batch(4)
    got = loss.per_anchor(emb, y).numpy()
    pos, neg = brute_masks(y)
    np.testing.assert_array_equal(spy[0][0], pos)
    sim = ops.cosine_similarity(tf.constant(emb))
    mp, mn = miner(sim, tf.constant(pos), tf.constant(neg))
    assert not np.any(mp.numpy() & ~pos) and not np.any(mn.numpy() & ~neg)
    want = loss.pair_loss(sim, mp, mn).numpy()
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert np.all(np.isfinite(got))


@pytest.mark.parametrize("kind", ["supcon", "nt_xent"])
def test_supcon_nt_xent_multi_hot_vs_reference(kind):
    cls, fn = {
        "supcon": (tfdml.losses.SupConLoss, ref.supcon),
        "nt_xent": (tfdml.losses.NTXentLoss, ref.nt_xent),
    }[kind]
    emb, y = multi_hot_batch(6)
    loss = cls()
    want = fn(emb, y)
    assert want[-1] == 0.0 and np.all(want[:-1] > 0)
    np.testing.assert_allclose(
        loss.per_anchor(emb, y).numpy(), want, rtol=RTOL, atol=ATOL
    )
    np.testing.assert_allclose(float(loss(y, emb)), want.mean(), rtol=RTOL)
    bank, by = multi_hot_batch(7, n=10)
    got = loss.per_anchor(emb, y, References(bank, by)).numpy()
    np.testing.assert_allclose(got, fn(emb, y, bank, by), rtol=RTOL, atol=ATOL)


def test_bad_multi_hot_values():
    emb, y = multi_hot_batch(0)
    loss = tfdml.losses.MultiSimilarityLoss()
    for bad in (y * 2, y * 0.5, np.where(y == 1, np.nan, 0.0)):
        with pytest.raises(ValueError, match="0 or 1"):
            loss(bad, emb)
    # Values unknown at trace time: an assert (eager graph), NaN under XLA.
    spec = tf.TensorSpec([None, y.shape[1]], tf.float32)

    @tf.function(input_signature=[spec])
    def graph(labels):
        return check_labels(labels, emb)[1]

    with pytest.raises(tf.errors.InvalidArgumentError, match="0 or 1"):
        graph(tf.constant(y * 0.5, tf.float32))
    np.testing.assert_array_equal(graph(tf.constant(y, tf.float32)), emb)

    @tf.function(jit_compile=True)
    def xla(labels, e):
        return loss(labels, e)

    assert np.isnan(float(xla(tf.constant(y * 0.5, tf.float32), emb)))
    assert np.isfinite(float(xla(tf.constant(y, tf.float32), emb)))

    @tf.function(input_signature=[tf.TensorSpec([12, None], tf.float32)])
    def unknown_classes(labels):
        return check_labels(labels, emb)[1]

    with pytest.raises(ValueError, match="unknown number of classes"):
        unknown_classes.get_concrete_function()


def test_multi_hot_dtypes_agree():
    emb, y = multi_hot_batch(2)
    loss = tfdml.losses.SupConLoss()
    want = loss.per_anchor(emb, y).numpy()
    for cast in (bool, np.int64, np.float32, np.float16):
        np.testing.assert_allclose(
            loss.per_anchor(emb, y.astype(cast)).numpy(), want, rtol=1e-6
        )


def test_memory_and_augmenter_errors_with_multi_hot_labels():
    # A memory of class ids (multi_hot_classes=None), a memory of another
    # width and an augmenter refuse multi-hot labels with a message that
    # says what to do; a multi-hot memory refuses class ids.
    from tests.models.test_dml_model import dense_encoder
    from tfdml.models import DMLModel

    memory = CrossBatchMemory(10, 6)
    with pytest.raises(ValueError, match="multi_hot_classes=C"):
        memory.enqueue(tf.zeros([4, 6]), tf.zeros([4, 3]), tf.range(4))
    x = np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32)
    _, y = multi_hot_batch(0)  # 5 classes

    class Augmenter:
        def synthesize(self, raw, labels, ids):
            return raw, labels, ids

    for kwargs, match in (
        ({"memory": memory}, r"multi_hot_classes=5\); received memory"),
        (
            {"memory": CrossBatchMemory(10, 6, multi_hot_classes=4)},
            r"multi_hot_classes=5.*multi_hot_classes=4",
        ),
        ({"augmenter": Augmenter()}, r"augmenter \(IAA\)"),
    ):
        model = DMLModel(dense_encoder(), **kwargs)
        model.compile(optimizer="sgd", loss=tfdml.losses.SupConLoss())
        with pytest.raises(ValueError, match=match):
            model.train_on_batch(x, y)
    model = DMLModel(
        dense_encoder(), memory=CrossBatchMemory(10, 6, multi_hot_classes=5)
    )
    model.compile(optimizer="sgd", loss=tfdml.losses.SupConLoss())
    with pytest.raises(ValueError, match="stores multi-hot label rows"):
        model.train_on_batch(x, np.arange(12) % 3)
    model.train_on_batch(x, y)  # the matching width trains


def test_dml_model_fit_multi_hot():
    """DMLModel (no memory) trains on multi-hot labels; its train step loss
    equals the reference on the model's own embeddings."""
    from tests.models.test_dml_model import dense_encoder
    from tfdml.models import DMLModel

    x = np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32)
    _, y = multi_hot_batch(0)
    model = DMLModel(dense_encoder())
    model.compile(
        optimizer=keras.optimizers.SGD(0.0), loss=tfdml.losses.SupConLoss()
    )
    emb = model.encoder(x)["embeddings"].numpy()
    logs = model.train_on_batch(x, y, return_dict=True)
    np.testing.assert_allclose(
        logs["loss"], ref.supcon(emb, y).mean(), rtol=1e-5
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=tfdml.losses.MultiSimilarityLoss(),
    )
    hist = model.fit(x, y, batch_size=6, epochs=1, verbose=0, shuffle=False)
    assert np.isfinite(hist.history["loss"][0])


def test_class_dictionary_refuses_multi_hot_labels():
    # It keeps features per class id: multi-hot labels get a clear error
    # (they used to fail in the scatter with a shape error).
    from tfdml.memory import ClassDictionary

    _, y = multi_hot_batch(0)  # [12, 5]
    with pytest.raises(ValueError, match="ClassDictionary.*multi-hot"):
        ClassDictionary(5, 6, 2).enqueue(tf.zeros([12, 6]), y)
