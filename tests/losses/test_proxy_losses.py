"""Proxy and classification losses against the float64 NumPy references in
``tests/reference_proxy.py``: per-anchor values with fixed proxies,
finite-difference gradients w.r.t. embeddings and proxies, eager vs
tf.function vs XLA, edge batches, label checks and config round trips."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tests.reference_proxy as ref
import tfdml.losses as L
from tfdml import registry

C, D = 5, 6


def _pa(emb, y, p, **kw):
    return np.full(len(y), ref.proxy_anchor(emb, y, p, **kw))


# name -> (class, kwargs, proxies per class, reference(emb, y, proxies))
CASES = {
    "ProxyAnchorLoss": (L.ProxyAnchorLoss, {}, 1, _pa),
    "ProxyNCALoss": (L.ProxyNCALoss, {}, 1, ref.proxy_nca),
    "ProxyNCALoss++": (
        L.ProxyNCALoss,
        {"temperature": 1 / 9, "include_positive": True},
        1,
        lambda e, y, p: ref.proxy_nca(e, y, p, 1 / 9, True),
    ),
    "NormalizedSoftmaxLoss": (
        L.NormalizedSoftmaxLoss,
        {},
        1,
        ref.normalized_softmax,
    ),
    "CosFaceLoss": (L.CosFaceLoss, {}, 1, ref.cosface),
    "ArcFaceLoss": (L.ArcFaceLoss, {}, 1, ref.arcface),
    "SubCenterArcFaceLoss": (
        L.SubCenterArcFaceLoss,
        {},
        3,
        ref.sub_center_arcface,
    ),
    "SoftTripleLoss": (L.SoftTripleLoss, {}, 10, ref.soft_triple),
    "SoftTripleLoss-k2": (
        L.SoftTripleLoss,
        {"centers_per_class": 2, "la": 5.0, "tau": 0.5},
        2,
        lambda e, y, p: ref.soft_triple(e, y, p, k=2, la=5.0, tau=0.5),
    ),
}
NAMES = list(CASES)


def batch(seed=0, n=10, labels=None):
    rng = np.random.default_rng(seed)
    if labels is None:
        labels = np.array([0, 0, 1, 1, 2, 2, 3, 3, 0, 1][:n], np.int32)
    emb = rng.normal(size=(len(labels), D)).astype(np.float32)
    return emb, np.asarray(labels, np.int32)


def make(name, seed=1, num_classes=C, **extra):
    cls, kwargs, k, fn = CASES[name]
    loss = cls(num_classes=num_classes, embedding_dim=D, **kwargs, **extra)
    rng = np.random.default_rng(seed)
    proxies = rng.normal(size=(num_classes * k, D)).astype(np.float32)
    loss.proxies.assign(proxies)
    return loss, proxies, fn


@pytest.mark.parametrize("name", NAMES)
def test_per_anchor_matches_reference(name):
    loss, proxies, fn = make(name)
    emb, y = batch()  # class 4 is absent from the batch
    expected = fn(emb, y, proxies)
    per = loss.per_anchor(emb, y).numpy()
    np.testing.assert_allclose(per, expected, rtol=1e-5, atol=1e-6)
    # The Keras entry point: mean over anchors, or [B] with reduction=None.
    np.testing.assert_allclose(
        float(loss(y, emb)), expected.mean(), rtol=1e-5, atol=1e-6
    )
    config = loss.get_config()
    config["reduction"] = None
    none = type(loss).from_config(config)
    none.proxies.assign(proxies)
    np.testing.assert_allclose(
        none(y, emb).numpy(), expected, rtol=1e-5, atol=1e-6
    )


def test_proxies_fixed_by_the_initializer():
    _, proxies, _ = make("CosFaceLoss")
    loss = L.CosFaceLoss(
        num_classes=C,
        embedding_dim=D,
        initializer=keras.initializers.Constant(proxies),
    )
    emb, y = batch()
    np.testing.assert_allclose(
        loss.per_anchor(emb, y).numpy(),
        ref.cosface(emb, y, proxies),
        rtol=1e-5,
        atol=1e-6,
    )


def test_arcface_beyond_pi_minus_margin_uses_the_fallback():
    loss, proxies, _ = make("ArcFaceLoss")
    emb, y = batch()
    emb[0] = -proxies[y[0]] + 0.01  # theta_y close to pi
    assert y[2] != y[0]
    proxies[y[2]] = np.eye(D)[0]
    loss.proxies.assign(proxies)
    emb[2] = 2 * np.eye(D)[0]  # cos_y at (or next to) 1
    cos0 = ref._cos(emb, proxies)[0, y[0]]
    assert math_acos(cos0) > np.pi - 0.5
    np.testing.assert_allclose(
        loss.per_anchor(emb, y).numpy(),
        ref.arcface(emb, y, proxies),
        rtol=1e-5,
        atol=1e-6,
    )
    # scale 1: at scale 64 that anchor's softmax saturates (no gradient)
    small = L.ArcFaceLoss.from_config({**loss.get_config(), "scale": 1.0})
    small.proxies.assign(proxies)
    x = tf.constant(emb)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = tf.reduce_sum(small.per_anchor(x, y))
    grads = tape.gradient(value, [x, small.proxies.value])
    assert np.abs(grads[0].numpy()[2]).max() > 1e-3
    for g in grads:
        assert np.all(np.isfinite(g.numpy()))


def test_arcface_target_gradient_is_finite_at_cos_plus_minus_one():
    from tfdml.losses.margin_softmax import arcface_target

    c = tf.constant([1.0, -1.0, 0.3])
    with tf.GradientTape() as tape:
        tape.watch(c)
        t = arcface_target(c, 0.5)
    g = tape.gradient(t, c).numpy()
    assert np.all(np.isfinite(g)), g
    np.testing.assert_allclose(
        t.numpy(),
        [np.cos(0.5), -1 - 0.5 * np.sin(0.5), np.cos(np.arccos(0.3) + 0.5)],
        rtol=1e-3,
    )


def math_acos(c):
    return float(np.arccos(np.clip(c, -1.0, 1.0)))


def test_proxy_anchor_per_proxy_terms():
    loss, proxies, _ = make("ProxyAnchorLoss")
    emb, y = batch()
    sim = ref._cos(emb, proxies).astype(np.float32)
    pos, has, neg = L.proxy.proxy_anchor_terms(
        tf.constant(sim), tf.constant(y), C, 32.0, 0.1
    )
    r_pos, r_has, r_neg = ref.proxy_anchor_terms(emb, y, proxies)
    np.testing.assert_array_equal(has.numpy(), r_has)
    assert not r_has[4]  # class 4 absent: left out of the positive mean
    np.testing.assert_allclose(pos.numpy()[r_has], r_pos[r_has], rtol=1e-5)
    np.testing.assert_allclose(neg.numpy(), r_neg, rtol=1e-5)
    # The absent class's positive term is not averaged in (a zero would
    # lower the mean; a log(1) = 0 entry counted would too).
    total = r_pos[r_has].mean() + r_neg.mean()
    np.testing.assert_allclose(float(loss(y, emb)), total, rtol=1e-5, atol=1e-6)
    assert not np.isclose(total, r_pos.sum() / C + r_neg.mean())


def _fd(fn, x, eps=1e-6):
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        g[idx] = (fn(xp) - fn(xm)) / (2 * eps)
    return g


FD_NAMES = [n for n in NAMES if n != "SoftTripleLoss"]  # k2 covers it


@pytest.mark.parametrize("name", FD_NAMES)
def test_gradients_match_finite_differences(name):
    loss, proxies, fn = make(name, num_classes=3)
    small = None
    if name.startswith(("CosFace", "ArcFace", "SubCenter")):
        # a scale of 64 saturates the softmax of a small case and leaves
        # nothing to compare: scale 4
        small = {"scale": 4.0}
        fn = _SCALED[name]
    elif name == "ProxyAnchorLoss":
        small = {"alpha": 4.0}

        def fn(e, y_, p):
            return _pa(e, y_, p, alpha=4.0)

    if small is not None:
        loss = type(loss).from_config({**loss.get_config(), **small})
        loss.proxies.assign(proxies)
    emb, y = batch(3, labels=[0, 0, 1, 2, 1])
    x = tf.constant(emb)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = tf.reduce_mean(loss.per_anchor(x, y))
    g_emb, g_p = tape.gradient(value, [x, loss.proxies.value])
    fd_emb = _fd(lambda e: fn(e, y, proxies).mean(), emb)
    fd_p = _fd(lambda p: fn(emb, y, p).mean(), proxies)
    for got, want in ((g_emb.numpy(), fd_emb), (g_p.numpy(), fd_p)):
        assert np.abs(want).max() > 1e-3  # the case is not degenerate
        np.testing.assert_allclose(
            got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max()
        )


_SCALED = {
    "CosFaceLoss": lambda e, y, p: ref.cosface(e, y, p, scale=4.0),
    "ArcFaceLoss": lambda e, y, p: ref.arcface(e, y, p, scale=4.0),
    "SubCenterArcFaceLoss": lambda e, y, p: ref.sub_center_arcface(
        e, y, p, scale=4.0
    ),
}


@pytest.mark.parametrize("name", NAMES)
def test_eager_tf_function_and_xla_agree(name):
    loss, _, _ = make(name)
    emb, y = batch()
    eager = loss.per_anchor(emb, y).numpy()
    graph = tf.function(loss.per_anchor)(emb, y).numpy()
    xla = tf.function(loss.per_anchor, jit_compile=True)(emb, y).numpy()
    np.testing.assert_allclose(graph, eager, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(xla, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_single_class_batch_and_one_class(name):
    loss, proxies, fn = make(name)
    emb, _ = batch()
    y = np.full(len(emb), 2, np.int32)
    np.testing.assert_allclose(
        loss.per_anchor(emb, y).numpy(),
        fn(emb, y, proxies),
        rtol=1e-5,
        atol=1e-6,
    )
    if name == "ProxyNCALoss":  # the sum over the other classes is empty
        with pytest.raises(ValueError, match="num_classes"):
            CASES[name][0](num_classes=1)
        return
    loss, proxies, fn = make(name, num_classes=1)
    y = np.zeros(len(emb), np.int32)
    per = loss.per_anchor(emb, y).numpy()
    np.testing.assert_allclose(per, fn(emb, y, proxies), rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(per))


@pytest.mark.parametrize("name", NAMES)
def test_empty_batch_gives_zero(name):
    loss, _, _ = make(name)
    emb = np.zeros((0, D), np.float32)
    y = np.zeros((0,), np.int32)
    assert float(loss(y, emb)) == 0.0
    assert loss.per_anchor(emb, y).shape == (0,)


@pytest.mark.parametrize("name", ["ProxyAnchorLoss", "ArcFaceLoss"])
def test_out_of_range_labels_are_an_error(name):
    loss, _, _ = make(name)
    emb, y = batch()
    bad = y.copy()
    bad[0] = C
    with pytest.raises(ValueError, match=r"class ids in \[0, num_classes=5\)"):
        loss(bad, emb)
    bad[0] = -1
    with pytest.raises(ValueError, match="num_classes"):
        loss.per_anchor(emb, bad)
    bad[0] = C  # the upper bound, at run time
    fn = tf.function(
        loss.per_anchor,
        input_signature=[
            tf.TensorSpec([None, D], tf.float32),
            tf.TensorSpec([None], tf.int32),
        ],
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="num_classes"):
        fn(emb, bad)
    negative = y.copy()
    negative[2] = -1
    with pytest.raises(tf.errors.InvalidArgumentError, match="num_classes"):
        fn(emb, negative)
    xla = tf.function(
        loss.per_anchor,
        jit_compile=True,
        input_signature=fn.input_signature,
    )
    assert np.all(np.isnan(xla(emb, bad).numpy()))
    assert np.all(np.isfinite(xla(emb, y).numpy()))


def test_bad_labels_and_arguments():
    loss, _, _ = make("CosFaceLoss")
    emb, y = batch()
    with pytest.raises(ValueError, match="multi-hot"):
        loss(np.eye(len(y), C), emb)
    with pytest.raises(ValueError, match="integer"):
        loss(y + 0.5, emb)
    with pytest.raises(ValueError, match="num_classes"):
        L.ArcFaceLoss(num_classes=0)
    with pytest.raises(ValueError, match="margin"):
        L.ArcFaceLoss(margin=4.0)
    with pytest.raises(ValueError, match="sub_centers"):
        L.SubCenterArcFaceLoss(sub_centers=0)
    with pytest.raises(ValueError, match="temperature"):
        L.NormalizedSoftmaxLoss(temperature=0.0)
    with pytest.raises(ValueError, match="num_classes"):
        L.ProxyAnchorLoss()(y, emb)  # sizes unknown: no proxies
    with pytest.raises(ValueError, match="embedding_dim"):
        L.ProxyAnchorLoss(num_classes=C, embedding_dim=D).build(
            embedding_dim=D + 1
        )


@pytest.mark.parametrize("name", NAMES)
def test_nan_embedding_gives_nan(name):
    loss, _, _ = make(name)
    emb, y = batch()
    emb[3, 0] = np.nan
    assert np.isnan(float(loss(y, emb)))


def test_embedding_dim_from_the_first_batch():
    emb, y = batch()
    loss = L.SoftTripleLoss(num_classes=C)
    assert not loss.built
    assert np.isfinite(float(loss(y, emb)))
    assert loss.proxies.shape == (C * 10, D)
    assert loss.embedding_dim == D


def test_default_initializers_follow_the_papers_code():
    big = 400
    pa = L.ProxyAnchorLoss(num_classes=big, embedding_dim=64)
    # kaiming_normal_(fan_out) on [C, d]: std sqrt(2 / C), not truncated
    p = pa.proxies.numpy()
    np.testing.assert_allclose(p.std(), np.sqrt(2 / big), rtol=0.03)
    assert np.abs(p).max() > 2.5 * np.sqrt(2 / big)
    st = L.SoftTripleLoss(num_classes=40, embedding_dim=64)
    # kaiming_uniform_(a=sqrt(5)) on [C K, d]: uniform in +-1/sqrt(C K)
    w = st.proxies.numpy()
    bound = 1 / np.sqrt(400)
    assert np.abs(w).max() <= bound
    assert np.abs(w).max() > 0.95 * bound


NEW = [
    "ProxyAnchorLoss",
    "ProxyNCALoss",
    "NormalizedSoftmaxLoss",
    "CosFaceLoss",
    "ArcFaceLoss",
    "SubCenterArcFaceLoss",
    "SoftTripleLoss",
]


@pytest.mark.parametrize("name", NEW)
def test_config_round_trip(name):
    cls = registry.registered(L.ProxyLoss)[name]
    assert cls is CASES[name][0]
    for obj in (cls(), cls(num_classes=C, embedding_dim=D)):
        config = obj.get_config()
        clone = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(obj)
        )
        assert type(clone) is cls
        assert clone.get_config() == config
        # Through the tfdml registry (class name + kwargs, as train.py does).
        kwargs = {k: v for k, v in config.items() if k != "name"}
        built = registry.build(L.ProxyLoss, {"name": name, **kwargs})
        assert built.get_config() == config
        if obj.built:
            assert clone.proxies.shape == obj.proxies.shape
    layer = cls(num_classes=C, embedding_dim=D).proxy_layer
    again = L.ProxyWeights.from_config(layer.get_config())
    again.build()
    assert again.proxies.shape == layer.proxies.shape


def test_seeded_proxies_do_not_depend_on_when_the_loss_was_made():
    # train.py configures the loss before it seeds the run: the proxies
    # must be drawn when they are created.
    first = L.ProxyAnchorLoss(num_classes=C)
    second = L.ProxyAnchorLoss(num_classes=C)
    keras.utils.set_random_seed(3)
    first.build(embedding_dim=D)
    keras.utils.set_random_seed(3)
    second.build(embedding_dim=D)
    np.testing.assert_array_equal(first.proxies.numpy(), second.proxies.numpy())
