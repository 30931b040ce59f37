"""build_embedding_model: outputs, pooling, GeM, frozen BN, saving."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfdml.models import BackbonePreprocessing
from tfdml.models import GeneralizedMeanPooling
from tfdml.models import build_embedding_model
from tfdml.models import small_cnn


def images(n=4, size=16, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, size, size, channels)).astype(np.float32)


@pytest.mark.parametrize("pooling", ["avg", "max", "avgmax", "gem"])
def test_outputs_shapes_and_unit_norm(pooling):
    model = build_embedding_model(
        (16, 16, 1), pooling=pooling, embedding_dim=12, num_classes=5
    )
    out = model(images(), training=False)
    assert set(out) == {"embeddings", "raw", "logits"}
    assert out["embeddings"].shape == (4, 12)
    assert out["raw"].shape == (4, 12)
    assert out["logits"].shape == (4, 5)
    emb, raw = out["embeddings"].numpy(), out["raw"].numpy()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(
        emb, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6
    )
    assert all(v.dtype == tf.float32 for v in out.values())


def test_without_classes_has_no_logits():
    out = build_embedding_model((16, 16, 3))(images(channels=3))
    assert set(out) == {"embeddings", "raw"}


def pooled(model, x):
    feats = keras.Model(model.input, model.get_layer("pool").input)(x)
    return feats.numpy().astype(np.float64), model.get_layer("pool")(
        feats
    ).numpy()


@pytest.mark.parametrize("pooling", ["avg", "max", "avgmax"])
def test_pooling_matches_numpy(pooling):
    model = build_embedding_model((16, 16, 1), pooling=pooling)
    feats, got = pooled(model, images())
    want = {
        "avg": feats.mean((1, 2)),
        "max": feats.max((1, 2)),
        "avgmax": feats.mean((1, 2)) + feats.max((1, 2)),
    }[pooling]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def gem_reference(x, p, eps=1e-6):
    x = np.maximum(np.asarray(x, np.float64), eps)
    return np.mean(x**p, axis=(1, 2)) ** (1.0 / p)


@pytest.mark.parametrize("p", [1.0, 3.0, 6.5])
def test_gem_matches_reference(p):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 4, 5, 6)).astype(np.float32)
    layer = GeneralizedMeanPooling(p=p)
    np.testing.assert_allclose(
        layer(x).numpy(), gem_reference(x, p), rtol=2e-5, atol=1e-6
    )
    if p == 1.0:  # p = 1 is average pooling of the clamped activations
        np.testing.assert_allclose(
            layer(x).numpy(),
            np.maximum(x, 1e-6).mean((1, 2)),
            rtol=1e-5,
        )


def test_gem_p_is_trainable_with_finite_gradient_matching_fd():
    rng = np.random.default_rng(2)
    x = rng.random((2, 3, 3, 4)).astype(np.float32) + 0.1
    layer = GeneralizedMeanPooling(p=3.0)
    assert [v.name for v in layer.trainable_variables] == ["p"]
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(layer(x))
    g = tape.gradient(y, layer.p.value).numpy()
    h = 1e-3
    fd = (gem_reference(x, 3.0 + h).sum() - gem_reference(x, 3.0 - h).sum()) / (
        2 * h
    )
    assert np.isfinite(g) and abs(g) > 0
    np.testing.assert_allclose(g, fd, rtol=1e-2)
    fixed = GeneralizedMeanPooling(p=3.0, trainable_p=False)
    assert fixed.trainable_variables == []


def test_gem_bad_p_raises():
    with pytest.raises(ValueError, match="p"):
        GeneralizedMeanPooling(p=0)


def test_frozen_batchnorm_is_inference_mode_and_not_updated():
    model = build_embedding_model((16, 16, 1), freeze_batchnorm=True)
    bns = [
        layer
        for layer in model._flatten_layers(recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert bns and all(not bn.trainable for bn in bns)
    before = [bn.moving_mean.numpy().copy() for bn in bns]
    x = images(8)
    train = model(x, training=True)["embeddings"].numpy()
    infer = model(x, training=False)["embeddings"].numpy()
    np.testing.assert_allclose(train, infer, atol=1e-6)
    for bn, b in zip(bns, before):
        np.testing.assert_array_equal(bn.moving_mean.numpy(), b)
    names = {v.path for v in model.trainable_variables}
    assert not any("gamma" in n or "beta" in n for n in names)
    # Control: without freezing, training mode uses batch statistics.
    free = build_embedding_model((16, 16, 1))
    a = free(x, training=True)["embeddings"].numpy()
    b = free(x, training=False)["embeddings"].numpy()
    assert np.abs(a - b).max() > 1e-4


@pytest.mark.parametrize("pooling", ["gem", "avgmax"])
def test_keras_roundtrip(tmp_path, pooling):
    model = build_embedding_model(
        (16, 16, 1),
        pooling=pooling,
        embedding_dim=8,
        num_classes=3,
        freeze_batchnorm=True,
    )
    model.get_layer("pool").trainable  # built
    path = str(tmp_path / "encoder.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = images()
    for key in ("embeddings", "raw", "logits"):
        np.testing.assert_allclose(
            loaded(x)[key].numpy(), model(x)[key].numpy(), atol=1e-6
        )
    frozen = [
        layer
        for layer in loaded._flatten_layers(recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert frozen and all(not bn.trainable for bn in frozen)


@pytest.mark.parametrize(
    "backbone,size,reference_fn",
    [
        ("resnet50", 32, keras.applications.resnet50.preprocess_input),
        ("inception_v3", 75, keras.applications.inception_v3.preprocess_input),
        ("efficientnet_b0", 32, None),
    ],
)
def test_keras_applications_grayscale_tiled_and_preprocessed(
    backbone, size, reference_fn
):
    model = build_embedding_model(
        (size, size, 1), backbone=backbone, weights=None, embedding_dim=4
    )
    x = images(1, size, 1)
    out = model(x)
    assert out["embeddings"].shape == (1, 4)
    pre = model.get_layer("backbone_preprocessing")
    assert pre.to_rgb
    got = pre(x).numpy()
    assert got.shape == (1, size, size, 3)
    rgb = np.repeat(x, 3, axis=-1) * 255.0
    want = rgb if reference_fn is None else reference_fn(rgb.copy())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
    assert model.get_layer(index=2).input.shape[-1] == 3


def test_preprocessing_torch_mode_and_bad_mode():
    x = images(2, 4, 3)
    got = BackbonePreprocessing("torch")(x).numpy()
    want = (x - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="mode"):
        BackbonePreprocessing("bgr")


def test_local_weights_path_loads(tmp_path):
    source = small_cnn((16, 16, 1))
    path = str(tmp_path / "backbone.weights.h5")
    source.save_weights(path)
    model = build_embedding_model((16, 16, 1), weights=path)
    backbone = model.get_layer("small_cnn")
    for a, b in zip(backbone.get_weights(), source.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_custom_backbone_model_and_vector_output():
    inp = keras.Input((16, 16, 3))
    vec = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(5, 3)(inp))
    custom = keras.Model(inp, vec)
    model = build_embedding_model((16, 16, 1), backbone=custom)
    out = model(images())
    assert out["embeddings"].shape == (4, 128)
    assert model.get_layer("to_rgb").to_rgb


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        ({"backbone": "vgg"}, "backbone"),
        ({"pooling": "sum"}, "pooling"),
        ({"embedding_dim": 0}, "embedding_dim"),
        ({"num_classes": 1}, "num_classes"),
        ({"input_shape": (16, 16)}, "input_shape"),
        ({"weights": "imagenet"}, "weights"),
        ({"weights": "/nonexistent/w.h5"}, "weights"),
        ({"backbone": "inception_v3", "input_shape": (32, 32, 1)}, "75"),
    ],
)
def test_bad_arguments_raise(kwargs, arg):
    kwargs = {"input_shape": (16, 16, 1), **kwargs}
    with pytest.raises(ValueError, match=arg):
        build_embedding_model(**kwargs)
