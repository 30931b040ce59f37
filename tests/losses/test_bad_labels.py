"""The pair-loss API rejects labels it cannot mean (every registered loss).

* non-integral float labels: ``ValueError`` (eager), ``InvalidArgumentError``
  (``tf.function``), a NaN loss under XLA (which compiles asserts away);
* labels of another length than the batch: ``ValueError`` naming both
  lengths (static shapes, XLA included), ``InvalidArgumentError`` naming the
  labels for unknown shapes;
* an empty batch: a scalar 0 (``[0]`` per anchor);
* integral float labels and integer ids beyond float32's exact range mean
  the same grouping as small integer ids.
"""

import numpy as np
import pytest
import tensorflow as tf

import tfdml.losses  # noqa: F401  (registers the losses)
import tfdml.meta  # noqa: F401  (registers the MMSI losses)
from tests.conftest import make_batch
from tfdml import registry
from tfdml.losses import References
from tfdml.losses.base import PairLoss

LOSSES = sorted(registry.registered(PairLoss))
# Constructor arguments for losses whose defaults need extra inputs.
KWARGS = {"WeightedContrastiveLoss": {"use_caa": False}}
MODES = ["eager", "function", "xla"]


def _loss(name, **kwargs):
    return registry.registered(PairLoss)[name](
        **{**KWARGS.get(name, {}), **kwargs}
    )


def _call(mode, fn, *args):
    if mode == "eager":
        return fn(*args)
    f = tf.function(fn, jit_compile=mode == "xla")
    return f(*[tf.constant(a) for a in args])


def test_every_registered_loss_is_covered():
    assert len(LOSSES) >= 12


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", LOSSES)
def test_non_integral_float_labels_are_rejected(name, mode):
    loss = _loss(name)
    emb, labels = make_batch(0)
    bad = labels.astype(np.float32)
    bad[1] = 0.4  # rounds to 0 like its neighbours: a grouping of its own
    if mode == "eager":
        with pytest.raises(ValueError, match="`labels` must be integer"):
            loss(bad, emb)
        with pytest.raises(ValueError, match="`labels` must be integer"):
            loss.per_anchor(emb, bad)
    elif mode == "function":
        with pytest.raises(
            tf.errors.InvalidArgumentError, match="`labels` must be integer"
        ):
            _call(mode, loss, bad, emb)
    else:
        assert np.isnan(float(_call(mode, loss, bad, emb)))


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("name", LOSSES)
def test_nan_and_inf_labels_are_rejected(name, mode):
    loss = _loss(name)
    emb, labels = make_batch(0)
    for value in (np.nan, np.inf):
        bad = labels.astype(np.float32)
        bad[3] = value
        error = ValueError if mode == "eager" else tf.errors.OpError
        with pytest.raises(error, match="`labels` must be integer"):
            _call(mode, loss, bad, emb)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", LOSSES)
def test_integral_float_labels_equal_int_labels(name, mode):
    loss = _loss(name)
    emb, labels = make_batch(1)
    want = float(_call(mode, loss, labels, emb))
    got = float(_call(mode, loss, labels.astype(np.float32), emb))
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("name", LOSSES)
def test_large_integer_ids_keep_their_grouping(name):
    """Ids 2**24 .. 2**24 + 3 are distinct classes (float32 would merge
    2**24 and 2**24 + 1)."""
    loss = _loss(name)
    emb, labels = make_batch(2)
    want = float(loss(labels, emb))
    big = labels.astype(np.int64) + 2**24
    np.testing.assert_allclose(float(loss(big, emb)), want, rtol=1e-6)
    np.testing.assert_allclose(
        float(loss(big.astype(np.int32), emb)), want, rtol=1e-6
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", LOSSES)
def test_label_length_must_match_the_batch(name, mode):
    loss = _loss(name)
    emb, labels = make_batch(0)  # 16 embeddings
    for n in (15, 17):
        short = np.resize(labels, n)
        with pytest.raises(ValueError, match=rf"`labels` has {n} .* 16 emb"):
            _call(mode, loss, short, emb)
    if mode == "eager":
        with pytest.raises(ValueError, match="`labels` has 15 .* 16 emb"):
            loss.per_anchor(emb, labels[:15])
        with pytest.raises(ValueError, match="`ref_labels` has 3 .* 16 emb"):
            loss.per_anchor(emb, labels, References(emb, labels[:3]))


@pytest.mark.parametrize("name", LOSSES)
def test_label_length_checked_for_unknown_shapes(name):
    loss = _loss(name)
    emb, labels = make_batch(0)
    f = tf.function(
        loss,
        input_signature=[
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None, emb.shape[1]], tf.float32),
        ],
    )
    np.testing.assert_allclose(
        float(f(labels, emb)), float(loss(labels, emb)), rtol=1e-6
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="`labels` and"):
        f(labels[:15], emb)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", LOSSES)
def test_empty_batch_is_a_scalar_zero(name, mode):
    loss = _loss(name)
    emb = np.zeros((0, 8), np.float32)
    labels = np.zeros((0,), np.int32)
    out = _call(mode, loss, labels, emb)
    assert out.shape == () and float(out) == 0.0
    per = _loss(name, reduction=None)(labels, emb)
    assert per.shape == (0,)
    x = tf.Variable(emb)
    with tf.GradientTape() as tape:
        value = loss(labels, x)
    grad = tape.gradient(value, x)
    assert grad is None or grad.shape == (0, 8)
