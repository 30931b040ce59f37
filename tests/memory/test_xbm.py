"""CrossBatchMemory against a Python-list ring buffer and brute-force loss."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import reference
from tfdml.losses import MultiSimilarityLoss
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
    assert len(memory.non_trainable_variables) == 6
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
        np.concatenate([emb, m_emb]),
        np.concatenate([labels_pool, m_lab]),
        ids,
        np.concatenate([ids, m_ids]),
        np.concatenate([np.ones(batch, bool), m_valid]),
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
        emb, labels_pool, ref, ref_labels, ids, ref_ids
    ).numpy()
    np.testing.assert_allclose(got, plain, rtol=1e-6, atol=1e-7)
    if fill_steps:
        assert int(m_valid.sum()) == min((fill_steps + 1) * batch, size)
        assert np.abs(want).sum() > 0
