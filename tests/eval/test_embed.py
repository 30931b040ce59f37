"""tfdml.eval.embed: one cached, non-retracing embedding loop."""

import gc
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfdml.eval import embed
from tfdml.eval import embedding_function

H, W, C, D = 8, 8, 1, 4


class _Count(keras.layers.Layer):
    """Identity that counts its Python calls (= traces inside tf.function)."""

    calls = 0

    def call(self, x):
        type(self).calls += 1
        return x


def _model(dict_output=True):
    keras.utils.set_random_seed(0)
    inp = keras.Input((H, W, C))
    x = _Count(name="count")(inp)
    x = keras.layers.Conv2D(3, 3, padding="same", use_bias=False)(x)
    bn = keras.layers.BatchNormalization()
    x = bn(x)
    x = keras.layers.ReLU()(x)
    raw = keras.layers.Dense(D)(keras.layers.GlobalAveragePooling2D()(x))
    emb = keras.layers.UnitNormalization()(raw)
    out = {"embeddings": emb, "raw": raw} if dict_output else emb
    model = keras.Model(inp, out)
    # Moving statistics far from any batch's: inference != training mode.
    bn.moving_mean.assign(np.full(3, -0.5, np.float32))
    bn.moving_variance.assign(np.full(3, 4.0, np.float32))
    return model


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def images():
    return np.random.RandomState(1).rand(37, H, W, C).astype(np.float32)


def _direct(model, x, key="embeddings"):
    out = model(tf.convert_to_tensor(x), training=False)
    return np.asarray(out[key] if isinstance(out, dict) else out)


def _kinds(x, y):
    """name -> (data, has_labels) for every supported input kind."""
    return {
        "numpy": (x, False),
        "numpy_float64": (x.astype(np.float64), False),
        "tensor": (tf.constant(x), False),
        "tuple": ((x, y), True),
        "list_tensor": ([tf.constant(x), y], True),
        "ds_unbatched": (tf.data.Dataset.from_tensor_slices(x), False),
        "ds_batched": (tf.data.Dataset.from_tensor_slices(x).batch(10), False),
        "ds_pairs_unbatched": (
            tf.data.Dataset.from_tensor_slices((x, y)),
            True,
        ),
        "ds_pairs_batched": (
            tf.data.Dataset.from_tensor_slices((x, y)).batch(16),
            True,
        ),
        "ds_triples": (
            tf.data.Dataset.from_tensor_slices((x, y, np.ones(len(y)))).batch(
                7
            ),
            True,
        ),
    }


@pytest.mark.parametrize("kind", list(_kinds(np.zeros((1, H, W, C)), [0])))
def test_equals_direct_call_on_every_input_kind(model, images, kind):
    y = np.arange(len(images)) % 5
    data, has_labels = _kinds(images, y)[kind]
    out = embed(model, data, batch_size=16)
    if has_labels:
        out, labels = out
        np.testing.assert_array_equal(labels, y)
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.float32 and out.shape == (len(images), D)
    np.testing.assert_allclose(out, _direct(model, images), atol=1e-6)


@pytest.mark.parametrize("batch_size", [1, 5, 16, 36, 37, 256])
def test_partial_last_batch(model, images, batch_size):
    out = embed(model, images, batch_size=batch_size)
    assert out.shape == (len(images), D)
    np.testing.assert_allclose(out, _direct(model, images), atol=1e-6)


def test_no_retracing_on_repeat_partial_batch_or_other_n(images):
    model = _model()
    _Count.calls = 0
    embed(model, images, batch_size=16)  # 16, 16, 5: one trace
    traced = _Count.calls
    assert traced >= 1
    fn = embedding_function(model, images)
    assert fn.experimental_get_tracing_count() == 1
    embed(model, images, batch_size=16)
    embed(model, images[:5], batch_size=16)
    embed(model, images[:23], batch_size=4)
    embed(model, tf.data.Dataset.from_tensor_slices(images).batch(9))
    embed(model, (images[:3], np.arange(3)))
    assert _Count.calls == traced, "embed retraced"
    assert embedding_function(model, images) is fn
    assert fn.experimental_get_tracing_count() == 1
    # A different mode or output is a different (cached) function.
    embed(model, images, training=True)
    embed(model, images, output="raw")
    embed(model, images, training=True)
    embed(model, images, output="raw")
    assert _Count.calls == traced + 2


def test_dict_and_tensor_outputs(model, images):
    tensor_model = keras.Model(model.inputs, model.output["embeddings"])
    a = embed(model, images)
    b = embed(tensor_model, images)
    np.testing.assert_allclose(a, b, atol=1e-6)
    raw = embed(model, images, output="raw")
    np.testing.assert_allclose(raw, _direct(model, images, "raw"), atol=1e-6)
    assert not np.allclose(raw, a)
    with pytest.raises(ValueError, match="no 'nope' key"):
        embed(model, images, output="nope")
    with pytest.raises(ValueError, match="returns a dict"):
        embed(tensor_model, images, output="raw")


def test_labels_pass_through(model, images):
    y = np.array([f"c{i % 3}" for i in range(len(images))])
    emb, labels = embed(model, (images, y))
    assert labels.dtype == y.dtype
    np.testing.assert_array_equal(labels, y)
    # A dataset's labels keep their dtype and trailing shape.
    y2 = (np.arange(len(images)) % 4).astype(np.int64).reshape(-1, 1)
    ds = tf.data.Dataset.from_tensor_slices((images, y2)).batch(10)
    emb2, labels2 = embed(model, ds)
    assert labels2.dtype == np.int64 and labels2.shape == (len(images), 1)
    np.testing.assert_array_equal(labels2, y2)
    np.testing.assert_allclose(emb, emb2, atol=1e-6)
    only = embed(model, ds, return_labels=False)
    np.testing.assert_allclose(only, emb, atol=1e-6)
    emb3, _ = embed(model, (images, y), return_labels=True)
    np.testing.assert_allclose(emb3, emb, atol=1e-6)
    with pytest.raises(ValueError, match="no labels"):
        embed(model, images, return_labels=True)
    with pytest.raises(ValueError, match="37 entries"):
        embed(model, (images, y[:-1]))


def test_inference_mode_uses_moving_statistics(model, images):
    out = embed(model, images, batch_size=16)
    x = tf.constant(images)
    inference = np.asarray(model(x, training=False)["embeddings"])
    batch_stats = np.concatenate(
        [
            np.asarray(model(x[i : i + 16], training=True)["embeddings"])
            for i in range(0, len(images), 16)
        ]
    )
    # Guard: the two modes differ on this model, so the test can fail.
    assert np.abs(inference - batch_stats).max() > 1e-2
    np.testing.assert_allclose(out, inference, atol=1e-6)


def test_training_mode_is_stateless(images):
    model = _model()
    before = [np.array(v) for v in model.variables]
    x = tf.data.Dataset.from_tensor_slices(images).batch(16)
    out = embed(model, x, training=True)
    after = [np.array(v) for v in model.variables]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)  # BN statistics not updated
    want = []
    for xb in x:
        o, _ = model.stateless_call(
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
            xb,
            training=True,
        )
        want.append(np.asarray(o["embeddings"]))
    np.testing.assert_allclose(out, np.concatenate(want), atol=1e-6)
    assert np.abs(out - embed(model, images)).max() > 1e-2


def test_empty_input_is_value_error(model):
    with pytest.raises(ValueError, match="No images"):
        embed(model, np.zeros((0, H, W, C), np.float32))
    with pytest.raises(ValueError, match="No images"):
        embed(model, (np.zeros((0, H, W, C), np.float32), np.zeros(0)))
    empty = tf.data.Dataset.from_tensor_slices(np.zeros((0, H, W, C), "f4"))
    with pytest.raises(ValueError, match="empty"):
        embed(model, empty.batch(4))
    with pytest.raises(ValueError, match="batch_size"):
        embed(model, np.zeros((2, H, W, C), np.float32), batch_size=0)


def test_batched_flag_for_a_model_without_static_inputs(images):
    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(D)

        def call(self, x):
            return {"embeddings": self.dense(keras.ops.reshape(x, (-1, H * W)))}

    model = Sub()
    want = np.asarray(model(images)["embeddings"])
    unbatched = tf.data.Dataset.from_tensor_slices(images)
    with pytest.raises(ValueError, match="batched"):
        embed(model, unbatched)
    out = embed(model, unbatched, batch_size=8, batched=False)
    np.testing.assert_allclose(out, want, atol=1e-6)
    # A `.batch()` dataset has a None leading dimension: batched.
    out = embed(model, unbatched.batch(8))
    np.testing.assert_allclose(out, want, atol=1e-6)


def test_cache_does_not_keep_the_model_alive(images):
    model = _model()
    embed(model, images)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
