"""ContrastiveLoss (distance and similarity forms) vs the NumPy reference."""

import functools
import importlib

import numpy as np
import pytest
import tensorflow as tf

from tests import reference
from tests.conftest import edge_batches
from tests.losses import pair_loss_checks as checks
from tfdml.losses import ContrastiveLoss
from tfdml.losses import References
from tfdml.mining import HardestMiner

CASES = {
    "distance_default": {},
    "distance_margins_sq": dict(pos_margin=0.2, neg_margin=1.2, power=2.0),
    "distance_mean": dict(pair_reduction="mean"),
    "distance_pml": dict(pair_reduction="pml"),
    "similarity_default": dict(form="similarity"),
    "similarity_avg_nonzero": dict(
        form="similarity",
        pos_margin=0.9,
        neg_margin=0.3,
        pair_reduction="avg_nonzero",
    ),
}
RESOLVED = {
    "distance": (0.0, 1.0, "avg_nonzero"),
    "similarity": (0.8, 0.5, "sum"),
}


def build(case):
    kwargs = CASES[case]
    loss = ContrastiveLoss(**kwargs)
    pm, nm, red = RESOLVED[kwargs.get("form", "distance")]
    ref_fn = functools.partial(
        reference.contrastive,
        pos_margin=kwargs.get("pos_margin", pm),
        neg_margin=kwargs.get("neg_margin", nm),
        form=kwargs.get("form", "distance"),
        power=kwargs.get("power", 1.0),
        pair_reduction=kwargs.get("pair_reduction", red),
    )
    return loss, ref_fn


PAIRS = checks.case_batch_params(
    CASES, full=("distance_default", "similarity_default")
)


@pytest.mark.parametrize("case, batch", PAIRS, ids=checks.ids(PAIRS))
def test_matches_reference(case, batch):
    loss, ref_fn = build(case)
    emb, labels = edge_batches()[batch]
    checks.check_matches_reference(loss, ref_fn, emb, labels)


@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_reference_set_of_another_size(case):
    checks.check_reference_set(*build(case))


@pytest.mark.parametrize(
    "case",
    ["distance_margins_sq", "similarity_default", "distance_pml"],
    ids=str,
)
def test_gradient_matches_finite_differences(case):
    checks.check_gradient_vs_finite_differences(*build(case))


@pytest.mark.parametrize(
    "case", ["distance_default", "similarity_default"], ids=str
)
def test_no_valid_pairs_is_zero_with_finite_grad(case):
    checks.check_no_pairs_zero_finite_grad(build(case)[0])


@pytest.mark.parametrize(
    "case", ["distance_default", "similarity_default"], ids=str
)
def test_graph_and_xla_match_eager(case):
    checks.check_xla_matches_eager(build(case)[0])


def test_model_fit_smoke():
    checks.check_model_fit_smoke(ContrastiveLoss())


def test_float16_close_to_float32():
    checks.check_float16_close(ContrastiveLoss(form="similarity"))


def test_sample_weight_scales_per_anchor():
    checks.check_sample_weight(ContrastiveLoss())


def test_bad_inputs_raise():
    checks.check_bad_inputs(ContrastiveLoss())


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(pos_margin=-0.1), "pos_margin"),
        (dict(neg_margin=-1.0), "neg_margin"),
        (dict(form="similarity", neg_margin=-0.5), "neg_margin"),
        (dict(form="similarity", pos_margin=1.5), "pos_margin"),
        (dict(form="angle"), "form"),
        (dict(pair_reduction="median"), "pair_reduction"),
        (dict(power=0.0), "power"),
    ],
    ids=[
        "neg_pos_margin",
        "neg_neg_margin",
        "sim_neg_margin",
        "sim_big",
        "form",
        "reduction",
        "power",
    ],
)
def test_bad_hyperparameters_raise(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ContrastiveLoss(**kwargs)


def test_similarity_form_is_iaa_code_value():
    # IAA code: (1/n) Σ_i [Σ_{pos, S<0.8} (0.8 - S) + Σ_{neg, S>0.5} (S - 0.5)].
    emb, labels = edge_batches()["seeded"]
    sim = reference.cosine(emb)
    n = len(labels)
    total = 0.0
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            if labels[i] == labels[j] and sim[i, j] < 0.8:
                total += 0.8 - sim[i, j]
            if labels[i] != labels[j] and sim[i, j] > 0.5:
                total += sim[i, j] - 0.5
    got = float(ContrastiveLoss(form="similarity")(labels, emb))
    np.testing.assert_allclose(got, total / n, rtol=1e-5)


def test_pml_reduction_equals_batch_avg_nonzero():
    emb, labels = edge_batches()["seeded"]
    d = reference.unit_distance(emb)
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(len(labels), dtype=bool)
    pos = np.maximum(d[same & off], 0.0)
    neg = np.maximum(1.0 - d[~same], 0.0)
    want = pos[pos > 0].mean() + neg[neg > 0].mean()
    got = float(ContrastiveLoss(pair_reduction="pml")(labels, emb))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_miner_narrows_pairs():
    emb, labels = edge_batches()["seeded"]
    loss = ContrastiveLoss(form="similarity", miner=HardestMiner())
    sim = reference.cosine(emb)
    lists = reference.pos_neg_lists(labels)
    pos_set, neg_set = reference.mine_hardest(sim, lists)
    want = np.zeros(len(labels))
    for i, j in pos_set:
        want[i] += max(0.0, 0.8 - sim[i, j])
    for i, k in neg_set:
        want[i] += max(0.0, sim[i, k] - 0.5)
    got = ContrastiveLoss.from_config({**loss.get_config(), "reduction": None})(
        labels, emb
    ).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_pair_weights_multiply_pair_losses():
    emb, labels = edge_batches()["seeded"]
    loss = ContrastiveLoss(form="similarity")
    w = np.random.default_rng(0).random((len(labels), len(labels)))
    got = loss.per_anchor(emb, labels, pair_weights=w.astype(np.float32))
    sim = reference.cosine(emb)
    want = np.zeros(len(labels))
    for i, (pos, neg) in enumerate(reference.pos_neg_lists(labels)):
        want[i] = sum(w[i, j] * max(0, 0.8 - sim[i, j]) for j in pos) + sum(
            w[i, k] * max(0, sim[i, k] - 0.5) for k in neg
        )
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


# -- the fused path (XLA forward + matmul-only custom gradient) -------------


def _value_and_grad(loss, emb, labels, ref=None, ref_labels=None, valid=None):
    e = tf.constant(emb)
    r = None if ref is None else tf.constant(ref)
    weights = tf.constant(np.linspace(0.5, 2.0, len(labels)), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(e)
        if r is not None:
            tape.watch(r)
        refs = None if r is None else References(r, ref_labels, valid=valid)
        per = loss.per_anchor(e, labels, refs)
        # Non-uniform upstream gradients: the row scaling of the backward
        # pass must be the anchor's own.
        total = tf.reduce_sum(per * weights)
    grads = tape.gradient(total, [e] if r is None else [e, r])
    return [per.numpy()] + [g.numpy() for g in grads]


def _generic(case):
    loss = build(case)[0]
    loss.fused = False
    return loss


@pytest.mark.parametrize("case, batch", PAIRS, ids=checks.ids(PAIRS))
def test_fused_path_matches_generic_path(case, batch):
    emb, labels = edge_batches()[batch]
    fused = _value_and_grad(build(case)[0], emb, labels)
    generic = _value_and_grad(_generic(case), emb, labels)
    for a, b in zip(fused, generic):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_fused_path_matches_generic_with_reference_set(case):
    emb, labels = edge_batches()["duplicates"]
    ref, ref_labels, valid = checks.reference_set(dim=emb.shape[1])
    ref[0] = emb[0]  # a duplicate of an anchor among the references
    ref_labels[0] = labels[0]
    kwargs = dict(ref_labels=ref_labels, valid=valid)
    fused = _value_and_grad(build(case)[0], emb, labels, ref, **kwargs)
    generic = _value_and_grad(_generic(case), emb, labels, ref, **kwargs)
    for a, b in zip(fused, generic):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_fused_forward_compiled_and_plain_agree_on_a_large_batch(case):
    # B x M above JIT_MIN_PAIRS takes the XLA forward, small batches the
    # plain one; with an unknown batch size a tf.cond chooses at run time.
    contrastive_lib = importlib.import_module("tfdml.losses.contrastive")

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(300, 16)).astype(np.float32)
    emb[1] = emb[0]
    labels = rng.integers(0, 40, size=300).astype(np.int32)
    assert 300 * 300 >= contrastive_lib.JIT_MIN_PAIRS
    fused = _value_and_grad(build(case)[0], emb, labels)
    generic = _value_and_grad(_generic(case), emb, labels)
    for a, b in zip(fused, generic):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    loss = build(case)[0]

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, 16], tf.float32),
            tf.TensorSpec([None], tf.int32),
        ]
    )
    def dynamic(e, y):
        with tf.GradientTape() as tape:
            tape.watch(e)
            per = loss.per_anchor(e, y)
            total = tf.reduce_sum(per * tf.linspace(0.5, 2.0, tf.shape(y)[0]))
        return per, tape.gradient(total, e)

    for n in (300, 20):
        got = [t.numpy() for t in dynamic(emb[:n], labels[:n])]
        want = _value_and_grad(_generic(case), emb[:n], labels[:n])
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_fused_path_is_taken_and_generic_fallbacks():
    from tfdml import ops

    calls = []
    original = ops.similarity_loss

    def spy(*args):
        calls.append(1)
        return original(*args)

    emb, labels = edge_batches()["seeded"]
    ops.similarity_loss = spy
    try:
        ContrastiveLoss().per_anchor(emb, labels)
        assert len(calls) == 1
        ContrastiveLoss(miner=HardestMiner()).per_anchor(emb, labels)
        w = np.ones((len(labels), len(labels)), np.float32)
        ContrastiveLoss().per_anchor(emb, labels, pair_weights=w)
        assert len(calls) == 1
    finally:
        ops.similarity_loss = original
