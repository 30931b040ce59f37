"""Non-finite embeddings give a NaN loss for every PairLoss, never a 0."""

import numpy as np
import pytest

import tfdml.losses  # noqa: F401
from tests.conftest import make_batch
from tfdml import registry
from tfdml.losses.base import PairLoss

LOSSES = sorted(registry.registered(PairLoss))


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_embeddings_give_nan(name, bad):
    loss = registry.registered(PairLoss)[name]()
    emb, labels = make_batch(3)
    emb[2, 1] = bad
    probs = np.full(len(labels), 0.5, np.float32)
    per = loss.per_anchor(emb, labels, probs=probs, ref_probs=probs)
    assert np.all(np.isnan(per.numpy()))
    clean, _ = make_batch(3)
    per = loss.per_anchor(clean, labels, probs=probs, ref_probs=probs)
    assert np.all(np.isfinite(per.numpy()))
