"""Shared fixtures: seeded batches and edge batches (numpy, float32)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# oneDNN on, as train.py and `make test` (tfdml/_cpu.py)
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# -- tests that need the Debian font / data packages --

FONTS_HINT = "run bash tools/install_fonts.sh (as root)"


def missing_font_packages(packages=None):
    """The packages of ``packages`` (default: the tiny CJK set the glyph
    tests build) that dpkg does not report as installed."""
    # imported here: tfdml.data.builders loads tensorflow_datasets and PIL
    from tfdml.data.builders import fonts as fonts_lib

    if packages is None:
        packages = fonts_lib.TINY_CJK_PACKAGES
    return fonts_lib.missing_packages(list(packages))


def fonts_skip_reason(packages=None):
    """``None`` when every package is installed, else the skip reason."""
    missing = missing_font_packages(packages)
    if not missing:
        return None
    return f"font packages missing: {' '.join(missing)}; {FONTS_HINT}"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """``@pytest.mark.needs_fonts`` / ``needs_fonts(packages)``: skip,
    before any fixture runs, when those packages are not installed (a
    non-root contributor without them). CI installs them (``make test``
    runs ``tools/install_fonts.sh`` first), so nothing is skipped there."""
    for mark in item.iter_markers("needs_fonts"):
        packages = mark.args[0] if mark.args else mark.kwargs.get("packages")
        reason = fonts_skip_reason(packages)
        if reason:
            pytest.skip(reason)


def make_batch(seed=0, classes=4, per_class=4, dim=8):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class).astype(np.int32)
    centers = rng.normal(size=(classes, dim))
    emb = centers[labels] * 0.7 + rng.normal(size=(len(labels), dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.astype(np.float32), labels


def edge_batches():
    """name -> (embeddings, labels): the edge cases every loss must handle."""
    rng = np.random.default_rng(7)
    emb, labels = make_batch(1)
    dup = emb.copy()
    dup[1] = dup[0]  # duplicate embeddings (sim = 1), same class
    dup[5] = dup[4]
    one_class = (emb, np.zeros_like(labels))
    singletons = (emb, np.arange(len(labels), dtype=np.int32))
    mixed = labels.copy()
    mixed[-3:] = [10, 11, 12]  # some singleton classes
    e2 = rng.normal(size=(3, 8)).astype(np.float32)
    return {
        "seeded": (emb, labels),
        "duplicates": (dup, labels),
        "one_class": one_class,
        "all_singletons": singletons,
        "some_singletons": (emb, mixed),
        "tiny": (
            e2 / np.linalg.norm(e2, axis=1, keepdims=True),
            np.array([0, 0, 1], np.int32),
        ),
    }


@pytest.fixture(autouse=True)
def _clear_session():
    keras.utils.clear_session()
    yield


def tiny_encoder(h, w, c, d):
    """A small image encoder with the exported model's outputs.

    ``images [None, h, w, c]`` -> ``{"embeddings": [None, d] (unit norm),
    "raw": [None, d]}``.
    """
    inp = keras.Input((h, w, c), name="images")
    x = keras.layers.Conv2D(4, 3, activation="relu")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    raw = keras.layers.Dense(d, name="raw")(x)
    emb = keras.layers.UnitNormalization(name="embeddings")(raw)
    return keras.Model(inp, {"embeddings": emb, "raw": raw})


def tiny_run_dir(root, h, w, c, d):
    """``root/run``: a run folder as ``train.py`` lays it out, written by
    ``tfdml.training.run_dir`` (``config.yaml`` with the resolved config of
    a ``h x h x c`` model, ``best_encoder.keras`` from :func:`tiny_encoder`,
    seeded), so ``export/export.py --run`` reads it like a real run."""
    from tfdml.training import config as config_lib
    from tfdml.training import run_dir as run_dir_lib

    assert h == w, "model.image_size is square"
    keras.utils.set_random_seed(0)
    run = root / "run"
    run.mkdir()
    cfg = config_lib.load(
        text=f"model: {{image_size: {h}, channels: {c}, embedding_dim: {d}}}\n"
        "loss: {name: MultiSimilarityLoss}\n"
    )
    run_dir_lib.write_config(str(run), cfg)
    tiny_encoder(h, w, c, d).save(run / run_dir_lib.BEST_ENCODER)
    return run
