"""ClassDictionary (MMSI per-class FIFO) against a plain-Python reference."""

import numpy as np
import pytest
import tensorflow as tf

from tfdml.memory import ClassDictionary


class RefDict:
    """The official structure: dict class -> list, FIFO cap, insertion
    order of classes (Python dict order)."""

    def __init__(self, num_classes, d_size):
        self.c, self.k = num_classes, d_size
        self.store = {}

    def enqueue(self, feats, labels):
        for f, y in zip(feats, labels):
            if not 0 <= y < self.c:
                continue
            self.store.setdefault(int(y), []).append(np.array(f))
            if len(self.store[int(y)]) > self.k:
                self.store[int(y)].pop(0)

    def entries(self):
        feats, labels = [], []
        for y, rows in self.store.items():
            feats.extend(rows)
            labels.extend([y] * len(rows))
        return np.array(feats).reshape(-1, 3), np.array(labels)


def _stream(seed, steps=6, n=7, c=5):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        labels = rng.integers(-1, c + 1, size=n).astype(np.int32)  # some OOR
        yield rng.normal(size=(n, 3)).astype(np.float32), labels


@pytest.mark.parametrize("d_size", [1, 2, 3])
def test_fifo_and_insertion_order_match_reference(d_size):
    dic = ClassDictionary(5, 3, d_size)
    ref = RefDict(5, d_size)
    for feats, labels in _stream(d_size):
        dic.enqueue(feats, labels)
        ref.enqueue(feats, labels)
        f, y, v = (t.numpy() for t in dic.entries(order="insertion"))
        rf, ry = ref.entries()
        np.testing.assert_array_equal(y[v], ry)
        np.testing.assert_allclose(f[v], rf)
        assert int(dic.num_classes_seen()) == len(ref.store)
        # Slot order: class-major by id; same multiset per class.
        f2, y2, v2 = (t.numpy() for t in dic.entries())
        assert f2.shape == (5 * d_size, 3)
        np.testing.assert_array_equal(y2, np.repeat(np.arange(5), d_size))
        for c in range(5):
            got = f2[v2 & (y2 == c)]
            want = rf[ry == c]
            assert len(got) == len(want) <= d_size
            np.testing.assert_allclose(
                np.sort(got, axis=0), np.sort(want, axis=0)
            )


def test_batch_larger_than_capacity_keeps_newest():
    dic = ClassDictionary(2, 1, 2)
    feats = np.arange(5, dtype=np.float32)[:, None]
    dic.enqueue(feats, np.zeros(5, np.int32))
    f, y, v = (t.numpy() for t in dic.entries(order="insertion"))
    np.testing.assert_array_equal(f[v][:, 0], [3.0, 4.0])
    np.testing.assert_array_equal(v, [True, True, False, False])
    assert int(dic.num_classes_seen()) == 1


def test_gate_counts_classes_and_xla_matches_eager():
    eager = ClassDictionary(4, 3, 2)
    xla = ClassDictionary(4, 3, 2)

    @tf.function(jit_compile=True)
    def step(feats, labels):
        xla.enqueue(feats, labels)
        return xla.num_classes_seen()

    seen = []
    for feats, labels in _stream(3, steps=5, n=3, c=4):
        eager.enqueue(feats, labels)
        seen.append(int(step(feats, labels)))
        assert seen[-1] == int(eager.num_classes_seen())
        for a, b in zip(eager.entries("insertion"), xla.entries("insertion")):
            np.testing.assert_allclose(a.numpy(), b.numpy())
    assert seen == sorted(seen) and seen[-1] <= 4 and seen[0] < seen[-1]


def test_reset_and_bad_arguments():
    dic = ClassDictionary(3, 2, 1)
    dic.enqueue(np.ones((2, 2), np.float32), np.array([0, 2]))
    assert int(dic.num_classes_seen()) == 2
    dic.reset()
    assert int(dic.num_classes_seen()) == 0
    assert not dic.entries()[2].numpy().any()
    with pytest.raises(ValueError, match="d_size"):
        ClassDictionary(3, 2, 0)
    with pytest.raises(ValueError, match="num_classes"):
        ClassDictionary(0, 2, 1)
    with pytest.raises(ValueError, match="features"):
        dic.enqueue(np.ones((2, 5), np.float32), np.array([0, 1]))
    with pytest.raises(ValueError, match="order"):
        dic.entries(order="random")
    cfg = dic.get_config()
    assert ClassDictionary.from_config(cfg).d_size == 1
