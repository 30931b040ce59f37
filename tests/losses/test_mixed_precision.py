"""Every registered PairLoss on float16 / bfloat16 embeddings.

The losses cast to float32 before similarities and log-sum-exps, so a
half-precision batch gives (a) a float32 result, (b) the float32 result of
the *same rounded values* to float32 round-off, and (c) a result close to the
unrounded float32 batch.
"""

import numpy as np
import pytest
import tensorflow as tf

import tfdml.losses  # noqa: F401  (registers every loss)
from tests.conftest import make_batch
from tfdml import ops
from tfdml import registry
from tfdml.losses import PairLoss

LOSSES = sorted(registry.registered(PairLoss))


def run(loss, emb, labels):
    kw = {}
    if getattr(loss, "requires_probs", False):
        kw["probs"] = tf.constant(
            np.linspace(0.1, 0.9, len(labels)), tf.float32
        )
    x = tf.Variable(emb)
    with tf.GradientTape() as tape:
        per = loss.per_anchor(x, tf.constant(labels), **kw)
        total = tf.reduce_mean(tf.cast(per, tf.float32))
    return per, tape.gradient(total, x)


def test_registry_is_not_empty():
    for name in (
        "MultiSimilarityLoss",
        "BinomialDevianceLoss",
        "CircleLoss",
        "GeneralPairWeightingLoss",
        "WeightedContrastiveLoss",
    ):
        assert name in LOSSES


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", LOSSES)
def test_half_precision_embeddings(name, dtype):
    emb, labels = make_batch(0, classes=4, per_class=4, dim=16)
    loss = registry.registered(PairLoss)[name]()
    half = tf.cast(emb, dtype)
    rounded = tf.cast(half, tf.float32)
    per_half, grad = run(loss, half, labels)
    per_round, _ = run(loss, rounded, labels)
    per_full, _ = run(loss, tf.constant(emb), labels)
    assert per_half.dtype == tf.float32, per_half.dtype
    assert grad.dtype == tf.as_dtype(dtype)
    assert np.all(np.isfinite(grad.numpy().astype(np.float32)))
    # (b) float32 internally: same numbers as the float32 run on the
    # rounded values
    np.testing.assert_allclose(
        per_half.numpy(), per_round.numpy(), rtol=1e-5, atol=1e-6
    )
    # (c) close to float32 (input rounding only: 2^-11 or 2^-8 relative)
    tol = 2e-2 if dtype == "float16" else 1.5e-1
    np.testing.assert_allclose(
        per_half.numpy().mean(), per_full.numpy().mean(), rtol=tol, atol=tol
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_similarity_and_logsumexp_are_float32(dtype):
    emb, _ = make_batch(1, dim=16)
    half = tf.cast(emb, dtype)
    sim = ops.cosine_similarity(half)
    assert sim.dtype == tf.float32
    np.testing.assert_allclose(
        sim.numpy(),
        ops.cosine_similarity(tf.cast(half, tf.float32)).numpy(),
        rtol=1e-6,
        atol=1e-6,
    )
    # beta = 40 exponentials overflow float16 (e^40 > 65504) but not here
    x = 40.0 * sim
    lse = ops.masked_logsumexp(x, tf.ones_like(x, tf.bool))
    assert lse.dtype == tf.float32 and np.all(np.isfinite(lse.numpy()))
