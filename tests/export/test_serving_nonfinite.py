"""Serving never answers NaN with ids (issue 12, item 3).

NaN / Inf pixels or embeddings sent to the SavedModel signatures, or an
encoder whose output is not finite, give ``InvalidArgument`` naming the
input instead of ids with NaN scores. Checked on the reloaded SavedModel
(``tf.saved_model.load``) of both index variants.
"""

import io

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.conftest import tiny_encoder

H, W, C, D, N, K = 8, 8, 3, 6, 12, 3
VARIANTS = ["brute_force", "scann"]


def _scann_available():
    try:
        import scann  # noqa: F401
    except Exception:
        return False
    return True


def _png(a):
    b = io.BytesIO()
    Image.fromarray(a).save(b, format="PNG")
    return b.getvalue()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """{"good" | "nan_model": {variant: loaded SavedModel}}."""
    from tfdml.export import export_saved_model

    tmp = tmp_path_factory.mktemp("nonfinite")
    index = "both" if _scann_available() else "brute_force"
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    enc = tiny_encoder(H, W, C, D)
    gallery = rng.random((N, H, W, C)).astype("float32")
    good = export_saved_model(
        enc,
        str(tmp / "good"),
        gallery_images=gallery,
        database_labels=np.arange(N) % 4,
        index=index,
        k=K,
    )
    # An encoder that answers NaN for every (finite) image: the gallery is
    # given as finite embeddings so that the export itself is valid.
    bad = tiny_encoder(H, W, C, D)
    kernel = bad.get_layer("raw").kernel
    kernel.assign(np.full(kernel.shape, np.nan, "float32"))
    db = rng.normal(size=(N, D)).astype("float32")
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    nan_model = export_saved_model(
        bad, str(tmp / "nan_model"), database=db, index=index, k=K
    )
    out = {"good": {}, "nan_model": {}}
    for key, written in (("good", good), ("nan_model", nan_model)):
        for variant, path in written.items():
            out[key][variant] = tf.saved_model.load(path)
    return out


def _sigs(loaded, key, variant):
    if variant not in loaded[key]:
        pytest.skip("scann is not installed")
    return loaded[key][variant].signatures


def _images(bad=None):
    x = np.random.default_rng(1).random((2, H, W, C)).astype("float32")
    if bad is not None:
        x[1, 3, 4, 0] = bad
    return tf.constant(x)


def _embeddings(bad=None):
    e = np.eye(D, dtype="float32")[:2]
    if bad is not None:
        e[1, 2] = bad
    return tf.constant(e)


K2 = tf.constant(2, tf.int32)
BAD_VALUES = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}
# (signature, inputs(bad value), the input the error must name)
CASES = [
    ("serving_default", lambda v: dict(images=_images(v)), "images"),
    ("embed_and_search", lambda v: dict(images=_images(v), k=K2), "images"),
    ("embed_and_search_default", lambda v: dict(images=_images(v)), "images"),
    ("search", lambda v: dict(embeddings=_embeddings(v), k=K2), "embeddings"),
    ("search_default", lambda v: dict(embeddings=_embeddings(v)), "embeddings"),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("value", list(BAD_VALUES))
@pytest.mark.parametrize("name,make,word", CASES, ids=[c[0] for c in CASES])
def test_non_finite_input_is_invalid_argument(
    loaded, variant, value, name, make, word
):
    sig = _sigs(loaded, "good", variant)[name]
    with pytest.raises(tf.errors.InvalidArgumentError) as e:
        out = sig(**make(BAD_VALUES[value]))
        pytest.fail(f"{name} answered {value} input with {out}")
    msg = str(e.value)
    assert f"{word}:" in msg, msg
    assert "NaN" in msg or "Inf" in msg, msg


@pytest.mark.parametrize("variant", VARIANTS)
def test_non_finite_model_output_is_invalid_argument(loaded, variant):
    """Finite images / bytes, but the encoder answers NaN."""
    sigs = _sigs(loaded, "nan_model", variant)
    png = _png(np.zeros((H, W, C), np.uint8))
    calls = [
        ("serving_default", dict(images=_images())),
        ("embed_bytes", dict(image_bytes=tf.constant([png, png]))),
        ("embed_and_search", dict(images=_images(), k=K2)),
        ("embed_and_search_default", dict(images=_images())),
    ]
    for name, kw in calls:
        with pytest.raises(tf.errors.InvalidArgumentError) as e:
            out = sigs[name](**kw)
            pytest.fail(f"{name} answered a NaN encoder with {out}")
        msg = str(e.value)
        assert "embeddings:" in msg and "NaN" in msg, (name, msg)


@pytest.mark.parametrize("variant", VARIANTS)
def test_finite_input_still_works(loaded, variant):
    sigs = _sigs(loaded, "good", variant)
    png = _png(np.full((H + 3, W, C), 128, np.uint8))
    emb = sigs["serving_default"](images=_images())["embeddings"].numpy()
    assert emb.shape == (2, D) and np.isfinite(emb).all()
    byt = sigs["embed_bytes"](image_bytes=tf.constant([png]))["embeddings"]
    assert byt.shape == (1, D) and np.isfinite(byt.numpy()).all()
    for name, kw, k in (
        ("search", dict(embeddings=tf.constant(emb), k=K2), 2),
        ("search_default", dict(embeddings=tf.constant(emb)), K),
        ("embed_and_search", dict(images=_images(), k=K2), 2),
        ("embed_and_search_default", dict(images=_images()), K),
    ):
        out = sigs[name](**kw)
        assert out["ids"].shape == (2, k), name
        assert np.isfinite(out["scores"].numpy()).all(), name
