"""IAA: estimator, neighbour correction, synthesis, masks, fit
(IEEE TMM 2023, arXiv 2211.16264; docs/training_methods.md, section IAA).

NumPy float64 references are written here from the paper's equations
(Fu et al., IEEE TMM 2023, Eq. 7-17) and never import tfdml.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

try:
    import reference
except ImportError:  # tests/ is a package
    from tests import reference

import tfdml.losses
from tfdml import ops
from tfdml.augment import IAAEstimator
from tfdml.augment import IAARefresh
from tfdml.augment import IAAugmenter
from tfdml.augment import adaptive_weight
from tfdml.augment import neighbor_correction
from tfdml.augment import official_lambda
from tfdml.losses import MultiSimilarityLoss
from tfdml.losses import PairLoss
from tfdml.losses import References
from tfdml.memory import CrossBatchMemory
from tfdml.models import DMLModel

DIM = 6


# --- NumPy references ------------------------------------------------------


def np_pass_stats(raw, labels, num_classes):
    raw = np.asarray(raw, np.float64)
    count = np.zeros(num_classes)
    mean = np.zeros((num_classes, raw.shape[1]))
    var = np.zeros_like(mean)
    for c in range(num_classes):
        rows = raw[labels == c]
        count[c] = len(rows)
        if len(rows):
            mean[c] = rows.mean(0)
            var[c] = rows.var(0, ddof=0)
    return count, mean, var


def np_a(n, beta=0.1, tau=40, strict=False):
    n = max(n, 1)
    if (n < tau) if strict else (n <= tau):
        return 1.0 / (1.0 + np.log(1.0 + beta * (n - 1)))
    return 0.0


def np_neighbors(mean, var, n, k, beta, gamma, tau, official):
    """Eq. 9-16 literally, one class at a time."""
    c = len(n)
    sq = mean**2
    elig = n > 1
    gl_w = np.where(n != 1, n, 0.0)
    glob = (gl_w[:, None] * var).sum(0) / gl_w.sum()
    out = {"idx": [], "w": [], "nb": [], "corr": [], "glob": glob}
    for i in range(c):
        dm = np.array([np.linalg.norm(sq[i] - sq[j]) for j in range(c)])
        dcv = np.array([np.linalg.norm(var[i] - var[j]) for j in range(c)])
        excl = ~elig.copy()
        excl[i] = True
        dm_s = dm + excl * 1e12
        idx = np.argsort(dm_s, kind="stable")[:k]
        if official:
            dmn = (dm_s - dm_s.min()) / (dm_s.max() - dm_s.min())
            dcn = (dcv - dcv.min()) / (dcv.max() - dcv.min())
            w = np.exp(-(dmn[idx] ** 2) / 2 - dcn[idx] ** 2 / 2) * n[idx]
        else:
            w = np.exp(-(dm[idx] ** 2) / 2 - dcv[idx] ** 2 / 2) * n[idx]
            w = w * ~excl[idx]
        w = w / w.sum()
        nb = (w[:, None] * var[idx]).sum(0)
        a = np_a(n[i], beta, tau, strict=official)
        corr = (1 - a) * var[i] + a * ((1 - gamma) * nb + gamma * glob)
        out["idx"].append(idx)
        out["w"].append(w)
        out["nb"].append(nb)
        out["corr"].append(corr)
    return {k_: np.array(v) for k_, v in out.items()}


def iaa_mask(n, copies):
    """The official code's positive mask rule, built from block indices."""
    labels = np.arange(n)
    pos_self = np.tile(np.eye(n, dtype=bool), (1, copies + 1))
    return labels, pos_self


# --- helpers ---------------------------------------------------------------


def dense_encoder(in_dim=5, dim=DIM, seed=0):
    inp = keras.Input((in_dim,))
    raw = keras.layers.Dense(
        dim, kernel_initializer=keras.initializers.GlorotUniform(seed)
    )(inp)
    out = {"embeddings": keras.layers.UnitNormalization()(raw), "raw": raw}
    return keras.Model(inp, out)


def data(n=16, in_dim=5, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, in_dim)).astype(np.float32)
    y = (np.arange(n) % classes).astype(np.int32)
    return x, y


def fitted_estimator(num_classes=4, dim=DIM, seed=0, **kwargs):
    rng = np.random.default_rng(seed)
    est = IAAEstimator(num_classes, dim, **kwargs)
    raw = rng.normal(size=(40, dim)) * rng.uniform(0.2, 2.0, size=dim)
    est.update(raw.astype(np.float32), np.arange(40) % num_classes)
    return est


class SimContrastive(PairLoss):
    """Similarity-form contrastive loss of IAA's official code, used when
    tfdml.losses.ContrastiveLoss is not available."""

    def pair_loss(self, sim, pos_mask, neg_mask, pair_weights=None, **ctx):
        pos = tf.where(pos_mask & (sim < 0.8), 0.8 - sim, 0.0)
        neg = tf.where(neg_mask & (sim > 0.5), sim - 0.5, 0.0)
        return tf.reduce_sum(pos, 1) + tf.reduce_sum(neg, 1)


class SimTriplet(PairLoss):
    """Paper Eq. 19 in similarity form: all positives, hardest negative,
    used when tfdml.losses.TripletMarginLoss is not available."""

    def pair_loss(self, sim, pos_mask, neg_mask, pair_weights=None, **ctx):
        hard_neg = ops.masked_max(sim, neg_mask)[:, None]
        per = tf.nn.relu(hard_neg - sim + 0.1)
        per = tf.where(pos_mask & tf.reduce_any(neg_mask, 1)[:, None], per, 0)
        return ops.masked_mean(per, pos_mask | ~pos_mask)


def all_losses():
    contrastive = getattr(tfdml.losses, "ContrastiveLoss", SimContrastive)
    triplet = getattr(tfdml.losses, "TripletMarginLoss", SimTriplet)
    return {
        "ms": MultiSimilarityLoss,
        "contrastive": contrastive,
        "triplet": triplet,
    }


# --- 1-2. estimator ----------------------------------------------------------


def test_single_update_equals_numpy_population_variance():
    rng = np.random.default_rng(0)
    raw = (rng.normal(size=(50, DIM)) * 3 + 5).astype(np.float32)
    labels = rng.integers(0, 5, size=50)
    labels[labels == 4] = 3  # class 4 absent
    est = IAAEstimator(6, DIM)
    batches = [(raw[i : i + 7], labels[i : i + 7]) for i in range(0, 50, 7)]
    counts = est.update_from_batches(batches)
    n, mean, var = np_pass_stats(raw, labels, 6)
    np.testing.assert_array_equal(counts, n)
    np.testing.assert_allclose(est.variance.numpy(), var, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(est.mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(est.amount.numpy(), n)
    np.testing.assert_array_equal(est.variance.numpy()[4:], 0.0)
    # Below the correction threshold the sampled variance is the estimate.
    assert not est.uses_correction
    np.testing.assert_array_equal(
        est.sampling_variance.numpy(), est.variance.numpy()
    )
    assert est.estimated and int(est.num_updates.numpy()) == 1


def test_refeeding_identical_data_leaves_variance_unchanged():
    rng = np.random.default_rng(1)
    raw = rng.normal(size=(30, DIM)).astype(np.float32)
    labels = np.arange(30) % 3
    est = IAAEstimator(3, DIM)
    est.update(raw, labels)
    first = est.variance.numpy().copy()
    for _ in range(3):
        est.update(raw, labels)
    np.testing.assert_allclose(est.variance.numpy(), first, rtol=1e-5)
    np.testing.assert_array_equal(est.amount.numpy(), [40, 40, 40])


def test_momentum_merge_closed_form():
    rng = np.random.default_rng(2)
    raw = rng.normal(size=(24, DIM)).astype(np.float64)
    labels = np.arange(24) % 2
    delta = rng.normal(size=DIM)
    est = IAAEstimator(3, DIM, momentum=0.2)
    est.update(raw.astype(np.float32), labels)
    var0, mean0 = est.variance.numpy().copy(), est.mean.numpy().copy()
    # Same per-class variance, mean shifted by delta, equal counts:
    # w = max(12 / 24, 1 - 0.2) = 0.8.
    est.update((raw + delta).astype(np.float32), labels)
    want = var0[:2] + 0.8 * 0.2 * delta**2
    np.testing.assert_allclose(est.variance.numpy()[:2], want, rtol=1e-5)
    np.testing.assert_allclose(
        est.mean.numpy()[:2], mean0[:2] + 0.8 * delta, rtol=1e-5, atol=1e-6
    )
    # With more new samples than old ones, w = n_new / (n_new + n_old).
    est2 = IAAEstimator(1, DIM)
    est2.merge([1.0], np.zeros((1, DIM)), np.ones((1, DIM)))
    est2.merge([9.0], np.ones((1, DIM)), np.ones((1, DIM)) * 2)
    w = 0.9
    want = (1 - w) * 1 + w * 2 + w * (1 - w) * 1.0
    np.testing.assert_allclose(est2.variance.numpy(), want, rtol=1e-6)


def test_adaptive_weight_table():
    n = np.array([1, 2, 3, 5, 10, 20, 39, 40, 41, 100])
    strict = adaptive_weight(n, strict=True).numpy()
    np.testing.assert_allclose(
        strict,
        [1.000, 0.913, 0.846, 0.748, 0.609, 0.484, 0.389, 0, 0, 0],
        atol=5e-4,
    )
    paper = adaptive_weight(n).numpy()
    np.testing.assert_allclose(paper[:7], strict[:7])
    np.testing.assert_allclose(paper[7], 1 / (1 + np.log(4.9)), rtol=1e-12)
    assert paper[8] == 0.0
    np.testing.assert_allclose(paper, [np_a(v) for v in n], rtol=1e-12, atol=0)


# --- 4. neighbour correction ----------------------------------------------


def correction_fixture(seed=3, c=12, d=5):
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=(c, d)) * 0.8
    var = rng.uniform(0.05, 0.6, size=(c, d))
    n = rng.integers(2, 60, size=c).astype(np.float64)
    n[[2, 7]] = 1  # singleton classes: never neighbours
    var[[2, 7]] = 0.0
    return mean, var, n


@pytest.mark.parametrize("official", [False, True], ids=["paper", "code"])
def test_neighbor_correction_matches_numpy(official):
    mean, var, n = correction_fixture()
    got = neighbor_correction(
        mean, var, n, num_neighbors=4, official_code=official, chunk_size=5
    )
    want = np_neighbors(mean, var, n, 4, 0.1, 0.1, 40, official)
    idx = got["neighbor_indices"].numpy()
    np.testing.assert_array_equal(idx, want["idx"])
    assert not np.isin(idx, [2, 7]).any()
    assert not (idx == np.arange(12)[:, None]).any()
    np.testing.assert_allclose(got["neighbor_weights"], want["w"], rtol=1e-9)
    np.testing.assert_allclose(got["neighbor_variance"], want["nb"], rtol=1e-9)
    np.testing.assert_allclose(got["global_variance"], want["glob"], rtol=1e-9)
    np.testing.assert_allclose(got["corrected"], want["corr"], rtol=1e-9)


def test_neighbor_weights_and_global_by_hand():
    # Three 1-d classes; class 0's neighbours are 1 (closer) and 2.
    mean = np.array([[0.0], [1.0], [np.sqrt(2.0)]])  # squared: 0, 1, 2
    var = np.array([[0.5], [1.0], [1.5]])
    n = np.array([1.0, 3.0, 5.0])
    got = neighbor_correction(mean, var, n, num_neighbors=2, beta=0.1)
    w1 = 3 * np.exp(-(1.0**2) / 2 - 0.5**2 / 2)
    w2 = 5 * np.exp(-(2.0**2) / 2 - 1.0**2 / 2)
    np.testing.assert_allclose(
        got["neighbor_weights"].numpy()[0], [w1, w2] / (w1 + w2), rtol=1e-12
    )
    # Sigma_global over classes with n != 1: (3*1 + 5*1.5) / 8.
    np.testing.assert_allclose(got["global_variance"], [10.5 / 8], rtol=1e-12)
    nb = (w1 * 1.0 + w2 * 1.5) / (w1 + w2)
    # Class 0 is a singleton: a = 1, its own variance is replaced.
    np.testing.assert_allclose(
        got["corrected"].numpy()[0], [0.9 * nb + 0.1 * 10.5 / 8], rtol=1e-12
    )
    # Class 1 (n=3): its only eligible neighbour is class 2 (0 is single).
    w = got["neighbor_weights"].numpy()[1]
    np.testing.assert_allclose(w, [1.0, 0.0])


def test_raw_scale_distances_do_not_underflow():
    mean, var, n = correction_fixture()
    got = neighbor_correction(mean * 1e3, var * 1e4, n, num_neighbors=4)
    w = got["neighbor_weights"].numpy()
    np.testing.assert_allclose(w.sum(1), 1.0)
    assert np.isfinite(got["corrected"].numpy()).all()


@pytest.mark.parametrize("official", [False, True], ids=["paper", "code"])
def test_estimator_applies_correction_only_in_paper_mode(official):
    rng = np.random.default_rng(4)
    c = 10
    labels = np.concatenate([np.arange(c), rng.integers(0, 8, size=40)])
    raw = rng.normal(size=(len(labels), DIM)).astype(np.float32)
    est = IAAEstimator(
        c,
        DIM,
        num_neighbors=3,
        correction_threshold=5,
        official_code=official,
    )
    assert est.uses_correction
    est.update(raw, labels)
    n, mean, var = np_pass_stats(raw, labels, c)
    if official:  # singleton classes are not merged by update_each_class
        var[n == 1], mean[n == 1] = 0.0, 0.0
    want = np_neighbors(mean, var, n, 3, 0.1, 0.1, 40, official)
    np.testing.assert_allclose(
        est.neighbor_variance.numpy(), want["nb"], rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        est.global_variance.numpy(), want["glob"], rtol=1e-5
    )
    sampled = est.sampling_variance.numpy()
    if official:
        np.testing.assert_array_equal(sampled, est.variance.numpy())
    else:
        np.testing.assert_allclose(sampled, want["corr"], rtol=1e-4, atol=1e-6)
        assert (sampled[n == 1] > 0).all()  # singletons get a variance


# --- 5-7. synthesis ---------------------------------------------------


def test_mask_own_copies_excluded_other_copies_positive():
    est = fitted_estimator()
    aug = IAAugmenter(est, num_copies=3, lam=0.5, seed=0)
    n = 8
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3], np.int32)
    ids = np.arange(100, 100 + n, dtype=np.int32)
    raw = np.random.default_rng(0).normal(size=(n, DIM)).astype(np.float32)
    emb, s_lab, s_ids, owner = aug.synthesize(raw, labels, ids)
    assert emb.shape == (3 * n, DIM)
    ref_labels = np.concatenate([labels, s_lab.numpy()])
    ref_ids = np.concatenate([ids, s_ids.numpy()])
    pos, neg = ops.pair_masks(labels, ref_labels, ids, ref_ids)
    pos, neg = pos.numpy(), neg.numpy()
    # The official code's mask: same label and not in eye(n) tiled over the
    # M + 1 blocks.
    _, own = iaa_mask(n, 3)
    same = labels[:, None] == np.tile(labels, 4)[None, :]
    np.testing.assert_array_equal(pos, same & ~own)
    np.testing.assert_array_equal(neg, ~same)
    for i in range(n):
        assert not pos[i, [i + n * m for m in range(4)]].any()
    assert pos[0, n + 1] and pos[0, 2 * n + 1] and pos[0, 3 * n + 1]
    np.testing.assert_array_equal(owner, s_ids)


def lam0_model(loss, memory=None, copies=2):
    est = fitted_estimator()
    aug = IAAugmenter(est, num_copies=copies, lam=0.0, seed=0)
    model = DMLModel(dense_encoder(), memory=memory, augmenter=aug)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=loss)
    return model


def test_lambda_zero_gives_duplicates_and_ms_on_duplicated_set():
    x, y = data(12, classes=3)
    model = lam0_model(MultiSimilarityLoss(), copies=2)
    raw = model.encoder(x)["raw"].numpy()
    emb = reference.normalize(raw)
    ids = np.arange(12)
    s_emb, s_lab, s_ids, _ = model.augmenter.synthesize(raw, y, ids)
    np.testing.assert_allclose(s_emb.numpy(), np.tile(emb, (2, 1)), atol=1e-6)
    # Explicitly duplicated set, with the IAA mask rule.
    ref = np.concatenate([emb, emb, emb])
    ref_y = np.tile(y, 3)
    ref_ids = np.tile(ids, 3)
    want = reference.multi_similarity(emb, y, ref, ref_y, ids, ref_ids)
    got = MultiSimilarityLoss().per_anchor(
        emb.astype(np.float32),
        y,
        References(
            np.concatenate([emb, s_emb.numpy()]).astype(np.float32),
            np.concatenate([y, s_lab.numpy()]),
            np.concatenate([ids, s_ids.numpy()]),
        ),
        ids,
    )
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    # The same through DMLModel's train step (ids start at 0).
    logs = model.train_on_batch(x, y, return_dict=True)
    np.testing.assert_allclose(logs["loss"], want.mean(), rtol=1e-5)
    # And duplicates really change MS compared to the plain batch.
    plain = reference.multi_similarity(emb, y, ids=ids)
    assert abs(plain.mean() - want.mean()) > 1e-3


def test_empirical_std_paper_and_official_patterns():
    est = IAAEstimator(2, 3)
    var = np.array([[0.09, 1.0, 4.0], [0.25, 0.5, 2.0]], np.float32)
    est.sampling_variance.assign(var)
    n = 6000
    labels = np.arange(n) % 2
    raw = np.random.default_rng(5).normal(size=(n, 3)).astype(np.float32)
    lam = 0.6
    for official in (False, True):
        aug = IAAugmenter(
            est, num_copies=3, lam=lam, seed=1, official_code=official
        )
        diff = aug.sample(raw, labels).numpy() - raw[None]
        for m in range(3):
            for c in range(2):
                std = diff[m, labels == c].std(0)
                p = 0.5 ** (m + 1) if official else 0.5
                want = np.sqrt(lam) * var[c] ** p
                np.testing.assert_allclose(std, want, rtol=0.05)
                assert abs(diff[m, labels == c].mean(0)).max() < 0.1
    # Copies are independent draws, and every step draws new noise.
    a = aug.sample(raw[:4], labels[:4]).numpy()
    b = aug.sample(raw[:4], labels[:4]).numpy()
    assert not np.allclose(a[0], a[1]) and not np.allclose(a, b)


def test_gradient_flows_through_z_not_sigma():
    est = fitted_estimator()
    aug = IAAugmenter(est, num_copies=2, lam=0.5, seed=3)
    raw = tf.Variable(
        np.random.default_rng(0).normal(size=(4, DIM)).astype("f")
    )
    target = np.random.default_rng(1).normal(size=(8, DIM)).astype("f")
    with tf.GradientTape() as tape:
        emb, *_ = aug.synthesize(raw, [0, 1, 2, 3], [0, 1, 2, 3])
        value = tf.reduce_sum(emb * target)
    g_raw, g_var = tape.gradient(value, [raw, est.sampling_variance])
    assert g_var is None
    # d/dz of normalize(z + c) at fixed noise c, checked numerically.
    aug2 = IAAugmenter(est, num_copies=2, lam=0.5, seed=3)
    r = raw.numpy().astype(np.float64)

    def f(r_):
        aug2.step.assign(0)
        e, *_ = aug2.synthesize(r_.astype("f"), [0, 1, 2, 3], [0, 1, 2, 3])
        return float(np.sum(e.numpy() * target))

    h = 1e-2
    fd = np.zeros_like(r)
    for idx in np.ndindex(r.shape):
        up, dn = r.copy(), r.copy()
        up[idx] += h
        dn[idx] -= h
        fd[idx] = (f(up) - f(dn)) / (2 * h)
    np.testing.assert_allclose(g_raw.numpy(), fd, rtol=2e-2, atol=2e-3)


def test_xla_synthesis_matches_eager():
    est = fitted_estimator()
    raw = np.random.default_rng(0).normal(size=(8, DIM)).astype("f")
    labels = np.arange(8, dtype=np.int32) % 4
    ids = np.arange(8, dtype=np.int32)
    outs = []
    for jit in (None, False, True):
        aug = IAAugmenter(est, num_copies=3, lam=0.7, seed=11)
        fn = aug.synthesize
        if jit is not None:
            fn = tf.function(aug.synthesize, jit_compile=jit)
        outs.append([fn(raw, labels, ids) for _ in range(2)])
    for other in outs[1:]:
        for step in range(2):
            for a, b in zip(outs[0][step], other[step]):
                np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


def test_disabled_augmenter_adds_no_rows():
    est = IAAEstimator(4, DIM)
    aug = IAAugmenter(est, enabled=False)
    emb, lab, ids, owner = aug.synthesize(
        np.ones((3, DIM), "f"), [0, 1, 2], [0, 1, 2]
    )
    assert emb.shape == (0, DIM) and lab.shape == (0,) and ids.shape == (0,)


# --- 4. every pair loss, memory, fit, XLA -----------------------------------


@pytest.mark.parametrize("name", ["ms", "contrastive", "triplet"])
def test_every_pair_loss_with_memory_fit_xla_matches_eager(name):
    loss_cls = all_losses()[name]
    x, y = data(32, classes=4)
    histories = []
    for jit in (False, True):
        keras.utils.set_random_seed(0)
        est = IAAEstimator(4, DIM)
        aug = IAAugmenter(est, num_copies=2, lam=0.8, seed=5)
        model = DMLModel(
            dense_encoder(), memory=CrossBatchMemory(20, DIM), augmenter=aug
        )
        model.compile(
            optimizer=keras.optimizers.SGD(0.05),
            loss=loss_cls(),
            jit_compile=jit,
        )
        refresh = IAARefresh(
            tf.data.Dataset.from_tensor_slices((x, y)).batch(8),
            start_epoch=1,
            every_n_epochs=1,
        )
        hist = model.fit(
            x,
            y,
            batch_size=8,
            epochs=2,
            shuffle=False,
            verbose=0,
            callbacks=[refresh],
        )
        assert refresh.refreshed_epochs == [1]
        assert aug.enabled and int(aug.step.numpy()) == 4  # epoch 2 only
        histories.append((hist.history["loss"], model.encoder.get_weights()))
    (l0, w0), (l1, w1) = histories
    assert np.isfinite(l0).all()
    np.testing.assert_allclose(l0, l1, rtol=1e-4, atol=1e-6)
    for a, b in zip(w0, w1):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["contrastive", "triplet"])
def test_other_losses_on_synthetic_rows_equal_explicit_references(name):
    loss = all_losses()[name]()
    model = lam0_model(loss, memory=CrossBatchMemory(6, DIM), copies=2)
    x, y = data(12, classes=3)
    emb = model.encoder(x)["embeddings"].numpy()
    ids = np.arange(12)
    ref = np.concatenate([emb, emb, emb]).astype("f")
    want = loss.per_anchor(
        emb, y, References(ref, np.tile(y, 3), np.tile(ids, 3)), ids
    ).numpy()
    logs = model.train_on_batch(x, y, return_dict=True)
    np.testing.assert_allclose(logs["loss"], want.mean(), rtol=1e-5)


# --- refresh callback ------------------------------------------------------


def test_refresh_callback_schedule_estimate_and_lambda():
    x, y = data(24, classes=4)
    est = IAAEstimator(4, DIM)
    aug = IAAugmenter(est, lam=0.8, official_code=True)
    model = DMLModel(dense_encoder(), augmenter=aug)
    model.compile(optimizer="sgd", loss=MultiSimilarityLoss())
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    paper = IAARefresh(ds, official_code=False, paper_schedule=True)
    official = IAARefresh(ds, epochs=100)
    default = IAARefresh(ds, official_code=False, epochs=10)
    from_fit = IAARefresh(ds, official_code=False)
    for cb in (paper, official, default, from_fit):
        cb.set_model(model)
    assert [e for e in range(12) if paper.should_refresh(e)] == [0, 4, 8]
    # Default: after 30 % of the budget, then every 2 epochs.
    assert [e for e in range(10) if default.should_refresh(e)] == [3, 5, 7, 9]
    from_fit.set_params({"epochs": 100})
    assert from_fit.start_epoch == 30 and from_fit.every_n_epochs == 2
    assert [e for e in range(36) if official.should_refresh(e)] == [
        30,
        32,
        34,
    ]
    official.on_train_begin()
    assert not aug.enabled  # nothing estimated yet: the plain step
    official.on_epoch_begin(0)
    assert not aug.enabled and not est.estimated
    np.testing.assert_allclose(aug.lam.numpy(), 0.8)
    official.on_epoch_begin(50)
    np.testing.assert_allclose(aug.lam.numpy(), 0.8 * 0.9, rtol=1e-6)
    official.on_epoch_begin(30)  # code epoch 31: first estimate
    assert aug.enabled and est.estimated
    raw = model.encoder(x, training=False)["raw"].numpy()
    _, _, var = np_pass_stats(raw, y, 4)
    np.testing.assert_allclose(est.variance.numpy(), var, rtol=1e-4)
    assert [official_lambda(1.0, e, 100) for e in (40, 41, 60, 61, 80, 81)] == [
        1.0,
        0.9,
        0.9,
        0.75,
        0.75,
        0.6,
    ]


# --- checkpoints, config, errors ------------------------------------------


def test_checkpoint_save_restore_estimator_state(tmp_path):
    def build():
        est = IAAEstimator(4, DIM, correction_threshold=2, num_neighbors=2)
        aug = IAAugmenter(est, lam=0.5, seed=1)
        model = DMLModel(dense_encoder(), augmenter=aug)
        model.compile(optimizer="sgd", loss=MultiSimilarityLoss())
        return model

    model = build()
    est = model.augmenter.estimator
    x, y = data(24, classes=4)
    est.update(model.encoder(x)["raw"], y)
    model.augmenter.lam.assign(0.3)
    model.augmenter.step.assign(7)
    names = [v.path for v in model.non_trainable_variables]
    assert any("sampling_variance" in n for n in names)
    path = str(tmp_path / "w.weights.h5")
    model.save_weights(path)
    ckpt_dir = str(tmp_path / "ckpt")
    tf.train.Checkpoint(model=model).write(ckpt_dir)
    for restore in ("h5", "tf"):
        other = build()
        if restore == "h5":
            other.load_weights(path)
        else:
            tf.train.Checkpoint(model=other).read(ckpt_dir).assert_consumed()
        o = other.augmenter.estimator
        for name in (
            "mean",
            "variance",
            "amount",
            "counts",
            "sampling_variance",
            "neighbor_variance",
            "global_variance",
            "class_weight",
            "num_updates",
        ):
            np.testing.assert_array_equal(
                getattr(o, name).numpy(), getattr(est, name).numpy()
            )
        assert o.estimated
        np.testing.assert_allclose(other.augmenter.lam.numpy(), 0.3)
        assert int(other.augmenter.step.numpy()) == 7


def test_config_roundtrip():
    est = IAAEstimator(7, 3, momentum=0.3, num_neighbors=5, official_code=True)
    aug = IAAugmenter(est, num_copies=2, lam=0.6, seed=9)
    clone = IAAugmenter.from_config(aug.get_config())
    assert clone.get_config() == aug.get_config()
    assert clone.estimator.get_config() == est.get_config()
    assert clone.official_code and clone.estimator.num_neighbors == 5
    spec = keras.saving.serialize_keras_object(aug)
    assert spec["registered_name"] == "tfdml>IAAugmenter"
    assert isinstance(keras.saving.deserialize_keras_object(spec), IAAugmenter)


@pytest.mark.parametrize(
    "make, arg",
    [
        (lambda: IAAEstimator(0, 3), "num_classes"),
        (lambda: IAAEstimator(3, 0), "dim"),
        (lambda: IAAEstimator(3, 3, momentum=1.5), "momentum"),
        (lambda: IAAEstimator(3, 3, gamma=-0.1), "gamma"),
        (lambda: IAAEstimator(3, 3, sigma_m=0), "sigma_m"),
        (lambda: IAAugmenter(IAAEstimator(3, 3), num_copies=0), "num_copies"),
        (lambda: IAAugmenter(IAAEstimator(3, 3), lam=-1), "lam"),
        (lambda: IAAugmenter("x"), "estimator"),
        (
            lambda: IAAEstimator(3, 3).update(np.ones((4, 3)), [0, 1, 2, 7]),
            "label ids",
        ),
        (lambda: IAAEstimator(3, 3).update(np.ones((2, 3)), [0.5, 1]), "int"),
        (lambda: IAARefresh([], max_per_class=0), "max_per_class"),
        (lambda: IAARefresh([], bn_mode="eval"), "bn_mode"),
        (lambda: IAARefresh([], start_fraction=1.5), "start_fraction"),
        (lambda: IAAEstimator(3, 3).update(np.ones((2, 4)), [0, 1]), "raw"),
        (lambda: IAARefresh([], every_n_epochs=0), "every_n_epochs"),
        (lambda: official_lambda(0.8, 1, 0), "epochs"),
    ],
)
def test_bad_arguments_raise(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()
