"""``References``: the typed reference set of ``PairLoss.per_anchor``.

The new form ``per_anchor(emb, labels, References(...), ids)`` against the
float64 NumPy references of ``tests/reference.py``; the deprecated forms
(the old positional order and the ``ref_*`` keywords) give the same values
with a ``DeprecationWarning``; bad reference sets raise ``ValueError``.
"""

import warnings

import numpy as np
import pytest
import tensorflow as tf

from tests import reference
from tfdml.losses import ContrastiveLoss
from tfdml.losses import MultiSimilarityLoss
from tfdml.losses import NPairsLoss
from tfdml.losses import References
from tfdml.losses import SupConLoss
from tfdml.losses import TripletSemiHardLoss
from tfdml.losses import WeightedContrastiveLoss
from tfdml.memory import CrossBatchMemory

RTOL, ATOL = 1e-5, 1e-6


def case(seed=0, b=8, m=12, dim=6):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(b, dim)).astype(np.float32)
    labels = (np.arange(b) % 3).astype(np.int32)
    ref = np.concatenate(
        [emb, rng.normal(size=(m - b, dim)).astype(np.float32)]
    )
    ref_labels = np.concatenate(
        [labels, rng.integers(0, 3, m - b).astype(np.int32)]
    )
    ids = np.arange(b, dtype=np.int32)
    ref_ids = np.arange(m, dtype=np.int32)  # the first b refs are the batch
    valid = np.ones(m, bool)
    valid[-1] = False
    return emb, labels, ids, References(ref, ref_labels, ref_ids, valid)


def ms_reference(emb, labels, ids, refs):
    keep = refs.valid
    return reference.multi_similarity(
        emb,
        labels,
        refs.embeddings[keep],
        refs.labels[keep],
        ids,
        refs.ids[keep],
    )


def test_references_against_numpy_reference():
    emb, labels, ids, refs = case()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        got = MultiSimilarityLoss().per_anchor(emb, labels, refs, ids)
        keyword = MultiSimilarityLoss().per_anchor(
            emb, labels, refs=refs, ids=ids
        )
    want = ms_reference(emb, labels, ids, refs)
    np.testing.assert_allclose(got.numpy(), want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(keyword.numpy(), want, rtol=RTOL, atol=ATOL)


def test_references_defaults_and_tuple_unpacking():
    emb, labels, _, refs = case()
    plain = References(refs.embeddings, refs.labels)
    assert plain.ids is None and plain.valid is None
    e, y, i, v = refs
    assert e is refs.embeddings and v is refs.valid
    got = MultiSimilarityLoss().per_anchor(emb, labels, plain)
    want = reference.multi_similarity(emb, labels, refs.embeddings, refs.labels)
    np.testing.assert_allclose(got.numpy(), want, rtol=RTOL, atol=ATOL)


LOSSES = {
    "ms": MultiSimilarityLoss,
    "contrastive_fused": ContrastiveLoss,
    "npairs": NPairsLoss,
    "osm": WeightedContrastiveLoss,
    "tfa_semihard": TripletSemiHardLoss,
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_deprecated_forms_equal_references(name):
    """Every per_anchor override maps the old arguments onto References."""
    emb, labels, ids, refs = case()
    loss = LOSSES[name]()
    context = {}
    if name == "osm":
        context = {
            "probs": np.full(8, 0.7, np.float32),
            "ref_probs": np.full(12, 0.6, np.float32),
        }
    new = loss.per_anchor(emb, labels, refs, ids, **context).numpy()
    old_forms = {
        "positional": lambda: loss.per_anchor(
            emb, labels, *refs[:2], ids, *refs[2:], **context
        ),
        "keywords": lambda: loss.per_anchor(
            emb,
            labels,
            ref_embeddings=refs.embeddings,
            ref_labels=refs.labels,
            ids=ids,
            ref_ids=refs.ids,
            ref_valid=refs.valid,
            **context,
        ),
        "mixed": lambda: loss.per_anchor(
            emb,
            labels,
            refs.embeddings,
            refs.labels,
            ids,
            ref_ids=refs.ids,
            ref_valid=refs.valid,
            **context,
        ),
    }
    for form, call in old_forms.items():
        with pytest.warns(DeprecationWarning, match="References"):
            old = call().numpy()
        np.testing.assert_allclose(old, new, rtol=1e-6, err_msg=form)


def test_old_positional_pair_weights():
    emb, labels, ids, refs = case()
    w = np.random.default_rng(1).random((8, 12)).astype(np.float32)
    loss = MultiSimilarityLoss()
    new = loss.per_anchor(emb, labels, refs, ids, pair_weights=w).numpy()
    with pytest.warns(DeprecationWarning):
        old = loss.per_anchor(emb, labels, *refs[:2], ids, *refs[2:], w)
    np.testing.assert_allclose(old.numpy(), new, rtol=1e-6)
    with pytest.warns(DeprecationWarning):  # two positional + keyword
        two = loss.per_anchor(emb, labels, *refs[:2], pair_weights=w)
    want = loss.per_anchor(emb, labels, References(*refs[:2]), pair_weights=w)
    np.testing.assert_allclose(two.numpy(), want.numpy(), rtol=1e-6)
    assert not np.allclose(two.numpy(), loss.per_anchor(emb, labels).numpy())


def test_bad_reference_sets_raise():
    emb, labels, ids, refs = case()
    loss = MultiSimilarityLoss()
    with pytest.raises(ValueError, match="refs.labels"):
        loss.per_anchor(emb, labels, References(refs.embeddings, None))
    with pytest.raises(ValueError, match="not both"):
        loss.per_anchor(emb, labels, refs, ref_valid=refs.valid)
    with pytest.raises(ValueError, match="ref_labels"):
        loss.per_anchor(emb, labels, References(refs.embeddings, labels))
    with pytest.raises(TypeError, match="too many"):
        loss.per_anchor(emb, labels, refs, ids, None, refs.valid)


def test_memory_per_anchor_takes_references():
    emb, labels, ids, _ = case()
    memory = CrossBatchMemory(9, 6)  # 3 empty slots
    rng = np.random.default_rng(3)
    memory.enqueue(
        rng.normal(size=(6, 6)).astype(np.float32),
        rng.integers(0, 3, 6).astype(np.int32),
        np.arange(100, 106, dtype=np.int32),
    )
    stored = memory.references()
    assert isinstance(stored, References)
    refs = References(
        *(
            tf.concat([a, b], 0)
            for a, b in zip((emb, labels, ids, tf.ones([8], tf.bool)), stored)
        )
    )
    loss = MultiSimilarityLoss()
    got = memory.per_anchor(loss, emb, labels, ids, refs).numpy()
    keep = refs.valid.numpy()
    assert keep.sum() == 8 + 6
    want = reference.multi_similarity(
        emb,
        labels,
        refs.embeddings.numpy()[keep],
        refs.labels.numpy()[keep],
        ids,
        refs.ids.numpy()[keep],
    )
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    with pytest.warns(DeprecationWarning, match="References"):
        old = memory.per_anchor(loss, emb, labels, ids, *refs)
    np.testing.assert_allclose(old.numpy(), got, rtol=1e-6)
    with pytest.raises(TypeError, match="References"):
        memory.per_anchor(loss, emb, labels, ids, refs.embeddings)
    # A loss that every valid reference enters (the empty slots would too):
    # the memory path equals the loss on the valid rows only, in both forms.
    supcon = SupConLoss()
    valid_only = References(*(t.numpy()[keep] for t in refs[:3]))
    want = supcon.per_anchor(emb, labels, valid_only, ids).numpy()
    got = memory.per_anchor(supcon, emb, labels, ids, refs).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    with pytest.warns(DeprecationWarning):
        old = memory.per_anchor(supcon, emb, labels, ids, *refs).numpy()
    np.testing.assert_allclose(old, want, rtol=1e-5)
