"""Generic checks shared by the H1 pair-loss tests (not a test module).

Every check compares a tfdml loss with a NumPy float64 reference function
``ref_fn(emb, labels, ref=None, ref_labels=None, ids=None, ref_ids=None,
ref_valid=None) -> [B]`` from ``tests/reference.py``.
"""

import keras
import numpy as np
import tensorflow as tf

from tests.conftest import edge_batches
from tests.conftest import make_batch
from tfdml.losses import References

RTOL = 1e-5
ATOL = 1e-6


def per_anchor_np(loss, emb, labels, **kwargs):
    return loss.per_anchor(
        tf.constant(emb), tf.constant(labels), **kwargs
    ).numpy()


def check_matches_reference(loss, ref_fn, emb, labels, atol=ATOL):
    unreduced = type(loss).from_config({**loss.get_config(), "reduction": None})
    got = unreduced(labels, emb).numpy()
    want = ref_fn(emb, labels)
    assert got.shape == (len(labels),)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=atol)
    reduced = float(loss(labels, emb))
    np.testing.assert_allclose(reduced, want.mean(), rtol=RTOL, atol=atol)
    assert np.all(np.isfinite(got))


def reference_set(seed=3, size=11, dim=8, invalid=(2, 7)):
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(size, dim))
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    ref_labels = rng.integers(0, 4, size=size).astype(np.int32)
    valid = np.ones(size, bool)
    valid[list(invalid)] = False
    return ref.astype(np.float32), ref_labels, valid


def check_reference_set(loss, ref_fn):
    emb, labels = make_batch(5)
    ref, ref_labels, valid = reference_set()
    got = per_anchor_np(
        loss,
        emb,
        labels,
        refs=References(
            tf.constant(ref), tf.constant(ref_labels), valid=tf.constant(valid)
        ),
    )
    want = ref_fn(emb, labels, ref, ref_labels, ref_valid=valid)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    # The batch as its own reference set, self excluded by id, equals the
    # default (reference set = batch).
    ids = np.arange(len(labels), dtype=np.int32)
    got_ids = per_anchor_np(
        loss,
        emb,
        labels,
        refs=References(
            tf.constant(emb), tf.constant(labels), tf.constant(ids)
        ),
        ids=tf.constant(ids),
    )
    np.testing.assert_allclose(
        got_ids, ref_fn(emb, labels), rtol=RTOL, atol=ATOL
    )


def check_gradient_vs_finite_differences(loss, ref_fn, seed=11, eps=1e-5):
    """TF gradient of mean(per_anchor) vs central differences (float64 ref)."""
    emb, labels = make_batch(seed, classes=3, per_class=2, dim=4)
    x = tf.Variable(emb)
    with tf.GradientTape() as tape:
        value = tf.reduce_mean(loss.per_anchor(x, tf.constant(labels)))
    grad = tape.gradient(value, x).numpy()
    e64 = emb.astype(np.float64)
    fd = np.zeros_like(e64)
    for idx in np.ndindex(*e64.shape):
        plus, minus = e64.copy(), e64.copy()
        plus[idx] += eps
        minus[idx] -= eps
        fd[idx] = (
            ref_fn(plus, labels).mean() - ref_fn(minus, labels).mean()
        ) / (2 * eps)
    assert np.all(np.isfinite(grad))
    assert np.abs(fd).max() > 1e-3, "degenerate case: no gradient to compare"
    np.testing.assert_allclose(grad, fd, rtol=2e-3, atol=2e-4)


def check_no_pairs_zero_finite_grad(loss):
    """No valid reference at all (empty memory) and a single-example batch."""
    emb, labels = make_batch(2)
    x = tf.Variable(emb)
    ref, ref_labels, _ = reference_set()
    with tf.GradientTape() as tape:
        per = loss.per_anchor(
            x,
            tf.constant(labels),
            References(
                tf.constant(ref),
                tf.constant(ref_labels),
                valid=tf.zeros([len(ref_labels)], tf.bool),
            ),
        )
        value = tf.reduce_sum(per)
    np.testing.assert_array_equal(per.numpy(), 0.0)
    grad = tape.gradient(value, x)
    assert grad is None or np.all(np.isfinite(grad.numpy()))
    x1 = tf.Variable(emb[:1])
    with tf.GradientTape() as tape:
        value = loss(labels[:1], x1)
    assert float(value) == 0.0
    grad = tape.gradient(value, x1)
    assert grad is None or np.all(np.isfinite(grad.numpy()))


def check_xla_matches_eager(loss):
    emb, labels = make_batch(4)
    ref, ref_labels, valid = reference_set()

    def fn(e, y, r, ry, v):
        with tf.GradientTape() as tape:
            tape.watch(e)
            per = loss.per_anchor(e, y, References(r, ry, valid=v))
            total = tf.reduce_mean(per) + tf.reduce_mean(loss.per_anchor(e, y))
        return total, tape.gradient(total, e)

    args = [tf.constant(a) for a in (emb, labels, ref, ref_labels, valid)]
    eager = fn(*args)
    xla = tf.function(fn, jit_compile=True)(*args)
    for a, b in zip(eager, xla):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def check_model_fit_smoke(loss):
    emb, labels = make_batch(6, dim=6)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit(emb, labels, batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    after = [w.numpy() for w in model.trainable_weights]
    assert any(not np.allclose(a, b) for a, b in zip(before, after))


def check_float16_close(loss, atol=2e-2):
    emb, labels = make_batch(8)
    full = loss.per_anchor(tf.constant(emb), tf.constant(labels)).numpy()
    half = loss.per_anchor(
        tf.constant(emb.astype(np.float16)), tf.constant(labels)
    ).numpy()
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, full, rtol=2e-2, atol=atol)


def check_bad_inputs(loss):
    emb, labels = make_batch(0)
    bad = [
        (np.stack([labels, labels], 1), emb, "labels"),
        (labels, emb[None], "embeddings"),
        (labels.astype(str), emb, "labels"),
        (labels, emb.astype(np.int32), "embeddings"),
    ]
    for y, x, word in bad:
        try:
            loss(y, x)
        except ValueError as e:
            assert word in str(e)
        else:
            raise AssertionError(f"no ValueError for bad {word}")


def check_sample_weight(loss):
    emb, labels = make_batch(9)
    w = np.linspace(0.0, 2.0, len(labels)).astype(np.float32)
    per = (
        type(loss)
        .from_config({**loss.get_config(), "reduction": None})(labels, emb)
        .numpy()
    )
    got = float(loss(labels, emb, sample_weight=w))
    np.testing.assert_allclose(got, (per * w).mean(), rtol=1e-5, atol=1e-6)


EDGE_NAMES = tuple(edge_batches())  # "seeded", "duplicates", ...


def case_batch_params(cases, full=()):
    """(case, batch) pairs: every case on the seeded and duplicate batches,
    the cases in ``full`` on every edge batch (keeps the suite fast)."""
    pairs = []
    for case in cases:
        names = EDGE_NAMES if case in full else ("seeded", "duplicates")
        pairs += [(case, name) for name in names]
    return pairs


def ids(pairs):
    return [f"{a}-{b}" for a, b in pairs]
