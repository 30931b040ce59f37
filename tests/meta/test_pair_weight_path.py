"""One path for per-pair weights (issue 14).

``PairLoss.per_anchor(..., pair_weights=)`` -> ``pair_loss`` is the path;
MMSI's W-forms weight the pairs of a fixed selection with the same pure
functions. A G-form without per-pair terms (the triplet base) refuses
weights instead of silently dropping them.
"""

import numpy as np
import pytest
import tensorflow as tf

from tfdml.meta import MMSIContrastiveLoss
from tfdml.meta import MMSIMultiSimilarityLoss
from tfdml.meta import MMSITripletLoss


def case():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(8, 5)).astype(np.float32)
    labels = (np.arange(8) % 3).astype(np.int32)
    w = rng.random((8, 8)).astype(np.float32)
    return emb, labels, w


def test_triplet_g_form_refuses_pair_weights():
    emb, labels, w = case()
    loss = MMSITripletLoss(margin=0.5)
    plain = loss.per_anchor(emb, labels)
    assert np.all(np.isfinite(plain.numpy()))
    with pytest.raises(ValueError, match="pair_weights"):
        loss.per_anchor(emb, labels, pair_weights=w)


@pytest.mark.parametrize(
    "cls", [MMSIContrastiveLoss, MMSIMultiSimilarityLoss], ids=["c", "ms"]
)
def test_g_forms_apply_pair_weights(cls):
    emb, labels, w = case()
    loss = cls()
    plain = loss.per_anchor(emb, labels).numpy()
    ones = loss.per_anchor(emb, labels, pair_weights=np.ones_like(w))
    np.testing.assert_allclose(ones.numpy(), plain, rtol=1e-6)
    zero = loss.per_anchor(emb, labels, pair_weights=tf.zeros_like(w))
    assert not np.allclose(zero.numpy(), plain)
