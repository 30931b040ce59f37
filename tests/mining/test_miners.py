"""Miners vs brute-force set references (tests/reference.py)."""

import numpy as np
import pytest
import tensorflow as tf

from tests import reference
from tests.conftest import edge_batches
from tests.conftest import make_batch
from tfdml.mining import AllPairsMiner
from tfdml.mining import HardestMiner
from tfdml.mining import SemiHardMiner
from tfdml.mining import ThresholdMiner
from tfdml.mining.semi_hard import largest_less
from tfdml.mining.semi_hard import smallest_greater


def batch_masks(emb, labels, ref=None, ref_labels=None, ref_valid=None):
    sim = reference.cosine(emb, ref).astype(np.float32)
    lists = reference.pos_neg_lists(labels, ref_labels, ref_valid=ref_valid)
    pos = np.zeros(sim.shape, bool)
    neg = np.zeros(sim.shape, bool)
    for i, (p, n) in enumerate(lists):
        pos[i, p] = True
        neg[i, n] = True
    return sim, pos, neg, lists


def as_set(mask):
    return {tuple(int(v) for v in ij) for ij in np.argwhere(np.asarray(mask))}


def scenarios():
    out = dict(edge_batches())
    ref_emb, ref_labels = make_batch(9, classes=5, per_class=3)
    valid = np.ones(len(ref_labels), bool)
    valid[[0, 4]] = False
    out["reference_set"] = (
        make_batch(2)[0],
        make_batch(2)[1],
        ref_emb,
        ref_labels,
        valid,
    )
    return out


SCENARIOS = scenarios()


def setup(name):
    case = SCENARIOS[name]
    if len(case) == 2:
        return batch_masks(*case)
    emb, labels, ref, ref_labels, valid = case
    return batch_masks(emb, labels, ref, ref_labels, valid)


MINERS = {
    "all": (AllPairsMiner(), None),
    "threshold_sim": (
        ThresholdMiner(pos_threshold=0.6, neg_threshold=0.1),
        dict(pos_threshold=0.6, neg_threshold=0.1, form="similarity"),
    ),
    "threshold_pos_only": (
        ThresholdMiner(pos_threshold=0.4),
        dict(pos_threshold=0.4, form="similarity"),
    ),
    "threshold_dist": (
        ThresholdMiner(pos_threshold=0.8, neg_threshold=1.3, form="distance"),
        dict(pos_threshold=0.8, neg_threshold=1.3, form="distance"),
    ),
}


BASIC = [
    (m, n) for m in MINERS for n in ("seeded", "duplicates", "reference_set")
]


@pytest.mark.parametrize(
    "miner, name", BASIC, ids=[f"{m}-{n}" for m, n in BASIC]
)
def test_basic_miners_match_reference(miner, name):
    sim, pos, neg, lists = setup(name)
    obj, kwargs = MINERS[miner]
    got_p, got_n = obj(tf.constant(sim), tf.constant(pos), tf.constant(neg))
    if kwargs is None:
        want_p, want_n = as_set(pos), as_set(neg)
    else:
        want_p, want_n = reference.mine_threshold(
            sim.astype(np.float64), lists, **kwargs
        )
    assert as_set(got_p.numpy()) == want_p
    assert as_set(got_n.numpy()) == want_n


@pytest.mark.parametrize("name", list(SCENARIOS), ids=str)
@pytest.mark.parametrize(
    "margin, form",
    [
        (0.2, "distance"),
        (0.5, "distance"),
        (0.3, "similarity"),
        (0.0, "distance"),
    ],
    ids=["d0.2", "d0.5", "s0.3", "d0"],
)
def test_semi_hard_matches_brute_force(name, margin, form):
    sim, pos, neg, lists = setup(name)
    got_p, got_n = SemiHardMiner(margin=margin, form=form)(sim, pos, neg)
    want_p, want_n = reference.mine_semi_hard(
        sim.astype(np.float64), lists, margin, form
    )
    assert as_set(got_p.numpy()) == want_p
    assert as_set(got_n.numpy()) == want_n


@pytest.mark.parametrize("name", list(SCENARIOS), ids=str)
def test_hardest_matches_reference(name):
    sim, pos, neg, lists = setup(name)
    got_p, got_n = HardestMiner()(sim, pos, neg)
    want_p, want_n = reference.mine_hardest(sim.astype(np.float64), lists)
    assert as_set(got_p.numpy()) == want_p
    assert as_set(got_n.numpy()) == want_n
    # One-hot: at most one pair of each kind per anchor.
    assert got_p.numpy().sum(1).max() <= 1
    assert got_n.numpy().sum(1).max() <= 1


def test_hardest_ties_go_to_lowest_index():
    sim = tf.constant([[0.0, 0.3, 0.3, 0.9, 0.9, 0.1]])
    pos = tf.constant([[False, True, True, False, False, False]])
    neg = tf.constant([[False, False, False, True, True, True]])
    p, n = HardestMiner()(sim, pos, neg)
    np.testing.assert_array_equal(p.numpy(), [[0, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(n.numpy(), [[0, 0, 0, 1, 0, 0]])


def test_hardest_partial_modes_keep_other_side():
    sim, pos, neg, _ = setup("seeded")
    p, n = HardestMiner(negatives=False)(sim, pos, neg)
    np.testing.assert_array_equal(n.numpy(), neg)
    assert p.numpy().sum() == len(pos)


@pytest.mark.parametrize(
    "miner",
    [
        AllPairsMiner(),
        ThresholdMiner(0.5, 0.2),
        SemiHardMiner(),
        HardestMiner(),
    ],
    ids=["all", "threshold", "semi_hard", "hardest"],
)
def test_miners_never_widen_and_run_under_xla(miner):
    sim, pos, neg, _ = setup("reference_set")
    eager = miner(tf.constant(sim), tf.constant(pos), tf.constant(neg))
    xla = tf.function(miner.__call__, jit_compile=True)(
        tf.constant(sim), tf.constant(pos), tf.constant(neg)
    )
    for e, x, full in zip(eager, xla, (pos, neg)):
        np.testing.assert_array_equal(e.numpy(), x.numpy())
        assert not np.any(e.numpy() & ~full)


def test_sorted_search_helpers():
    x = tf.constant([[0.5, 0.1, 0.9, 0.3]])
    mask = tf.constant([[True, True, False, True]])
    q = tf.constant([[0.0, 0.3, 0.4, 0.6]])
    v, e = smallest_greater(x, mask, q)
    np.testing.assert_array_equal(e.numpy(), [[True, True, True, False]])
    np.testing.assert_allclose(v.numpy()[e.numpy()], [0.1, 0.5, 0.5])
    v, e = largest_less(x, mask, q)
    np.testing.assert_array_equal(e.numpy(), [[False, True, True, True]])
    np.testing.assert_allclose(v.numpy()[e.numpy()], [0.1, 0.3, 0.5])


@pytest.mark.parametrize("m", [1, 2, 7, 64, 65])
def test_search_right_under_xla_matches_numpy(m):
    # Under XLA the search is a binary search (tf.searchsorted there would
    # build a [B, N, M] comparison); it must agree with np.searchsorted,
    # ties and out-of-range queries included.
    from tfdml.mining.semi_hard import search_right

    rng = np.random.default_rng(m)
    x = np.sort(rng.integers(-4, 5, (5, m)).astype(np.float32) / 2, axis=1)
    q = rng.integers(-6, 7, (5, 9)).astype(np.float32) / 2
    want = np.stack([np.searchsorted(a, b, side="right") for a, b in zip(x, q)])
    xla = tf.function(search_right, jit_compile=True)
    np.testing.assert_array_equal(xla(x, q).numpy(), want)
    np.testing.assert_array_equal(search_right(x, q).numpy(), want)


def test_smallest_greater_xla_equals_eager_with_ties():
    rng = np.random.default_rng(11)
    x = tf.constant(rng.integers(-3, 4, (6, 40)).astype(np.float32) / 2)
    mask = tf.constant(rng.random((6, 40)) < 0.5)
    q = tf.constant(rng.integers(-4, 5, (6, 30)).astype(np.float32) / 2)

    def run(x, mask, q):
        return smallest_greater(x, mask, q, return_index=True)

    eager = run(x, mask, q)
    xla = tf.function(run, jit_compile=True)(x, mask, q)
    ok = eager[1].numpy()
    np.testing.assert_array_equal(xla[1].numpy(), ok)
    for e, g in zip(eager, xla):
        np.testing.assert_array_equal(e.numpy()[ok], g.numpy()[ok])
    # brute force: the smallest masked entry strictly above each query
    xs, ms, qs = x.numpy(), mask.numpy(), q.numpy()
    for b in range(6):
        for j in range(30):
            above = ms[b] & (xs[b] > qs[b, j])
            assert ok[b, j] == above.any()
            if above.any():
                assert eager[0].numpy()[b, j] == xs[b][above].min()
                first = np.flatnonzero(above & (xs[b] == xs[b][above].min()))
                assert eager[2].numpy()[b, j] == first[0]


@pytest.mark.parametrize(
    "build, word",
    [
        (lambda: ThresholdMiner(form="angle"), "form"),
        (lambda: ThresholdMiner(pos_threshold="x"), "pos_threshold"),
        (
            lambda: ThresholdMiner(neg_threshold=-1.0, form="distance"),
            "neg_threshold",
        ),
        (lambda: SemiHardMiner(margin=-0.1), "margin"),
        (lambda: SemiHardMiner(form="angle"), "form"),
    ],
    ids=[
        "threshold_form",
        "threshold_type",
        "threshold_neg",
        "semi_margin",
        "semi_form",
    ],
)
def test_bad_arguments_raise(build, word):
    with pytest.raises(ValueError, match=word):
        build()


def _tie_scenario():
    """Exact ties: a negative at exactly a positive's closeness, identical
    negatives, a duplicate positive."""
    emb, labels = make_batch(5, classes=4, per_class=3, dim=6)
    emb[4] = emb[1]
    emb[7] = emb[6]
    emb[2] = emb[0]
    return batch_masks(emb, labels)


@pytest.mark.parametrize("name", [*SCENARIOS, "ties"], ids=str)
@pytest.mark.parametrize(
    "margin, form",
    [(0.2, "distance"), (0.0, "distance"), (0.3, "similarity")],
    ids=["d0.2", "d0", "s0.3"],
)
def test_semi_hard_sort_free_matches_sorted_and_brute_force(
    name, margin, form, monkeypatch
):
    from tfdml.mining import semi_hard

    sim, pos, neg, lists = _tie_scenario() if name == "ties" else setup(name)
    miner = SemiHardMiner(margin=margin, form=form)
    dense = [m.numpy() for m in miner(sim, pos, neg)]
    monkeypatch.setattr(semi_hard, "DENSE_MAX_ELEMENTS", 0)  # the sort
    fallback = [m.numpy() for m in miner(sim, pos, neg)]
    xla = tf.function(miner.__call__, jit_compile=True)  # the sort, XLA
    compiled = [m.numpy() for m in xla(sim, pos, neg)]
    want_p, want_n = reference.mine_semi_hard(
        sim.astype(np.float64), lists, margin, form
    )
    for got in (dense, fallback, compiled):
        np.testing.assert_array_equal(got[0], dense[0])
        np.testing.assert_array_equal(got[1], dense[1])
    if name != "ties":  # float64 brute force may split float32 ties
        assert as_set(dense[0]) == want_p
        assert as_set(dense[1]) == want_n
