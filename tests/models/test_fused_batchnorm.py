"""FusedBatchNormalization against a NumPy float64 reference and Keras' layer.

The layer must be Keras' BatchNormalization computed by TF's fused kernel:
the same outputs, gradients and moving statistics (biased batch variance,
although the kernel returns the unbiased one), the Keras path wherever the
kernel does not apply, and it must really run the fused kernel.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfdml.models import FusedBatchNormalization
from tfdml.models import recalibrate_batchnorm
from tfdml.models import small_cnn
from tfdml.models import with_fused_batchnorm

C = 4


def images(seed=0, shape=(6, 5, 7, C)):
    rng = np.random.default_rng(seed)
    # far from the (0, 1) initial statistics, a different scale per channel
    scale = np.linspace(0.5, 3.0, shape[-1])
    return (2.0 + scale * rng.standard_normal(shape)).astype(np.float32)


def set_weights(layer, shape):
    layer.build(shape)
    if layer.scale:
        layer.gamma.assign(np.linspace(0.5, 2.0, C))
    if layer.center:
        layer.beta.assign(np.linspace(-1.0, 1.0, C))
    layer.moving_mean.assign(np.linspace(1.0, 3.0, C))
    layer.moving_variance.assign(np.linspace(0.5, 4.0, C))
    return layer


def reference(x, dy, gamma, beta, mean0, var0, eps, momentum, training):
    """(y, dx, dgamma, dbeta, new moving mean, new moving variance), float64."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    axes = (0, 1, 2)
    if training:
        mean, var = x.mean(axes), x.var(axes)  # biased, as Keras
    else:
        mean, var = mean0, var0
    inv = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean) * inv
    y = gamma * xhat + beta
    dgamma = (dy * xhat).sum(axes)
    dbeta = dy.sum(axes)
    dxhat = dy * gamma
    if training:
        dx = inv * (dxhat - dxhat.mean(axes) - xhat * (dxhat * xhat).mean(axes))
        new_mean = mean0 * momentum + mean * (1 - momentum)
        new_var = var0 * momentum + var * (1 - momentum)
    else:
        dx = dxhat * inv
        new_mean, new_var = mean0, var0
    return y, dx, dgamma, dbeta, new_mean, new_var


def run(layer, x, dy, training, fn=None):
    x = tf.constant(x)
    dy = tf.constant(dy)

    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=training)
            s = tf.reduce_sum(y * dy)
        sources = [x] + [w for w in (layer.gamma, layer.beta) if w is not None]
        return [y] + tape.gradient(s, sources)

    out = (fn or (lambda f: f))(step)(x, dy)
    return [np.asarray(t) for t in out] + [
        np.asarray(layer.moving_mean),
        np.asarray(layer.moving_variance),
    ]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("epsilon", [1e-5, 1e-3])
@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
def test_matches_float64_reference(training, epsilon, mode):
    x = images()
    dy = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    layer = set_weights(
        FusedBatchNormalization(momentum=0.9, epsilon=epsilon), x.shape
    )
    gamma, beta = (
        np.asarray(layer.gamma, np.float64),
        np.asarray(layer.beta, np.float64),
    )
    mean0 = np.asarray(layer.moving_mean, np.float64)
    var0 = np.asarray(layer.moving_variance, np.float64)
    fn = {
        "eager": None,
        "function": tf.function,
        "xla": lambda f: tf.function(f, jit_compile=True),
    }[mode]
    got = run(layer, x, dy, training, fn)
    want = reference(x, dy, gamma, beta, mean0, var0, epsilon, 0.9, training)
    names = ["y", "dx", "dgamma", "dbeta", "moving_mean", "moving_variance"]
    for name, g, w in zip(names, got, want):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5, err_msg=name)


def test_moving_variance_is_the_biased_batch_variance():
    # n = 2 values per channel: the unbiased variance is twice the biased one,
    # so a missing correction of the kernel's output cannot hide in tolerance.
    x = images(shape=(2, 1, 1, C))
    layer = set_weights(FusedBatchNormalization(momentum=0.0), x.shape)
    layer(tf.constant(x), training=True)
    np.testing.assert_allclose(
        np.asarray(layer.moving_variance),
        x.astype(np.float64).var((0, 1, 2)),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        np.asarray(layer.moving_mean), x.mean((0, 1, 2)), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"center": False}, {"scale": False}, {"momentum": 0.5}],
    ids=["default", "no-center", "no-scale", "momentum"],
)
@pytest.mark.parametrize("training", [True, False])
def test_matches_keras_layer(kwargs, training):
    x = images(seed=2)
    dy = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)
    ours = set_weights(FusedBatchNormalization(**kwargs), x.shape)
    theirs = set_weights(keras.layers.BatchNormalization(**kwargs), x.shape)
    for a, b in zip(run(ours, x, dy, training), run(theirs, x, dy, training)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5)


def test_frozen_layer_uses_moving_statistics_in_training():
    x = images(seed=4)
    dy = np.ones_like(x)
    ours = set_weights(FusedBatchNormalization(), x.shape)
    theirs = set_weights(keras.layers.BatchNormalization(), x.shape)
    ours.trainable = theirs.trainable = False
    a = run(ours, x, dy, training=True)
    b = run(theirs, x, dy, training=True)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(a[-1], np.linspace(0.5, 4.0, C, dtype="f"))


def fused_ops(layer, x, training):
    fn = tf.function(lambda x: layer(x, training=training))
    graph = fn.get_concrete_function(tf.TensorSpec(x.shape)).graph
    return [
        op.type for op in graph.get_operations() if "FusedBatchNorm" in op.type
    ]


@pytest.mark.parametrize("training", [True, False])
def test_runs_the_fused_kernel(training):
    x = images()
    layer = set_weights(FusedBatchNormalization(), x.shape)
    assert fused_ops(layer, x, training) == ["FusedBatchNormV3"]
    plain = set_weights(keras.layers.BatchNormalization(), x.shape)
    assert fused_ops(plain, x, training) == []


@pytest.mark.parametrize("case", ["mask", "renorm", "dense", "channels_first"])
def test_keras_path_where_the_kernel_does_not_apply(case):
    kwargs, shape, mask = {}, (6, 5, 7, C), None
    if case == "renorm":
        kwargs = {"renorm": True}
    elif case == "dense":
        shape = (6, C)
    elif case == "channels_first":
        kwargs, shape = {"axis": 1}, (6, C, 5, 7)
    x = images(shape=shape)
    if case == "mask":
        shape, x = (6, 5, C), images(shape=(6, 5, C))
        mask = tf.constant(np.arange(30).reshape(6, 5) % 3 > 0)
    ours = FusedBatchNormalization(**kwargs)
    theirs = keras.layers.BatchNormalization(**kwargs)
    ours.build(shape)
    theirs.build(shape)
    assert not ours._fused_ok(tf.constant(x), mask)
    a = ours(tf.constant(x), training=True, mask=mask)
    b = theirs(tf.constant(x), training=True, mask=mask)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(
        np.asarray(ours.moving_variance), np.asarray(theirs.moving_variance)
    )


def test_non_finite_input_stays_non_finite():
    x = images()
    x[0, 0, 0, 1] = np.nan
    layer = set_weights(FusedBatchNormalization(), x.shape)
    y = np.asarray(layer(tf.constant(x), training=True))
    assert np.isnan(y[..., 1]).all()
    assert np.isnan(np.asarray(layer.moving_mean)[1])


def test_is_a_keras_batchnorm_and_round_trips(tmp_path):
    model = small_cnn((16, 16, 1), filters=(4, 8))
    bns = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert bns and all(type(b) is FusedBatchNormalization for b in bns)
    x = images(shape=(3, 16, 16, 1))
    model(x, training=True)  # moves the moving statistics
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.get_layer("bn0")) is FusedBatchNormalization
    np.testing.assert_array_equal(
        np.asarray(loaded(x, training=False)),
        np.asarray(model(x, training=False)),
    )


def test_recalibration_sees_the_fused_statistics():
    x = images(seed=5, shape=(8, 6, 6, C))
    inputs = keras.Input(x.shape[1:])
    out = FusedBatchNormalization(momentum=0.99, name="bn")(inputs)
    model = keras.Model(inputs, out)
    batches = [x[:4], x[4:]]
    assert recalibrate_batchnorm(model, np.concatenate(batches), batch_size=4)
    bn = model.get_layer("bn")
    b64 = [b.astype(np.float64) for b in batches]
    want_mean = np.mean([b.mean((0, 1, 2)) for b in b64], 0)
    want_var = np.mean([b.var((0, 1, 2)) for b in b64], 0)
    np.testing.assert_allclose(bn.moving_mean, want_mean, rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance, want_var, rtol=1e-5)


def plain_net():
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(C, 3, padding="same", name="conv")(inputs)
    bn = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name="bn")
    x = bn(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    out = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, out)


def test_with_fused_batchnorm_copies_weights_and_flags():
    net = plain_net()
    x = images(seed=6, shape=(5, 8, 8, 2))
    net(x, training=True)
    net.get_layer("bn2").trainable = False
    fused = with_fused_batchnorm(net)
    assert fused is not net
    assert type(fused.get_layer("bn")) is FusedBatchNormalization
    config = net.get_layer("bn").get_config()
    assert fused.get_layer("bn").get_config() == config
    assert not fused.get_layer("bn2").trainable
    for a, b in zip(net.get_weights(), fused.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(
        np.asarray(fused(x, training=False)),
        np.asarray(net(x, training=False)),
        rtol=1e-6,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        np.asarray(fused(x, training=True)),
        np.asarray(net(x, training=True)),
        rtol=1e-5,
        atol=1e-5,
    )
    assert with_fused_batchnorm(fused) is fused
