"""SupConLoss and NTXentLoss vs the NumPy float64 references."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import reference_contrastive_family as ref
from tests.conftest import edge_batches
from tests.conftest import make_batch
from tests.losses import pair_loss_checks as checks
from tfdml import registry
from tfdml.losses import NTXentLoss
from tfdml.losses import PairLoss
from tfdml.losses import References
from tfdml.losses import SupConLoss
from tfdml.memory import CrossBatchMemory

RTOL = 1e-5
ATOL = 1e-6

LOSSES = {
    "supcon": (SupConLoss, ref.supcon),
    "nt_xent": (NTXentLoss, ref.nt_xent),
}


def build(kind, **kw):
    cls, ref_fn = LOSSES[kind]
    loss = cls(**kw)
    temperature = loss.temperature
    exclude = loss.exclude_anchors_without_positives

    def fn(emb, labels, r=None, r_labels=None, **more):
        more.setdefault("temperature", temperature)
        more.setdefault("exclude", exclude)
        return ref_fn(emb, labels, r, r_labels, **more)

    return loss, fn


def per_anchor(loss, emb, labels, **kw):
    return loss.per_anchor(tf.constant(emb), tf.constant(labels), **kw).numpy()


@pytest.mark.parametrize("kind", sorted(LOSSES))
@pytest.mark.parametrize("temperature", [None, 0.2, 1.0])
@pytest.mark.parametrize("exclude", [True, False])
@pytest.mark.parametrize("seed", [0, 3])
def test_matches_reference(kind, temperature, exclude, seed):
    kw = {"exclude_anchors_without_positives": exclude}
    if temperature is not None:
        kw["temperature"] = temperature
    loss, fn = build(kind, **kw)
    emb, labels = make_batch(seed)
    labels = labels.copy()
    labels[-1] = 9  # a singleton: an anchor without positives
    want = fn(emb, labels)
    assert want[-1] == 0.0 and np.all(want[:-1] > 0)
    checks.check_matches_reference(loss, fn, emb, labels)


def test_defaults_and_mean_over_anchors_with_positives():
    assert SupConLoss().temperature == 0.1
    assert NTXentLoss().temperature == 0.5
    emb, labels = make_batch(0)
    labels = labels.copy()
    labels[:2] = [7, 8]  # two anchors without positives
    for kind in LOSSES:
        plain, _ = build(kind, exclude_anchors_without_positives=False)
        raw = per_anchor(plain, emb, labels)
        assert np.all(raw[:2] == 0)
        got = float(build(kind)[0](labels, emb))
        np.testing.assert_allclose(got, raw[2:].mean(), rtol=RTOL)
        np.testing.assert_allclose(
            float(plain(labels, emb)), raw.mean(), rtol=RTOL
        )


def test_one_positive_per_anchor_nt_xent_equals_supcon():
    """SimCLR's two views: the two losses coincide at the same τ."""
    emb, _ = make_batch(2, classes=8, per_class=2)
    labels = np.repeat(np.arange(8), 2).astype(np.int32)
    a = per_anchor(SupConLoss(temperature=0.5), emb, labels)
    b = per_anchor(NTXentLoss(temperature=0.5), emb, labels)
    np.testing.assert_allclose(a, b, rtol=RTOL)
    # ... and differ as soon as an anchor has two positives.
    labels3 = np.repeat(np.arange(4), 4).astype(np.int32)
    a = per_anchor(SupConLoss(temperature=0.5), emb, labels3)
    b = per_anchor(NTXentLoss(temperature=0.5), emb, labels3)
    assert not np.allclose(a, b)


@pytest.mark.parametrize("kind", sorted(LOSSES))
@pytest.mark.parametrize("name", sorted(edge_batches()))
def test_edge_batches(kind, name):
    emb, labels = edge_batches()[name]
    loss, fn = build(kind)
    x = tf.Variable(emb)
    with tf.GradientTape() as tape:
        per = loss.per_anchor(x, tf.constant(labels))
        total = tf.reduce_mean(per)
    grad = tape.gradient(total, x)
    np.testing.assert_allclose(
        per.numpy(), fn(emb, labels), rtol=RTOL, atol=ATOL
    )
    assert np.all(np.isfinite(grad.numpy()))
    if name == "all_singletons":
        assert float(total) == 0.0
    if name == "one_class":
        # No negatives: NT-Xent is 0; SupCon is log Σ_P exp(z) - mean_P z.
        assert (float(total) == 0.0) == (kind == "nt_xent")


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_reference_set_and_self_by_id(kind):
    checks.check_reference_set(*build(kind))


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_reference_set_of_another_size_with_the_anchor_inside(kind):
    loss, fn = build(kind)
    emb, labels = make_batch(0, classes=4, per_class=3)
    bank, bank_labels = make_batch(5, classes=5, per_class=4)
    ids = np.arange(12)
    bank_ids = np.arange(100, 120)
    bank_ids[0] = 0  # anchor 0 itself is in the bank: never a positive
    bank[0] = emb[0]
    bank_labels[0] = labels[0]
    refs = References(bank, bank_labels, ids=bank_ids)
    got = loss.per_anchor(emb, labels, refs, ids=ids).numpy()
    want = fn(emb, labels, bank, bank_labels, ids=ids, ref_ids=bank_ids)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_pair_weights(kind):
    loss, fn = build(kind)
    emb, labels = make_batch(4)
    rng = np.random.default_rng(0)
    w = rng.uniform(0.2, 2.0, size=(len(labels), len(labels)))
    w[rng.random(w.shape) < 0.2] = 0.0  # some pairs left out
    w = w.astype(np.float32)
    got = per_anchor(loss, emb, labels, pair_weights=tf.constant(w))
    want = fn(emb, labels, pair_weights=w)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert not np.allclose(want, fn(emb, labels))
    ones = per_anchor(loss, emb, labels, pair_weights=tf.ones_like(w))
    np.testing.assert_allclose(ones, fn(emb, labels), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", sorted(LOSSES))
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_gradient_vs_finite_differences(kind, temperature):
    loss, fn = build(kind, temperature=temperature)
    checks.check_gradient_vs_finite_differences(loss, fn)


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_eager_tf_function_xla(kind):
    loss, _ = build(kind)
    checks.check_xla_matches_eager(loss)
    emb, labels = make_batch(1)
    eager = per_anchor(loss, emb, labels)
    graph = tf.function(loss.per_anchor)(emb, labels).numpy()
    np.testing.assert_allclose(graph, eager, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_no_pairs_gives_zero_with_finite_gradient(kind):
    checks.check_no_pairs_zero_finite_grad(build(kind)[0])


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_empty_batch_nan_and_bad_inputs(kind):
    loss, _ = build(kind)
    empty = loss(np.zeros([0], np.int32), np.zeros([0, 4], np.float32))
    assert float(empty) == 0.0
    emb, labels = make_batch(0)
    emb = emb.copy()
    emb[3, 1] = np.nan
    assert np.all(np.isnan(per_anchor(loss, emb, labels)))
    checks.check_bad_inputs(loss)
    checks.check_sample_weight(loss)
    checks.check_float16_close(loss, atol=5e-2)
    for bad in (0.0, -0.1, None):
        with pytest.raises(ValueError, match="temperature"):
            type(loss)(temperature=bad)


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_registry_config_round_trip(kind):
    cls = LOSSES[kind][0]
    loss = cls(temperature=0.3, exclude_anchors_without_positives=False)
    config = loss.get_config()
    again = cls.from_config(config)
    assert again.get_config() == config
    assert registry.registered(PairLoss)[cls.__name__] is cls
    built = registry.build(PairLoss, {"name": cls.__name__, "temperature": 0.3})
    assert built.temperature == 0.3
    spec = keras.saving.serialize_keras_object(loss)
    assert spec["registered_name"] == f"tfdml>{cls.__name__}"
    emb, labels = make_batch(0)
    np.testing.assert_allclose(
        float(keras.saving.deserialize_keras_object(spec)(labels, emb)),
        float(loss(labels, emb)),
        rtol=1e-6,
    )


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_keras_fit_smoke(kind):
    checks.check_model_fit_smoke(build(kind)[0])


@pytest.mark.parametrize("kind", sorted(LOSSES))
@pytest.mark.parametrize("with_memory", [False, True], ids=["batch", "xbm"])
def test_dml_model_step_matches_reference(kind, with_memory):
    """DMLModel's train step (SGD(0)) == the reference on the model's own
    embeddings, against the batch and, with XBM, the memory rows too."""
    from tests.models.test_dml_model import data
    from tests.models.test_dml_model import dense_encoder
    from tfdml.models import DMLModel

    loss, fn = build(kind)
    x, y = data(12)
    memory = CrossBatchMemory(10, 6) if with_memory else None
    model = DMLModel(dense_encoder(), memory=memory)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=loss)
    if with_memory:  # fill the memory with other labels' rows
        model.train_on_batch(x[::-1], y[::-1])
        model.train_on_batch(x, (y + 1) % 4)
    seen = int(model.examples_seen.numpy())
    ids = np.arange(seen, seen + len(y))
    emb = model.encoder(x)["embeddings"].numpy()
    refs, ref_labels, ref_ids = emb, y, ids
    if with_memory:
        m_emb, m_lab, m_ids, m_valid = (t.numpy() for t in memory.references())
        assert m_valid.all()
        refs = np.concatenate([emb, m_emb])
        ref_labels = np.concatenate([y, m_lab])
        ref_ids = np.concatenate([ids, m_ids])
    want = fn(emb, y, refs, ref_labels, ids=ids, ref_ids=ref_ids).mean()
    model.reset_metrics()
    logs = model.train_on_batch(x, y, return_dict=True)
    np.testing.assert_allclose(logs["loss"], want, rtol=1e-5)
    assert want > 0
    # A real fit step moves the weights and stays finite.
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
    hist = model.fit(x, y, batch_size=6, epochs=1, verbose=0, shuffle=False)
    assert np.isfinite(hist.history["loss"][0])
