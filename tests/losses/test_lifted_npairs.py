"""LiftedStructureLoss (Song / generalised) and NPairsLoss vs references."""

import functools

import numpy as np
import pytest
import tensorflow as tf

from tests import reference
from tests.conftest import edge_batches
from tests.losses import pair_loss_checks as checks
from tfdml.losses import LiftedStructureLoss
from tfdml.losses import NPairsLoss
from tfdml.losses.npairs import first_of_each_class

CASES = {
    "lifted_song": (LiftedStructureLoss, {}),
    "lifted_song_margins": (
        LiftedStructureLoss,
        dict(neg_margin=0.5, pos_margin=0.1),
    ),
    "lifted_generalized": (LiftedStructureLoss, dict(form="generalized")),
    "lifted_generalized_margins": (
        LiftedStructureLoss,
        dict(form="generalized", neg_margin=1.5, pos_margin=0.2),
    ),
    "npairs": (NPairsLoss, {}),
    "npairs_unnormalized": (NPairsLoss, dict(normalize=False)),
}


def build(case):
    cls, kwargs = CASES[case]
    if cls is NPairsLoss:
        ref_fn = functools.partial(
            reference.npairs, normalize=kwargs.get("normalize", True)
        )
    else:
        ref_fn = functools.partial(reference.lifted_structure, **kwargs)
    return cls(**kwargs), ref_fn


PAIRS = checks.case_batch_params(
    CASES, full=("lifted_song", "lifted_generalized", "npairs")
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
    "case", ["lifted_song_margins", "lifted_generalized", "npairs"], ids=str
)
def test_gradient_matches_finite_differences(case):
    checks.check_gradient_vs_finite_differences(*build(case))


@pytest.mark.parametrize(
    "case", ["lifted_song", "lifted_generalized", "npairs"]
)
def test_no_valid_pairs_is_zero_with_finite_grad(case):
    checks.check_no_pairs_zero_finite_grad(build(case)[0])


@pytest.mark.parametrize(
    "case", ["lifted_song", "lifted_generalized", "npairs"]
)
def test_graph_and_xla_match_eager(case):
    checks.check_xla_matches_eager(build(case)[0])


@pytest.mark.parametrize("case", ["lifted_song", "npairs"])
def test_model_fit_smoke(case):
    checks.check_model_fit_smoke(build(case)[0])


@pytest.mark.parametrize("case", ["lifted_song", "npairs"])
def test_float16_close_to_float32(case):
    checks.check_float16_close(build(case)[0], atol=5e-2)


@pytest.mark.parametrize("case", ["npairs"])
def test_bad_inputs_raise(case):
    checks.check_bad_inputs(build(case)[0])


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(neg_margin=-1.0), "neg_margin"),
        (dict(pos_margin=-0.1), "pos_margin"),
        (dict(form="smooth"), "form"),
    ],
    ids=["neg_margin", "pos_margin", "form"],
)
def test_lifted_bad_hyperparameters_raise(kwargs, word):
    with pytest.raises(ValueError, match=word):
        LiftedStructureLoss(**kwargs)


def test_song_form_equals_paper_batch_formula():
    # 1/(2|P|) Σ_{(i,j)∈P} max(0, J_ij)^2 over ordered positive pairs.
    emb, labels = edge_batches()["seeded"]
    d = reference.unit_distance(emb)
    n = len(labels)
    total, count = 0.0, 0
    for i in range(n):
        for j in range(n):
            if i != j and labels[i] == labels[j]:
                negs = [
                    1.0 - d[i, k] for k in range(n) if labels[k] != labels[i]
                ]
                negs += [
                    1.0 - d[j, k] for k in range(n) if labels[k] != labels[j]
                ]
                jij = np.log(np.exp(negs).sum()) + d[i, j]
                total += max(0.0, jij) ** 2
                count += 1
    got = float(LiftedStructureLoss()(labels, emb))
    np.testing.assert_allclose(got, total / (2 * count), rtol=1e-5)


def test_first_of_each_class():
    labels = tf.constant([3, 1, 3, 2, 1, 2, 5])
    valid = tf.constant([False, True, True, True, True, True, False])
    got = first_of_each_class(labels, valid).numpy()
    np.testing.assert_array_equal(got, [0, 1, 1, 1, 0, 0, 0])


def test_npairs_sohn_n_pair_batch():
    # Sohn's batch: one (anchor, positive) pair per class. Anchor i (the first
    # of its pair) has the negatives: the first element of every other pair.
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(6, 4)).astype(np.float32)
    labels = np.array([0, 0, 1, 1, 2, 2], np.int32)
    s = reference.cosine(emb)
    want = np.zeros(6)
    for i in range(6):
        p = i + 1 if i % 2 == 0 else i - 1
        reps = [k for k in (0, 2, 4) if labels[k] != labels[i]]
        want[i] = np.log1p(sum(np.exp(s[i, k] - s[i, p]) for k in reps))
    got = NPairsLoss(reduction=None)(labels, emb).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
