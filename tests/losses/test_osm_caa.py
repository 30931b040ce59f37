"""WeightedContrastiveLoss (OSM + CAA) vs NumPy float64 references."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import reference_weighting as refw
from tests.conftest import edge_batches
from tests.conftest import make_batch
from tfdml import ops
from tfdml.losses import References
from tfdml.losses import WeightedContrastiveLoss
from tfdml.losses import weighted_contrastive

FIXTURE = (
    np.array([(1, 0), (0.8, 0.6), (0, 1), (-0.6, 0.8)], np.float32),
    np.array([0, 0, 1, 1], np.int32),
)


def probs_for(n, seed=0):
    return np.random.default_rng(seed).uniform(0.05, 1.0, n).astype(np.float32)


@pytest.mark.parametrize(
    "official_code, want", [(False, 0.123344), (True, 0.020557)]
)
def test_closed_form_fixture(official_code, want):
    f, y = FIXTURE
    loss = WeightedContrastiveLoss(official_code=official_code)
    # a_i all equal: CAA is a no-op; equal probs give equal a_i
    got = loss.per_anchor(f, y, probs=np.full(4, 0.7, np.float32))
    np.testing.assert_allclose(float(tf.reduce_mean(got)), want, atol=5e-7)
    got_no_caa = WeightedContrastiveLoss(
        official_code=official_code, use_caa=False
    )(y, f)
    np.testing.assert_allclose(float(got_no_caa), want, atol=5e-7)
    ref_loss, _, _ = refw.weighted_contrastive(
        f, y, use_caa=False, official_code=official_code
    )
    np.testing.assert_allclose(ref_loss, want, atol=5e-7)


@pytest.mark.parametrize("official_code", [False, True])
@pytest.mark.parametrize("lambda_", [0.5, 0.3])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_and_per_anchor_split(official_code, lambda_, seed):
    emb, labels = make_batch(seed)
    probs = probs_for(16, seed)
    loss = WeightedContrastiveLoss(official_code=official_code, lambda_=lambda_)
    per = loss.per_anchor(emb, labels, probs=probs).numpy()
    want, rows, _ = refw.weighted_contrastive(
        emb, labels, probs, lambda_=lambda_, official_code=official_code
    )
    np.testing.assert_allclose(per.mean(), want, rtol=1e-5)
    # per-anchor reading: each pair's contribution split between its two
    # members, times B.
    a = refw.gaussian_pdf(probs.astype(np.float64), 1.0, 0.68)
    zp = sum(r[4] for r in rows if r[3])
    zn = sum(r[4] for r in rows if not r[3])
    share = np.zeros(16)
    for i, j, d, y, w in rows:
        c = (
            (1 - lambda_) * 0.5 * w * d**2 / zp
            if y
            else lambda_ * 0.5 * w * max(0, 1.2 - d) ** 2 / zn
        )
        if official_code:
            c /= len(rows)
        share[i] += c / 2
        share[j] += c / 2
    assert a.std() > 0
    np.testing.assert_allclose(per, 16 * share, rtol=1e-4, atol=1e-7)


def test_keras_dict_y_pred_uses_softmax_of_logits():
    emb, labels = make_batch(2)
    logits = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    p = tf.nn.softmax(logits).numpy()[np.arange(16), labels]
    loss = WeightedContrastiveLoss()
    got = loss(labels, {"embeddings": emb, "logits": logits})
    want = refw.weighted_contrastive(emb, labels, p)[0]
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    x = tf.Variable(logits)
    with tf.GradientTape() as tape:
        value = loss(labels, {"embeddings": emb, "logits": x})
    assert tape.gradient(value, x) is None  # p carries no gradient


@pytest.mark.parametrize("official_code", [False, True])
def test_gradient_is_the_caffe_backward(official_code):
    emb, labels = make_batch(3, classes=3, per_class=3, dim=4)
    probs = probs_for(9, 3)
    x = tf.Variable(emb)
    loss = WeightedContrastiveLoss(official_code=True, normalize=False)
    with tf.GradientTape() as tape:
        total = tf.reduce_mean(loss.per_anchor(x, labels, probs=probs))
    got = tape.gradient(total, x).numpy()
    want = refw.weighted_contrastive_grad(emb, labels, probs)
    assert np.abs(want).max() > 1e-4
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    # with normalize=True the gradient is projected by the L2-norm Jacobian
    x2 = tf.Variable(emb)
    loss_n = WeightedContrastiveLoss(official_code=official_code)
    with tf.GradientTape() as tape:
        total = tf.reduce_mean(loss_n.per_anchor(x2, labels, probs=probs))
    g2 = tape.gradient(total, x2).numpy()
    scale = 1.0 if official_code else 36.0  # P = 9*8/2 pairs
    proj = want - (want * emb).sum(1, keepdims=True) * emb
    np.testing.assert_allclose(g2, scale * proj, rtol=1e-3, atol=1e-6)


def test_gradient_finite_differences_unnormalised():
    emb, labels = make_batch(4, classes=2, per_class=3, dim=3)
    emb = emb * np.linspace(0.5, 1.5, 6)[:, None].astype(np.float32)
    probs = probs_for(6, 4)
    x = tf.Variable(emb)
    loss = WeightedContrastiveLoss(normalize=False)
    with tf.GradientTape() as tape:
        total = tf.reduce_mean(loss.per_anchor(x, labels, probs=probs))
    got = tape.gradient(total, x).numpy()
    # FD of the loss with the weights frozen at emb (they are constants)
    _, rows0, w_hat = refw.weighted_contrastive(emb, labels, probs)

    def frozen(e):
        out = 0.0
        for (i, j, _, y, _), w in zip(rows0, w_hat):
            d = np.linalg.norm(e[i] - e[j])
            out += w * (0.5 * d**2 if y else 0.5 * max(0, 1.2 - d) ** 2)
        return out

    want = refw.numeric_grad(frozen, emb)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_caa_invariance_to_scaling():
    emb, labels = make_batch(5)
    dist = ops.pairwise_distance(emb)
    pos, neg = ops.pair_masks(labels)
    a = refw.gaussian_pdf(probs_for(16, 5).astype(np.float64), 1.0, 0.68)
    att = np.minimum(a[:, None], a[None]).astype(np.float32)
    for official in (False, True):
        base = weighted_contrastive(dist, pos, neg, att, official_code=official)
        scaled = weighted_contrastive(
            dist, pos, neg, 7.5 * att, official_code=official, multiplicity=2.0
        )
        base_s = weighted_contrastive(
            dist, pos, neg, att, official_code=official, multiplicity=2.0
        )
        np.testing.assert_allclose(scaled.numpy(), base_s.numpy(), rtol=1e-5)
        plain = weighted_contrastive(
            dist, pos, neg, None, official_code=official, multiplicity=2.0
        )
        assert not np.allclose(plain.numpy(), base_s.numpy())
        assert base.shape == (16,)


def test_constant_probs_make_caa_a_no_op():
    emb, labels = make_batch(6)
    a = WeightedContrastiveLoss().per_anchor(
        emb, labels, probs=np.full(16, 0.3, np.float32)
    )
    b = WeightedContrastiveLoss(use_caa=False).per_anchor(emb, labels)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5)


@pytest.mark.parametrize("name", sorted(edge_batches()))
def test_edge_batches(name):
    emb, labels = edge_batches()[name]
    probs = probs_for(len(labels), 1)
    x = tf.Variable(emb)
    loss = WeightedContrastiveLoss()
    with tf.GradientTape() as tape:
        per = loss.per_anchor(x, labels, probs=probs)
        total = tf.reduce_mean(per)
    grad = tape.gradient(total, x).numpy()
    assert np.all(np.isfinite(grad)) and np.all(np.isfinite(per.numpy()))
    want = refw.weighted_contrastive(emb, labels, probs)[0]
    np.testing.assert_allclose(float(total), want, rtol=1e-5, atol=1e-7)


def test_reference_set_of_another_size():
    emb, labels = make_batch(0, classes=3, per_class=3)
    bank, bank_labels = make_batch(7, classes=4, per_class=3)
    p, q = probs_for(9, 0), probs_for(12, 1)
    loss = WeightedContrastiveLoss(official_code=True)
    per = loss.per_anchor(
        emb, labels, References(bank, bank_labels), probs=p, ref_probs=q
    ).numpy()
    # every (anchor, reference) pair listed once
    a = refw.gaussian_pdf(p.astype(np.float64), 1.0, 0.68)
    b = refw.gaussian_pdf(q.astype(np.float64), 1.0, 0.68)
    rows = []
    for i in range(9):
        for j in range(12):
            d = np.linalg.norm(emb[i].astype(np.float64) - bank[j])
            y = labels[i] == bank_labels[j]
            s = np.exp(-(d**2) / 1.28) if y else max(0, 1.2 - d)
            rows.append((i, d, y, s * min(a[i], b[j])))
    zp = sum(r[3] for r in rows if r[2])
    zn = sum(r[3] for r in rows if not r[2])
    want = np.zeros(9)
    for i, d, y, w in rows:
        c = 0.25 * w * d**2 / zp if y else 0.25 * w * max(0, 1.2 - d) ** 2 / zn
        want[i] += 9 * c / len(rows)
    np.testing.assert_allclose(per, want, rtol=1e-4, atol=1e-8)
    with pytest.raises(ValueError, match="ref_probs"):
        loss.per_anchor(emb, labels, References(bank, bank_labels), probs=p)


@pytest.mark.parametrize("official_code", [False, True])
def test_dml_model_style_references(official_code):
    # DMLModel passes the batch (with ids) plus memory rows as references.
    emb, labels = make_batch(0, classes=3, per_class=3)
    bank, bank_labels = make_batch(7, classes=4, per_class=3)
    p, q = probs_for(9, 0), probs_for(12, 1)
    ids = np.arange(9)
    loss = WeightedContrastiveLoss(official_code=official_code)
    alone = loss.per_anchor(emb, labels, probs=p).numpy()
    same = loss.per_anchor(
        emb, labels, References(emb, labels, ids), ids, probs=p, ref_probs=p
    ).numpy()
    np.testing.assert_allclose(same, alone, rtol=1e-5, atol=1e-8)
    both = loss.per_anchor(
        emb,
        labels,
        References(
            np.concatenate([emb, bank]),
            np.concatenate([labels, bank_labels]),
            np.concatenate([ids, 100 + np.arange(12)]),
        ),
        ids,
        probs=p,
        ref_probs=np.concatenate([p, q]),
    ).numpy()
    # reference: unordered in-batch pairs once, plus (anchor, bank) pairs
    a = refw.gaussian_pdf(p.astype(np.float64), 1.0, 0.68)
    b = refw.gaussian_pdf(q.astype(np.float64), 1.0, 0.68)
    rows = []
    for i in range(9):
        for j in range(i + 1, 9):
            d = np.linalg.norm(emb[i].astype(np.float64) - emb[j])
            rows.append((i, j, d, labels[i] == labels[j], min(a[i], a[j])))
        for j in range(12):
            d = np.linalg.norm(emb[i].astype(np.float64) - bank[j])
            y = labels[i] == bank_labels[j]
            rows.append((i, None, d, y, min(a[i], b[j])))
    ws = [
        (np.exp(-(d**2) / 1.28) if y else max(0, 1.2 - d)) * att
        for (_, _, d, y, att) in rows
    ]
    zp = sum(w for w, r in zip(ws, rows) if r[3])
    zn = sum(w for w, r in zip(ws, rows) if not r[3])
    want = np.zeros(9)
    for (i, j, d, y, _), w in zip(rows, ws):
        c = 0.25 * w * d**2 / zp if y else 0.25 * w * max(0, 1.2 - d) ** 2 / zn
        if official_code:
            c /= len(rows)
        if j is None:
            want[i] += 9 * c
        else:
            want[i] += 9 * c / 2
            want[j] += 9 * c / 2
    np.testing.assert_allclose(both, want, rtol=1e-4, atol=1e-8)


def test_xla_equals_eager():
    emb, labels = make_batch(1)
    probs = probs_for(16)
    loss = WeightedContrastiveLoss()

    def f(e, y, p):
        return loss.per_anchor(e, y, probs=p)

    eager = f(emb, labels, probs)
    xla = tf.function(f, jit_compile=True)(emb, labels, probs)
    np.testing.assert_allclose(xla.numpy(), eager.numpy(), rtol=1e-5, atol=1e-7)


def test_fit_two_output_model():
    # Keras broadcasts a single loss to every output of a dict-output model,
    # so the {"embeddings", "logits"} dict is nested one level ("metric") to
    # reach the loss whole; the logits also get their own cross-entropy.
    emb, labels = make_batch(0, classes=4, per_class=8, dim=6)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(16, activation="relu")(inputs)
    e = keras.layers.UnitNormalization()(keras.layers.Dense(8)(h))
    logits = keras.layers.Dense(4)(h)
    model = keras.Model(
        inputs,
        {"metric": {"embeddings": e, "logits": logits}, "logits": logits},
    )
    model.compile(
        keras.optimizers.SGD(0.5),
        loss={
            "metric": WeightedContrastiveLoss(),
            "logits": keras.losses.SparseCategoricalCrossentropy(
                from_logits=True
            ),
        },
    )
    y = {"metric": labels, "logits": labels}
    hist = model.fit(emb, y, batch_size=32, epochs=4, verbose=0)
    losses = hist.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    out = model(emb)["metric"]
    p = tf.nn.softmax(out["logits"]).numpy()[np.arange(32), labels]
    want = refw.weighted_contrastive(out["embeddings"].numpy(), labels, p)[0]
    got = WeightedContrastiveLoss()(labels, out)
    np.testing.assert_allclose(float(got), want, rtol=1e-4)


def test_config_round_trip():
    loss = WeightedContrastiveLoss(
        margin=1.0,
        sigma=0.5,
        lambda_=0.4,
        caa_sigma=0.5,
        caa_combine="product",
        official_code=True,
    )
    again = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(loss)
    )
    assert again.get_config() == loss.get_config()


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"margin": 0}, "margin"),
        ({"sigma": -1}, "sigma"),
        ({"lambda_": 1.5}, "lambda_"),
        ({"caa_sigma": 0}, "sigma"),
        ({"caa_combine": "max"}, "combine"),
    ],
)
def test_bad_hyper_parameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        WeightedContrastiveLoss(**kwargs)


def test_bad_inputs():
    emb, labels = make_batch(0)
    with pytest.raises(ValueError, match="probs"):
        WeightedContrastiveLoss()(labels, emb)
    with pytest.raises(ValueError, match="embeddings"):
        WeightedContrastiveLoss()(labels, {"logits": emb})


# -- the official Gaussian-weighted cross-entropy (WeightedSoftmaxWithLoss) --


def gaussian_ce_reference(labels, logits, sample_weight=None, mu=0.5, s=0.18):
    """NumPy float64, literally: u_i = N(p_i; mu, s) of the true-class
    softmax probability (constant), L1-normalised over the batch (times the
    sample weights), loss = -sum_i u_i log p_i; and d loss / d logits."""
    z = np.asarray(logits, np.float64)
    y = np.asarray(labels)
    z = z - z.max(axis=1, keepdims=True)
    soft = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    n = len(y)
    p = soft[np.arange(n), y]
    u = np.exp(-((p - mu) ** 2) / (2 * s * s)) / (s * np.sqrt(2 * np.pi))
    if sample_weight is not None:
        u = u * np.asarray(sample_weight, np.float64)
    u = u / max(u.sum(), 1e-12)
    loss = -(u * np.log(p)).sum()
    onehot = np.zeros_like(soft)
    onehot[np.arange(n), y] = 1.0
    grad = u[:, None] * (soft - onehot)
    return loss, grad


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("weighted", [False, True])
def test_gaussian_weighted_ce_matches_reference(seed, weighted):
    from tfdml.losses.osm_caa import gaussian_weighted_cross_entropy

    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(12, 5)).astype(np.float32)
    labels = rng.integers(0, 5, 12).astype(np.int32)
    sw = rng.uniform(0.2, 1.0, 12).astype(np.float32) if weighted else None
    want, want_grad = gaussian_ce_reference(labels, logits, sw)
    z = tf.constant(logits)
    with tf.GradientTape() as tape:
        tape.watch(z)
        got = gaussian_weighted_cross_entropy(labels, z, sample_weight=sw)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    np.testing.assert_allclose(
        tape.gradient(got, z).numpy(), want_grad, rtol=1e-4, atol=1e-7
    )
    # other Gaussian parameters
    want2, _ = gaussian_ce_reference(labels, logits, sw, mu=1.0, s=0.68)
    got2 = gaussian_weighted_cross_entropy(
        labels, z, sample_weight=sw, mu=1.0, sigma=0.68
    )
    np.testing.assert_allclose(float(got2), want2, rtol=1e-5)


def test_gaussian_weighted_ce_down_weights_confident_and_hopeless():
    from tfdml.losses.osm_caa import gaussian_weighted_cross_entropy

    # p = 0.5 gets the largest weight; p near 0 and near 1 little
    logits = np.log(
        np.array([[0.5, 0.5], [0.98, 0.02], [0.02, 0.98]], np.float32)
    )
    labels = np.zeros(3, np.int32)
    want, grad = gaussian_ce_reference(labels, logits)
    got = gaussian_weighted_cross_entropy(labels, logits)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    assert np.abs(grad[0]).sum() > 10 * np.abs(grad[1:]).sum()


def _head_encoder(classes=4, d=6):
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    h = keras.layers.Dense(16, activation="tanh")(inp)
    raw = keras.layers.Dense(d)(h)
    emb = keras.layers.UnitNormalization()(raw)
    logits = keras.layers.Dense(classes)(h)
    return keras.Model(inp, {"embeddings": emb, "raw": raw, "logits": logits})


def test_dml_model_classification_loss_switch():
    from tfdml.models import DMLModel

    enc = _head_encoder()
    x, labels = make_batch(3, classes=4, per_class=3, dim=6)
    logits = enc(x)["logits"].numpy()
    plain = DMLModel(enc, classification_loss_weight=1.0)
    gauss = DMLModel(
        enc,
        classification_loss_weight=1.0,
        classification_loss="gaussian_weighted",
    )
    batch = {"labels": tf.constant(labels), "logits": tf.constant(logits)}
    want, _ = gaussian_ce_reference(labels, logits)
    np.testing.assert_allclose(
        float(gauss.classification_loss(batch)), want, rtol=1e-5
    )
    ce = keras.losses.sparse_categorical_crossentropy(
        labels, logits, from_logits=True
    )
    np.testing.assert_allclose(
        float(plain.classification_loss(batch)), float(np.mean(ce)), rtol=1e-5
    )
    assert gauss.get_config()["classification_loss"] == "gaussian_weighted"
    with pytest.raises(ValueError, match="classification_loss"):
        DMLModel(enc, classification_loss="focal")
    # the switch trains end to end with the OSM + CAA loss
    gauss.compile(keras.optimizers.SGD(0.1), loss=WeightedContrastiveLoss())
    hist = gauss.fit(x, labels, batch_size=12, epochs=2, verbose=0).history
    assert np.all(np.isfinite(hist["classification_loss"]))


def test_osm_caa_configs_isolate_each_part():
    import glob
    import os

    from tfdml.training import build as build_lib
    from tfdml.training import config as config_lib

    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    rows = {}
    for path in sorted(
        glob.glob(os.path.join(root, "configs", "osm_caa*.yaml"))
    ):
        cfg = config_lib.load(path)
        build_lib.validate_objects(cfg)
        rows[os.path.basename(path)] = (
            cfg["loss"].get("use_caa", True),
            cfg["train"]["classification_loss_weight"],
            cfg["train"]["classification_loss"],
            cfg["model"]["classification_head"],
        )
    for ds in ("cjk", "cub", "cars", "sop"):
        # the default OSM + CAA row: no CE gradient on the backbone
        assert rows[f"osm_caa_{ds}.yaml"][:2] == (True, 0.0), rows
    assert rows["osm_caa_osm_alone_cjk.yaml"] == (
        False,
        0.0,
        "sparse_ce",
        False,
    )
    assert rows["osm_caa_ce_cjk.yaml"] == (True, 1.0, "sparse_ce", True)
    assert rows["osm_caa_gce_cjk.yaml"] == (
        True,
        1.0,
        "gaussian_weighted",
        True,
    )
