"""MMSI meta weights: forms, fast vs nested path, Norm, closed forms.

NumPy float64 references are written from docs/training_methods.md (MMSI:
"What a step does", "Nested vs fast path"; Jiang et al., IEEE TNNLS 2024,
and its official code).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfdml.losses import References
from tfdml.meta import MMSIContrastiveLoss
from tfdml.meta import MMSIMultiSimilarityLoss
from tfdml.meta import MMSITripletLoss
from tfdml.meta import fast_raw_weights
from tfdml.meta import nested_raw_weights
from tfdml.meta import normalize_weights


def mlp(seed=0, bn=False, d=4, p=6):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((p,))
    h = keras.layers.Dense(8)(inp)
    if bn:
        h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Activation("tanh")(h)
    raw = keras.layers.Dense(d)(h)
    emb = keras.layers.UnitNormalization()(raw)
    return keras.Model(inp, {"embeddings": emb, "raw": raw})


def problem(seed=0, n_cls=4, k=3, p=6, d=4, d_size=2):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_cls * k, p)).astype("float32")
    y = np.repeat(np.arange(n_cls), k).astype("int32")
    xv = rng.normal(size=(n_cls, p)).astype("float32")
    yv = np.arange(n_cls).astype("int32")
    ref = rng.normal(size=(n_cls * d_size, d))
    ref = (ref / np.linalg.norm(ref, axis=1, keepdims=True)).astype("float32")
    rl = np.repeat(np.arange(n_cls), d_size).astype("int32")
    return x, y, xv, yv, ref, rl, np.ones(len(rl), bool)


BASES = {
    "contrastive": lambda: MMSIContrastiveLoss(margin=0.0),
    "ms": lambda: MMSIMultiSimilarityLoss(epsilon=0.5),
    "triplet": lambda: MMSITripletLoss(margin=0.5),
}


def _values(model):
    tv = [tf.convert_to_tensor(v) for v in model.trainable_variables]
    ntv = [tf.convert_to_tensor(v) for v in model.non_trainable_variables]
    return tv, ntv


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("name", sorted(BASES))
def test_fast_equals_nested_and_lr_invariant(name, bn):
    model = mlp(bn=bn)
    base = BASES[name]()
    tv, ntv = _values(model)
    args = problem()
    ws = []
    for lr in (1e-7, 1e-3, 1.0):
        for fn in (nested_raw_weights, fast_raw_weights):
            raw, sel, _ = fn(model, base, tv, ntv, *args, virtual_lr=lr)
            w, ok = normalize_weights(raw, sel, "separate")
            assert bool(ok)
            ws.append(w.numpy())
        # raw weights scale with lr in both paths.
    ref = ws[1]  # fast, lr=1e-7
    assert (ref > 0).sum() >= 4 and (ref == 0).sum() > 0
    for w in ws:
        np.testing.assert_allclose(w, ref, atol=1e-5)


def test_linear_closed_form_matches_numpy():
    """f = W x without normalisation: dS_ab = <v, f_b x_a^T + f_a x_b^T>."""
    rng = np.random.default_rng(3)
    p, d, m, lr = 5, 3, 0.05, 1e-3
    keras.utils.set_random_seed(0)
    inp = keras.Input((p,))
    f = keras.layers.Dense(d, use_bias=False)(inp)
    model = keras.Model(inp, {"embeddings": f, "raw": f})
    kernel = rng.normal(scale=0.4, size=(p, d))
    model.set_weights([kernel.astype("float32")])
    x = rng.normal(size=(8, p))
    y = np.repeat(np.arange(4), 2)
    xv = rng.normal(size=(3, p))
    yv = np.array([0, 1, 3])
    ref = rng.normal(scale=0.5, size=(6, d))
    rl = np.array([0, 0, 1, 2, 3, 3])
    # NumPy reference (float64). W = kernel^T, f = x @ kernel.
    fv = xv @ kernel
    s_g = fv @ ref.T
    same = yv[:, None] == rl[None, :]
    c = np.where(same & (s_g < 1 - 1e-5), -1.0, 0.0)
    c += np.where(~same & (s_g > m), 1.0, 0.0)
    v = (xv.T @ (c @ ref)) / len(yv)  # dL_g/dkernel [p, d]
    fx = x @ kernel
    s = fx @ fx.T
    fdot = x @ v  # JVP of f along v
    ds = fdot @ fx.T + fx @ fdot.T
    same_t = y[:, None] == y[None, :]
    eye = np.eye(len(y), dtype=bool)
    pos = same_t & ~eye & (s < 1 - 1e-5)
    neg = ~same_t & (s > m)
    want = lr * (neg.astype(float) - pos) / len(y) * ds
    base = MMSIContrastiveLoss(margin=m, normalize=False)
    tv, ntv = _values(model)
    args = (
        x.astype("float32"),
        y.astype("int32"),
        xv.astype("float32"),
        yv.astype("int32"),
        ref.astype("float32"),
        rl.astype("int32"),
        np.ones(6, bool),
    )
    assert pos.sum() > 0 and neg.sum() > 0 and np.abs(want).max() > 0
    for fn in (fast_raw_weights, nested_raw_weights):
        raw, sel, _ = fn(model, base, tv, ntv, *args, virtual_lr=lr)
        np.testing.assert_array_equal(sel["pos"].numpy(), pos)
        np.testing.assert_array_equal(sel["neg"].numpy(), neg)
        np.testing.assert_allclose(
            raw.numpy(), want, atol=2e-5 * np.abs(want).max()
        )


@pytest.mark.parametrize("name", sorted(BASES))
def test_coefficients_are_mixed_derivative(name):
    """a_k = d^2 L_W / (dw_k dS_k) at w = 0, and d/dS_l of g_k = 0 (l!=k)."""
    base = BASES[name]()
    rng = np.random.default_rng(1)
    e = rng.normal(size=(9, 4))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    sim = tf.constant(e @ e.T, tf.float32)
    y = np.repeat(np.arange(3), 3)
    pos = tf.constant((y[:, None] == y[None, :]) & ~np.eye(9, dtype=bool))
    neg = tf.constant(y[:, None] != y[None, :])
    sel = base.select(sim, pos, neg)
    w = tf.zeros_like(sim)
    with tf.GradientTape() as outer:
        outer.watch(sim)
        with tf.GradientTape() as inner:
            inner.watch(w)
            loss = tf.reduce_mean(base.weighted(sim, sel, w))
        g = inner.gradient(loss, w)
        total = tf.reduce_sum(g)  # sum_k g_k; d/dS_k = sum_l dg_l/dS_k
    mixed = outer.gradient(total, sim).numpy()
    a = base.coefficients(sim, sel).numpy()
    assert np.abs(a).max() > 0
    np.testing.assert_allclose(mixed, a, rtol=1e-5, atol=1e-7)


def _np_contrastive_g(s, pos, neg, m):
    p = pos & (s < 1 - 1e-5)
    q = neg & (s > m)
    return (np.where(p, 1 - s, 0) + np.where(q, s, 0)).sum(1)


def _np_ms_g(s, pos, neg, a, b, lam, c):
    p = pos & (s < 1 - 1e-5)
    out = []
    for i in range(len(s)):
        if not p[i].any() or not neg[i].any():
            out.append(0.0)
            continue
        lp = np.log1p(np.exp(-a * (s[i][p[i]] - lam)).sum()) / a
        ln = np.log1p(np.exp(b * (s[i][neg[i]] - lam)).sum()) / b
        out.append(c * (lp + ln))
    return np.array(out)


def _np_triplet_g(s, pos, neg, m):
    p = pos & (s < 1 - 1e-5)
    out = []
    for i in range(len(s)):
        vals = [
            s[i, k] - s[i, j] + m
            for j in np.flatnonzero(p[i])
            for k in np.flatnonzero(neg[i])
            if s[i, k] - s[i, j] + m > 0
        ]
        out.append(np.mean(vals) if vals else 0.0)
    return np.array(out)


@pytest.mark.parametrize("name", sorted(BASES))
def test_g_form_matches_numpy_with_finite_gradients(name):
    base = BASES[name]()
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(5, 4)).astype("float32")
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ref = rng.normal(size=(7, 4)).astype("float32")
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    ref[0] = emb[0]  # a duplicate: S = 1, never a positive
    y = np.array([0, 1, 2, 0, 9], np.int32)  # label 9: no positives
    rl = np.array([0, 0, 1, 1, 2, 3, 3], np.int32)
    s = emb.astype(float) @ ref.T.astype(float)
    pos = y[:, None] == rl[None, :]
    neg = ~pos
    if name == "contrastive":
        want = _np_contrastive_g(s, pos, neg, base.margin)
    elif name == "ms":
        want = _np_ms_g(s, pos, neg, 2.0, 40.0, 0.5, 2.0)
    else:
        want = _np_triplet_g(s, pos, neg, base.margin)
    e = tf.constant(emb)
    with tf.GradientTape() as tape:
        tape.watch(e)
        got = base.per_anchor(e, y, References(ref, rl))
        total = tf.reduce_sum(got)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)
    grad = tape.gradient(total, e).numpy()
    assert np.isfinite(grad).all()
    # No valid pair at all -> 0 with a finite gradient.
    with tf.GradientTape() as tape:
        tape.watch(e)
        none = base.per_anchor(
            e, y, References(ref, rl, valid=np.zeros(7, bool))
        )
        total = tf.reduce_sum(none)
    np.testing.assert_array_equal(none.numpy(), 0.0)
    grad = tape.gradient(total, e, unconnected_gradients="zero")
    assert np.isfinite(grad.numpy()).all()


def test_norm_properties_and_fallbacks():
    rng = np.random.default_rng(0)
    raw = tf.constant(rng.normal(size=(6, 6)), tf.float32)
    pos = tf.constant(rng.random((6, 6)) < 0.3)
    neg = tf.logical_and(tf.logical_not(pos), rng.random((6, 6)) < 0.5)
    sel = {"pos": pos, "neg": neg}
    for norm in ("joint", "separate"):
        w, ok = normalize_weights(raw, sel, norm)
        w = w.numpy()
        assert bool(ok) and np.isfinite(w).all()
        assert w.min() >= 0 and w.max() == pytest.approx(1.0)
        assert (w[~(pos.numpy() | neg.numpy())] == 0).all()
    w, _ = normalize_weights(raw, sel, "separate")
    assert w.numpy()[pos.numpy()].max() == pytest.approx(1.0)
    assert w.numpy()[neg.numpy()].max() == pytest.approx(1.0)
    bad = -tf.abs(raw)  # no positive raw weight (the official code: NaN)
    w, ok = normalize_weights(bad, sel, "joint", "skip")
    assert not bool(ok) and (w.numpy() == 0).all()
    w, ok = normalize_weights(bad, sel, "separate", "zeros")
    assert bool(ok) and (w.numpy() == 0).all()
    w, ok = normalize_weights(bad, sel, "joint", "uniform")
    np.testing.assert_array_equal(
        w.numpy(), (pos.numpy() | neg.numpy()).astype(np.float32)
    )
    w, _ = normalize_weights(tf.fill([6, 6], np.nan), sel, "joint")
    assert np.isfinite(w.numpy()).all()
    with pytest.raises(ValueError, match="normalization"):
        normalize_weights(raw, sel, "global")
    with pytest.raises(ValueError, match="fallback"):
        normalize_weights(raw, sel, "joint", "nan")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ms_scale_property_negatives_vanish_with_joint_norm(seed):
    """alpha(pos)=2, beta(neg)=40, base=0.5, c=2: c-/c+ ~ e^-20 (§1.4)."""
    model = mlp(seed)
    base = MMSIMultiSimilarityLoss(epsilon=1.0)  # select many pairs
    tv, ntv = _values(model)
    args = problem(seed, n_cls=4, k=4)
    raw, sel, _ = fast_raw_weights(model, base, tv, ntv, *args)
    w, _ = normalize_weights(raw, sel, "joint")
    w = w.numpy()
    pos, neg = sel["pos"].numpy(), sel["neg"].numpy()
    assert w[pos].max() == pytest.approx(1.0)
    assert w[neg].max() > 0  # negatives do get a (tiny) weight
    assert w[neg].max() / w[pos].max() < 1e-6
    ws, _ = normalize_weights(raw, sel, "separate")
    assert ws.numpy()[neg].max() == pytest.approx(1.0)


def test_fast_path_xla_equals_eager():
    model = mlp(bn=True)
    base = MMSIMultiSimilarityLoss(epsilon=0.5)
    tv, ntv = _values(model)
    args = problem()
    eager = fast_raw_weights(model, base, tv, ntv, *args)[0].numpy()

    @tf.function(jit_compile=True)
    def run(tv, ntv):
        return fast_raw_weights(model, base, tv, ntv, *args)[0]

    scale = np.abs(eager).max()
    assert scale > 0
    np.testing.assert_allclose(run(tv, ntv).numpy(), eager, atol=1e-5 * scale)


def test_bad_hyper_parameters():
    with pytest.raises(ValueError, match="margin"):
        MMSIContrastiveLoss(margin=2.0)
    with pytest.raises(ValueError, match="alpha"):
        MMSIMultiSimilarityLoss(alpha=0.0)
    with pytest.raises(ValueError, match="epsilon"):
        MMSIMultiSimilarityLoss(epsilon=-1.0)
    with pytest.raises(ValueError, match="margin"):
        MMSITripletLoss(margin=-0.1)
    for cls in (MMSIContrastiveLoss, MMSIMultiSimilarityLoss, MMSITripletLoss):
        obj = cls()
        assert cls.from_config(obj.get_config()).get_config() == (
            obj.get_config()
        )
