"""CrossBatchMemory against a Python-list ring buffer and brute-force loss."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import reference
from tfdml.losses import MultiSimilarityLoss
from tfdml.losses import References
from tfdml.memory import CrossBatchMemory


class ListRing:
    """The reference: a Python list used as a ring buffer (PML test_queue)."""

    def __init__(self, size):
        self.size = size
        self.slots = [None] * size
        self.pointer = 0
        self.filled = 0

    def enqueue(self, rows):
        for row in rows:
            self.slots[self.pointer] = row
            self.pointer = (self.pointer + 1) % self.size
            self.filled = min(self.filled + 1, self.size)


def stream(step, batch, dim=4, seed=0):
    rng = np.random.default_rng(seed + step)
    emb = rng.normal(size=(batch, dim)).astype(np.float32)
    start = step * batch
    labels = (np.arange(start, start + batch) % 7).astype(np.int32)
    ids = np.arange(start, start + batch, dtype=np.int32)
    return emb, labels, ids


def check_against(memory, ring, dim=4):
    np.testing.assert_equal(memory.pointer.numpy(), ring.pointer)
    np.testing.assert_equal(memory.filled.numpy(), ring.filled)
    emb, labels, ids, valid = (t.numpy() for t in memory.references())
    for slot in range(ring.size):
        row = ring.slots[slot]
        if row is None:
            assert not valid[slot]
            assert labels[slot] == -1
            continue
        assert valid[slot]
        np.testing.assert_array_equal(emb[slot], row[0])
        assert labels[slot] == row[1]
        assert ids[slot] == row[2]


@pytest.mark.parametrize(
    "size,batch",
    [(12, 4), (10, 4), (5, 8), (7, 7)],
    ids=["divides", "wraps_unevenly", "batch_larger", "equal"],
)
def test_pointer_and_contents_match_list_reference(size, batch):
    memory = CrossBatchMemory(size, 4)
    ring = ListRing(size)
    for i in range(1, 7):
        emb, labels, ids = stream(i - 1, batch)
        memory.enqueue(emb, labels, ids)
        ring.enqueue(zip(emb, labels, ids))
        assert memory.pointer.numpy() == (i * batch) % size
        assert memory.filled.numpy() == min(i * batch, size)
        assert memory.step.numpy() == i
        check_against(memory, ring)


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_tf_function_and_xla_match_eager(jit):
    eager = CrossBatchMemory(10, 4)
    compiled = CrossBatchMemory(10, 4)
    fn = tf.function(compiled.enqueue, jit_compile=jit)
    for i in range(5):
        emb, labels, ids = stream(i, 4)
        eager.enqueue(emb, labels, ids)
        fn(emb, labels, ids)
    for a, b in zip(eager.references(), compiled.references()):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert compiled.pointer.numpy() == (5 * 4) % 10


def test_unknown_batch_size_in_tf_function():
    memory = CrossBatchMemory(6, 4)
    ring = ListRing(6)
    fn = tf.function(
        memory.enqueue,
        input_signature=[
            tf.TensorSpec([None, 4]),
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None], tf.int32),
        ],
    )
    for i, batch in enumerate([4, 9, 2]):
        emb, labels, ids = stream(i, batch)
        fn(emb, labels, ids)
        ring.enqueue(zip(emb, labels, ids))
        check_against(memory, ring)


def test_start_after_keeps_memory_empty_then_fills():
    memory = CrossBatchMemory(8, 4, start_after=2)
    ring = ListRing(8)
    for i in range(5):
        _, _, _, valid = memory.references()
        if i < 2:
            assert not valid.numpy().any()
            assert not memory.active.numpy()
        emb, labels, ids = stream(i, 3)
        memory.enqueue(emb, labels, ids)
        if i >= 2:
            ring.enqueue(zip(emb, labels, ids))
        check_against(memory, ring)
    assert memory.pointer.numpy() == (3 * 3) % 8


def test_stored_as_float32_without_gradient():
    memory = CrossBatchMemory(4, 2)
    x = tf.Variable([[1.0, 2.0], [3.0, 4.0]], dtype=tf.float16)
    with tf.GradientTape() as tape:
        memory.enqueue(x, [0, 1], [0, 1])
        emb, _, _, valid = memory.references()
        total = tf.reduce_sum(tf.cast(emb, tf.float32))
    assert tape.gradient(total, x) is None
    assert emb.dtype == tf.float32
    np.testing.assert_array_equal(valid.numpy(), [True, True, False, False])


def test_labels_of_shape_b1_accepted():
    memory = CrossBatchMemory(4, 2)
    memory.enqueue(np.ones((2, 2), np.float32), [[3], [4]], [0, 1])
    np.testing.assert_array_equal(memory.labels.numpy()[:2], [3, 4])


def test_variables_are_non_trainable_and_checkpointed(tmp_path):
    memory = CrossBatchMemory(6, 4)
    assert memory.trainable_variables == []
    assert len(memory.non_trainable_variables) == 7
    for i in range(3):
        memory.enqueue(*stream(i, 4))
    ckpt = tf.train.Checkpoint(memory=memory)
    path = ckpt.write(str(tmp_path / "mem"))
    restored = CrossBatchMemory(6, 4)
    tf.train.Checkpoint(memory=restored).read(path).assert_consumed()
    for a, b in zip(memory.weights, restored.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_reset_empties():
    memory = CrossBatchMemory(6, 4)
    memory.enqueue(*stream(0, 4))
    memory.reset()
    assert memory.pointer.numpy() == 0
    assert memory.filled.numpy() == 0
    assert not memory.references()[3].numpy().any()


def test_config_roundtrip():
    memory = CrossBatchMemory(16, 8, start_after=3, name="xbm")
    config = keras.saving.serialize_keras_object(memory)
    clone = keras.saving.deserialize_keras_object(config)
    assert isinstance(clone, CrossBatchMemory)
    assert (clone.size, clone.dim, clone.start_after) == (16, 8, 3)
    assert clone.name == "xbm"


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        ({"size": 0, "dim": 4}, "size"),
        ({"size": 2.5, "dim": 4}, "size"),
        ({"size": 4, "dim": -1}, "dim"),
        ({"size": 4, "dim": 4, "start_after": -1}, "start_after"),
    ],
)
def test_bad_arguments_raise(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        CrossBatchMemory(**kwargs)


def test_wrong_dim_raises():
    memory = CrossBatchMemory(4, 3)
    with pytest.raises(ValueError, match="embeddings"):
        memory.enqueue(np.ones((2, 5), np.float32), [0, 1], [0, 1])


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("fill_steps", [0, 1, 3], ids=["empty", "part", "wrap"])
def test_loss_with_memory_equals_loss_on_concatenation(fill_steps):
    """anchors = batch; refs = [batch; valid memory]; self-pairs by id."""
    rng = np.random.default_rng(3)
    dim, size, batch = 6, 10, 6
    memory = CrossBatchMemory(size, dim)
    labels_pool = np.array([0, 0, 1, 1, 2, 2], np.int32)
    for step in range(fill_steps):
        e = unit(rng.normal(size=(batch, dim))).astype(np.float32)
        memory.enqueue(e, labels_pool, np.arange(batch) + step * batch)
    emb = unit(rng.normal(size=(batch, dim))).astype(np.float32)
    ids = np.arange(batch, dtype=np.int32) + 100
    if fill_steps:
        # The memory also holds the anchors themselves (same ids): they must
        # not count as their own positives.
        memory.enqueue(emb, labels_pool, ids)
    m_emb, m_lab, m_ids, m_valid = (t.numpy() for t in memory.references())
    loss = MultiSimilarityLoss(epsilon=0.1)
    got = loss.per_anchor(
        emb,
        labels_pool,
        References(
            np.concatenate([emb, m_emb]),
            np.concatenate([labels_pool, m_lab]),
            np.concatenate([ids, m_ids]),
            np.concatenate([np.ones(batch, bool), m_valid]),
        ),
        ids,
    ).numpy()
    keep = m_valid
    ref = np.concatenate([emb, m_emb[keep]])
    ref_labels = np.concatenate([labels_pool, m_lab[keep]])
    ref_ids = np.concatenate([ids, m_ids[keep]])
    want = reference.multi_similarity(
        emb, labels_pool, ref, ref_labels, ids, ref_ids, epsilon=0.1
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    plain = loss.per_anchor(
        emb, labels_pool, References(ref, ref_labels, ref_ids), ids
    ).numpy()
    np.testing.assert_allclose(got, plain, rtol=1e-6, atol=1e-7)
    if fill_steps:
        assert int(m_valid.sum()) == min((fill_steps + 1) * batch, size)
        assert np.abs(want).sum() > 0


# --- memory_weight / memory_reduction (issue 13) ---------------------------

POS_MARGIN, NEG_MARGIN = 1.0, 0.5  # XBM's contrastive (similarity form)


def xbm_contrastive_reference(
    emb, labels, ids, mem, mem_labels, mem_ids, mem_valid, weight, reduction
):
    """Float64, from the equations (official XBM + PML's AvgNonZero).

    batch term  b_i = sum_{j in P_i^B} (1 - S_ij)_+
                      + sum_{k in N_i^B} (S_ik - .5)_+
    memory term m_i = the same sums over valid memory slots ("sum"), or
                      mean over the non-zero positive pair losses + mean over
                      the non-zero negative pair losses ("avg_nonzero")
    loss_i = b_i + weight * m_i;  a reference with the anchor's id is skipped.
    Labels are class ids or multi-hot rows (positive: the label sets
    intersect, :func:`tests.reference.relevant`).
    """
    emb = np.asarray(emb, np.float64)
    mem = np.asarray(mem, np.float64)
    u = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    norms = np.linalg.norm(mem, axis=1, keepdims=True)
    v = mem / np.where(norms > 0, norms, 1.0)
    out = np.zeros(len(emb))
    for i in range(len(emb)):
        b = 0.0
        for j in range(len(emb)):
            if j == i:
                continue
            s = u[i] @ u[j]
            if reference.relevant(labels[i], labels[j]):
                b += max(0.0, POS_MARGIN - s)
            else:
                b += max(0.0, s - NEG_MARGIN)
        pos, neg = [], []
        for j in range(len(mem)):
            if not mem_valid[j] or mem_ids[j] == ids[i]:
                continue
            s = u[i] @ v[j]
            if reference.relevant(labels[i], mem_labels[j]):
                pos.append(max(0.0, POS_MARGIN - s))
            else:
                neg.append(max(0.0, s - NEG_MARGIN))
        if reduction == "sum":
            m = sum(pos) + sum(neg)
        else:
            nz_p = [p for p in pos if p > 0]
            nz_n = [n for n in neg if n > 0]
            m = (sum(nz_p) / len(nz_p) if nz_p else 0.0) + (
                sum(nz_n) / len(nz_n) if nz_n else 0.0
            )
        out[i] = b + weight * m
    return out


def numeric_grad(fn, x, eps=1e-6):
    """Central differences of sum(fn(x)) in float64."""
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        hi, lo = x.copy(), x.copy()
        hi[idx] += eps
        lo[idx] -= eps
        grad[idx] = (fn(hi).sum() - fn(lo).sum()) / (2 * eps)
    return grad


def xbm_fixture(memory, seed=5):
    """A batch of 8 (4 classes x 2) and a memory holding 3 earlier batches,
    one of them the anchors themselves (same ids), one empty slot region."""
    rng = np.random.default_rng(seed)
    dim = memory.dim
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3], np.int32)
    ids = np.arange(8, dtype=np.int32) + 100
    emb = rng.normal(size=(8, dim)).astype(np.float32)
    for step in range(2):
        past = rng.normal(size=(8, dim)).astype(np.float32)
        # close to the anchors so that both polarities have active pairs
        past = past * 0.6 + emb * (step + 1) * 0.5
        memory.enqueue(past, rng.permutation(labels), np.arange(8) + 8 * step)
    memory.enqueue(emb, labels, ids)
    return emb, labels, ids


def xbm_loss(memory, loss, emb, labels, ids):
    m_emb, m_lab, m_ids, m_valid = memory.references()
    return memory.per_anchor(
        loss,
        emb,
        labels,
        ids,
        References(
            tf.concat([emb, m_emb], 0),
            tf.concat([labels, m_lab], 0),
            tf.concat([ids, m_ids], 0),
            tf.concat([tf.ones([8], tf.bool), m_valid], 0),
        ),
    )


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "unit"])
@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
@pytest.mark.parametrize("weight", [1.0, 1.0 / 32])
@pytest.mark.parametrize("reduction", ["sum", "avg_nonzero"])
def test_memory_weight_and_reduction_match_numpy(
    reduction, weight, mode, normalize
):
    from tfdml.losses import ContrastiveLoss

    memory = CrossBatchMemory(
        30,
        6,
        memory_weight=weight,
        memory_reduction=reduction,
        normalize=normalize,
    )
    emb0, labels, ids = xbm_fixture(memory)
    loss = ContrastiveLoss(
        form="similarity", pos_margin=POS_MARGIN, neg_margin=NEG_MARGIN
    )
    x = tf.Variable(emb0)

    def step():
        with tf.GradientTape() as tape:
            per = xbm_loss(memory, loss, x, labels, ids)
            total = tf.reduce_sum(per)
        return per, tape.gradient(total, x)

    if mode != "eager":
        step = tf.function(step, jit_compile=mode == "xla")
    per, grad = step()
    m_emb, m_lab, m_ids, m_valid = (t.numpy() for t in memory.references())
    assert 16 < m_valid.sum() < 30  # some empty slots stay invalid

    def ref(e):
        return xbm_contrastive_reference(
            e, labels, ids, m_emb, m_lab, m_ids, m_valid, weight, reduction
        )

    want = ref(emb0)
    np.testing.assert_allclose(per.numpy(), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        grad.numpy(), numeric_grad(ref, emb0), rtol=1e-4, atol=1e-5
    )
    # the fixture exercises both terms
    batch_only = xbm_contrastive_reference(
        emb0, labels, ids, m_emb, m_lab, m_ids, m_valid, 0.0, reduction
    )
    assert np.all(want - batch_only > 0) if weight else True


# --- normalize=True: unit rows stored, not re-normalised per step ----------


def test_normalized_memory_stores_unit_rows():
    rng = np.random.default_rng(11)
    memory = CrossBatchMemory(12, 5, normalize=True)
    rows = [3.0 * rng.normal(size=(4, 5)).astype(np.float32) for _ in range(4)]
    for k, x in enumerate(rows):
        memory.enqueue(x, np.arange(4) + k, np.arange(4) + 4 * k)
    want = unit(np.concatenate(rows[1:]).astype(np.float64))  # wrapped
    got = memory.references()[0].numpy()
    order = np.argsort(memory.references()[2].numpy())
    np.testing.assert_allclose(got[order], want, rtol=1e-6, atol=1e-7)


def normalised_shapes(monkeypatch):
    from tfdml import ops

    seen = []
    real = ops.l2_normalize

    def spy(x, axis=-1):
        seen.append(tuple(x.shape))
        return real(x, axis=axis)

    monkeypatch.setattr(ops, "l2_normalize", spy)
    return seen


@pytest.mark.parametrize("reduction", ["sum", "avg_nonzero"])
def test_normalized_memory_skips_renormalising_the_rows(monkeypatch, reduction):
    from tfdml.losses import ContrastiveLoss

    loss = ContrastiveLoss()
    shapes = {}
    for normalize in (False, True):
        memory = CrossBatchMemory(
            30, 6, memory_reduction=reduction, normalize=normalize
        )
        emb, labels, ids = xbm_fixture(memory)
        seen = normalised_shapes(monkeypatch)
        xbm_loss(memory, loss, emb, labels, ids)
        shapes[normalize] = seen
    # the guard can fail: the plain memory normalises its 30 rows
    assert (30, 6) in shapes[False]
    assert (30, 6) not in shapes[True] and (8, 6) in shapes[True]


def _losses():
    from tfdml.losses import ContrastiveLoss
    from tfdml.losses import MultiSimilarityLoss
    from tfdml.losses import TripletMarginLoss
    from tfdml.mining import MultiSimilarityMiner

    return {
        "contrastive": ContrastiveLoss(),
        "contrastive-similarity": ContrastiveLoss(form="similarity"),
        "ms+miner": MultiSimilarityLoss(miner=MultiSimilarityMiner()),
        "triplet": TripletMarginLoss(margin=0.2),
    }


@pytest.mark.parametrize("mode", ["eager", "xla"])
@pytest.mark.parametrize("reduction", ["auto", "sum", "joint"])
@pytest.mark.parametrize("name", list(_losses()))
def test_normalized_memory_gives_the_same_loss(name, reduction, mode):
    """Every pair loss that normalises: the same loss and gradient whether
    the memory stores raw rows (the loss normalises them) or unit rows."""
    out = []
    for normalize in (False, True):
        loss = _losses()[name]
        memory = CrossBatchMemory(
            30, 6, memory_reduction=reduction, normalize=normalize
        )
        emb, labels, ids = xbm_fixture(memory)
        x = tf.Variable(3.0 * emb)

        def step(memory=memory, loss=loss, x=x, labels=labels, ids=ids):
            with tf.GradientTape() as tape:
                per = xbm_loss(memory, loss, x, labels, ids)
                total = tf.reduce_sum(per)
            return per, tape.gradient(total, x)

        if mode == "xla":
            step = tf.function(step, jit_compile=True)
        out.append([t.numpy() for t in step()])
    assert np.all(np.isfinite(out[0][0])) and np.any(out[0][0] > 0)
    for a, b in zip(out[0], out[1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_normalized_memory_leaves_a_raw_loss_alone(monkeypatch):
    from tfdml.losses import ContrastiveLoss

    memory = CrossBatchMemory(30, 6, memory_reduction="sum", normalize=True)
    emb, labels, ids = xbm_fixture(memory)
    loss = ContrastiveLoss(form="similarity", normalize=False)
    assert memory._raw_loss(loss) is None
    seen = normalised_shapes(monkeypatch)
    per = xbm_loss(memory, loss, 2.0 * emb, labels, ids).numpy()
    assert seen == []
    assert np.all(np.isfinite(per))


def test_normalize_config_and_bad_value():
    memory = CrossBatchMemory(16, 8, normalize=True)
    clone = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(memory)
    )
    assert clone.normalize is True
    assert "normalize" not in CrossBatchMemory(16, 8).get_config()
    with pytest.raises(ValueError, match="normalize"):
        CrossBatchMemory(16, 8, normalize="yes")


def test_sum_at_weight_one_equals_the_joint_loss():
    """With a summed pair loss, "sum" (official) == one loss over batch +
    memory ("joint", tfdml's behaviour before memory_reduction)."""
    from tfdml.losses import ContrastiveLoss

    loss = ContrastiveLoss(form="similarity", pos_margin=1.0, neg_margin=0.5)
    out = []
    for reduction in ("sum", "joint"):
        memory = CrossBatchMemory(30, 6, memory_reduction=reduction)
        emb, labels, ids = xbm_fixture(memory)
        out.append(xbm_loss(memory, loss, emb, labels, ids).numpy())
    np.testing.assert_allclose(out[0], out[1], rtol=1e-5)


def test_auto_reduction_per_loss():
    """auto: avg_nonzero where the loss reduces over pairs, else joint
    (sum when weighted); an explicit avg_nonzero on MS is an error."""
    from tfdml.losses import ContrastiveLoss
    from tfdml.losses import TripletMarginLoss

    memory = CrossBatchMemory(8, 4)
    assert memory.memory_reduction == "auto"
    assert memory.memory_weight == 1.0
    assert memory.resolve_reduction(ContrastiveLoss()) == "avg_nonzero"
    assert memory.resolve_reduction(TripletMarginLoss()) == "avg_nonzero"
    assert memory.resolve_reduction(MultiSimilarityLoss()) == "joint"
    weighted = CrossBatchMemory(8, 4, memory_weight=0.5)
    assert weighted.resolve_reduction(MultiSimilarityLoss()) == "sum"
    strict = CrossBatchMemory(8, 4, memory_reduction="avg_nonzero")
    with pytest.raises(ValueError, match="memory_reduction='sum'"):
        strict.resolve_reduction(MultiSimilarityLoss())
    from tests.models.test_dml_model import dense_encoder
    from tfdml.models import DMLModel

    model = DMLModel(dense_encoder(), memory=strict)
    with pytest.raises(ValueError, match="avg_nonzero"):
        model.compile(loss=MultiSimilarityLoss())


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        ({"memory_weight": -1.0}, "memory_weight"),
        ({"memory_weight": float("nan")}, "memory_weight"),
        ({"memory_reduction": "mean"}, "memory_reduction"),
        ({"memory_reduction": "joint", "memory_weight": 0.5}, "memory_weight"),
    ],
)
def test_bad_memory_loss_arguments_raise(kwargs, arg):
    with pytest.raises(ValueError, match=f"`{arg}` must"):
        CrossBatchMemory(8, 4, **kwargs)


def test_memory_loss_config_roundtrip():
    memory = CrossBatchMemory(
        16, 8, memory_weight=0.125, memory_reduction="sum", name="xbm"
    )
    config = keras.saving.serialize_keras_object(memory)
    clone = keras.saving.deserialize_keras_object(config)
    assert (clone.memory_weight, clone.memory_reduction) == (0.125, "sum")
    assert clone.get_config() == memory.get_config()


def test_dml_model_step_uses_memory_weight_and_reduction():
    """The train step's loss == the NumPy reference on the model's own
    embeddings (SGD(0): the weights stay where they are)."""
    from tests.models.test_dml_model import dense_encoder
    from tfdml.losses import ContrastiveLoss
    from tfdml.models import DMLModel

    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 5)).astype(np.float32)
    y = np.array([0, 0, 1, 1, 2, 2, 3, 3], np.int32)
    memory = CrossBatchMemory(20, 6, memory_weight=0.25)
    model = DMLModel(dense_encoder(), memory=memory)
    model.compile(
        optimizer=keras.optimizers.SGD(0.0),
        loss=ContrastiveLoss(form="similarity", pos_margin=1.0, neg_margin=0.5),
        jit_compile=True,
    )
    model.train_on_batch(x, y)
    m_emb, m_lab, m_ids, m_valid = (t.numpy() for t in memory.references())
    model.reset_metrics()
    logs = model.train_on_batch(x[::-1], y, return_dict=True)
    emb = model.encoder(x[::-1])["embeddings"].numpy()
    want = xbm_contrastive_reference(
        emb,
        y,
        np.arange(8, 16),
        m_emb,
        m_lab,
        m_ids,
        m_valid,
        0.25,
        "avg_nonzero",
    ).mean()
    np.testing.assert_allclose(logs["loss"], want, rtol=1e-5)


# --- multi-hot label rows (multi_hot_classes) --------------------------------


def multi_hot_rows(rng, n, classes):
    """0/1 rows with 1-2 labels, and one row with none every 5 rows."""
    y = np.zeros((n, classes), np.int32)
    for i in range(n):
        if i % 5 != 4:
            y[i, rng.choice(classes, rng.integers(1, 3), replace=False)] = 1
    return y


@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_multi_hot_rows_match_list_reference(mode):
    classes, size = 4, 7
    memory = CrossBatchMemory(size, 4, start_after=1, multi_hot_classes=classes)
    assert memory.labels.shape == (size, classes)
    enqueue = memory.enqueue
    if mode == "xla":
        enqueue = tf.function(enqueue, jit_compile=True)
    ring = ListRing(size)
    rng = np.random.default_rng(3)
    dtypes = [np.int32, bool, np.float32, np.int64]
    for step in range(6):
        emb, _, ids = stream(step, 3)
        y = multi_hot_rows(rng, 3, classes)
        enqueue(emb, y.astype(dtypes[step % 4]), ids)
        if step >= 1:  # start_after=1: the first batch is not stored
            ring.enqueue(zip(emb, y, ids))
        np.testing.assert_equal(memory.pointer.numpy(), ring.pointer)
        np.testing.assert_equal(memory.filled.numpy(), ring.filled)
        m_emb, m_lab, m_ids, valid = (t.numpy() for t in memory.references())
        assert m_lab.shape == (size, classes) and m_lab.dtype == np.int32
        for slot, row in enumerate(ring.slots):
            if row is None:
                assert not valid[slot] and not m_lab[slot].any()
                continue
            assert valid[slot] and m_ids[slot] == row[2]
            np.testing.assert_array_equal(m_emb[slot], row[0])
            np.testing.assert_array_equal(m_lab[slot], row[1])
    memory.reset()
    assert memory.labels.numpy().shape == (size, classes)
    assert not memory.labels.numpy().any()
    clone = CrossBatchMemory.from_config(memory.get_config())
    assert clone.multi_hot_classes == classes
    assert "multi_hot_classes" not in CrossBatchMemory(5, 4).get_config()


def test_multi_hot_memory_checks_labels():
    memory = CrossBatchMemory(10, 6, multi_hot_classes=3)
    emb, ids = tf.zeros([4, 6]), tf.range(4)
    for bad in (tf.zeros([4], tf.int32), tf.zeros([4, 5])):
        with pytest.raises(ValueError, match="multi_hot_classes=3.*shape"):
            memory.enqueue(emb, bad, ids)
    with pytest.raises(ValueError, match="create it with multi_hot_classes"):
        CrossBatchMemory(10, 6).enqueue(emb, tf.zeros([4, 3]), ids)
    with pytest.raises(ValueError, match="multi_hot_classes"):
        CrossBatchMemory(10, 6, multi_hot_classes=1)


def test_dml_model_step_with_multi_hot_memory_matches_numpy():
    """As the int-label test above, with multi-hot labels: the memory keeps
    the label rows and the loss sees batch + memory relevance by
    intersecting label sets."""
    from tests.models.test_dml_model import dense_encoder
    from tfdml.losses import ContrastiveLoss
    from tfdml.models import DMLModel

    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 5)).astype(np.float32)
    y = multi_hot_rows(rng, 8, 3)
    memory = CrossBatchMemory(20, 6, memory_weight=0.25, multi_hot_classes=3)
    model = DMLModel(dense_encoder(), memory=memory)
    model.compile(
        optimizer=keras.optimizers.SGD(0.0),
        loss=ContrastiveLoss(form="similarity", pos_margin=1.0, neg_margin=0.5),
        jit_compile=True,
    )
    model.train_on_batch(x, y.astype(np.float32))
    m_emb, m_lab, m_ids, m_valid = (t.numpy() for t in memory.references())
    np.testing.assert_array_equal(m_lab[:8], y)
    assert m_valid.sum() == 8
    model.reset_metrics()
    # Other inputs: no anchor meets its own stored copy (similarity 1, a
    # pair loss of ~0 that avg_nonzero would count or not by rounding).
    x2 = rng.normal(size=(8, 5)).astype(np.float32)
    logs = model.train_on_batch(x2, y, return_dict=True)
    emb = model.encoder(x2)["embeddings"].numpy()
    want = xbm_contrastive_reference(
        emb,
        y,
        np.arange(8, 16),
        m_emb,
        m_lab,
        m_ids,
        m_valid,
        0.25,
        "avg_nonzero",
    )
    batch_only = xbm_contrastive_reference(
        emb, y, np.arange(8, 16), m_emb, m_lab, m_ids, m_valid, 0.0, "sum"
    )
    assert np.abs(want - batch_only).max() > 1e-3  # the memory term counts
    np.testing.assert_allclose(logs["loss"], want.mean(), rtol=1e-5)
    np.testing.assert_array_equal(memory.references()[1].numpy()[8:16], y)


# --- drift metric ------------------------------------------------------------


def test_drift_matches_cosine_to_own_stored_copy():
    rng = np.random.default_rng(2)
    memory = CrossBatchMemory(10, 3)
    stored = rng.normal(size=(6, 3)).astype(np.float32)
    memory.enqueue(
        stored, np.zeros(6, np.int32), np.arange(6), keys=[7, 8, 9, 10, 11, 7]
    )
    emb = rng.normal(size=(4, 3)).astype(np.float32)
    keys = np.array([7, 11, 50, -1], np.int32)  # 7 is stored twice
    mean, count = memory.drift(emb, keys)

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    pairs = [
        cos(emb[0], stored[0]),
        cos(emb[0], stored[5]),
        cos(emb[1], stored[4]),
    ]
    np.testing.assert_allclose(mean.numpy(), np.mean(pairs), rtol=1e-6)
    assert count.numpy() == 3
    mean, count = memory.drift(emb[2:], keys[2:])
    assert count.numpy() == 0 and mean.numpy() == 0.0


def test_drift_metric_in_fit_history():
    """``y = {"labels", "example_ids"}``: xbm_drift = mean cos between the
    step's embeddings and the copies stored one step earlier."""
    from tests.models.test_dml_model import dense_encoder
    from tfdml.models import DMLModel

    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 5)).astype(np.float32)
    y = np.array([0, 0, 1, 1, 2, 2, 3, 3], np.int32)
    keys = np.arange(8, dtype=np.int32) + 1000
    model = DMLModel(dense_encoder(), memory=CrossBatchMemory(8, 6))
    model.compile(
        optimizer=keras.optimizers.SGD(0.5), loss=MultiSimilarityLoss()
    )
    model.train_on_batch(x, {"labels": y, "example_ids": keys})
    stored = model.memory.embeddings.numpy().copy()
    np.testing.assert_array_equal(model.memory.keys.numpy(), keys)
    now = model.encoder(x)["embeddings"].numpy()
    model.reset_metrics()
    logs = model.train_on_batch(
        x, {"labels": y, "example_ids": keys}, return_dict=True
    )
    cos = np.sum(now * stored, 1) / (
        np.linalg.norm(now, axis=1) * np.linalg.norm(stored, axis=1)
    )
    assert cos.mean() < 0.9999  # the step moved the embeddings
    np.testing.assert_allclose(logs["xbm_drift"], cos.mean(), rtol=1e-5)
    history = model.fit(
        x,
        {"labels": y, "example_ids": keys},
        batch_size=8,
        epochs=2,
        verbose=0,
    )
    assert len(history.history["xbm_drift"]) == 2
