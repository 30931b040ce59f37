"""RetrievalEvaluationCallback: evaluations every N steps, the TensorBoard
embedding projector files; the training-curve PNG; their config keys."""

import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from PIL import Image
from tensorboard.plugins import projector

from tests.eval.test_callbacks_plots import Trainer
from tests.eval.test_callbacks_plots import _data
from tests.eval.test_callbacks_plots import _encoder
from tfdml.eval import RetrievalEvaluationCallback
from tfdml.eval import plots
from tfdml.eval.callbacks import sprite_png
from tfdml.training import config as config_lib
from tfdml.training.config import ConfigError


def _fit(cb, x, epochs=2, batch_size=6):
    model = Trainer(cb.encoder)
    model.compile(optimizer="sgd", loss="mse")
    model.fit(
        x,
        np.zeros((len(x), 4), "float32"),
        batch_size=batch_size,
        epochs=epochs,
        callbacks=[cb],
        verbose=0,
        shuffle=False,
    )
    return model


def _tags(folder):
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(
        folder, size_guidance={"tensors": 0}
    )
    acc.Reload()
    return {
        tag: [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in ev]
        for tag in acc.Tags()["tensors"]
        for ev in [acc.Tensors(tag)]
    }


def test_every_n_steps(tmp_path):
    x, y = _data()  # 24 items, batch 6: 4 steps per epoch
    enc = _encoder()
    calls = []
    cb = RetrievalEvaluationCallback(
        (x, y),
        encoder=enc,
        ks=(1, 2),
        every_n_steps=3,
        step_log_dir=str(tmp_path / "steps"),
    )
    real = cb._evaluate
    cb._evaluate = lambda: calls.append(1) or real()
    _fit(cb, x, epochs=3)  # steps 1..12; step evaluations at 3, 6, 9, 12
    assert [s for s, _ in cb.step_history] == [3, 6, 9, 12]
    assert [e for e, _ in cb.history] == [0, 1, 2]
    # Epoch 3 ends at step 12, already evaluated: 4 + 2 evaluations, not 7.
    assert len(calls) == 6
    assert cb.step_history[-1][1] == cb.history[-1][1]
    tags = _tags(str(tmp_path / "steps"))
    assert [s for s, _ in tags["val_map@r_by_step"]] == [3, 6, 9, 12]
    np.testing.assert_allclose(
        [v for _, v in tags["val_map@r_by_step"]],
        [m["val_map@r"] for _, m in cb.step_history],
        rtol=1e-6,
    )
    # Without every_n_steps nothing happens per step.
    cb2 = RetrievalEvaluationCallback((x, y), encoder=_encoder(), ks=(1,))
    _fit(cb2, x, epochs=1)
    assert cb2.step_history == [] and len(cb2.history) == 1


def _read_projector(folder):
    config = projector.ProjectorConfig()
    with open(os.path.join(folder, "projector_config.pbtxt")) as f:
        text_format.Parse(f.read(), config)
    (e,) = config.embeddings
    tsv = np.loadtxt(os.path.join(folder, e.tensor_path), delimiter="\t")
    with open(os.path.join(folder, e.metadata_path)) as f:
        meta = [line.rstrip("\n").split("\t") for line in f]
    return e, np.atleast_2d(tsv), meta


@pytest.mark.parametrize("as_dataset", [False, True])
def test_projector_files(tmp_path, as_dataset):
    x, y = _data()
    x = x.copy()
    x[:, 0, 0, 0] = np.arange(24) / 23.0  # a per-image marker pixel
    enc = _encoder()
    data = (
        tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
        if as_dataset
        else (x, y)
    )
    out = tmp_path / "projector"
    cb = RetrievalEvaluationCallback(
        data,
        encoder=enc,
        ks=(1,),
        projector_dir=str(out),
        projector_points=10,
        projector_seed=1,
    )
    _fit(cb, x, epochs=2)  # written twice, overwritten in place
    e, tsv, meta = _read_projector(out)
    assert tsv.shape == (10, 4) and tuple(e.tensor_shape) == (10, 4)
    assert meta[0] == ["label", "index"] and len(meta) == 11
    idx = np.array([int(m[1]) for m in meta[1:]])
    assert len(set(idx)) == 10 and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal([int(m[0]) for m in meta[1:]], y[idx])
    # The vectors are those of the evaluated items.
    emb = np.asarray(enc(x[idx])["embeddings"])
    np.testing.assert_allclose(tsv, emb, atol=1e-5)
    # Sprite: a 4 x 4 grid of 6-pixel thumbnails, row-major, the marker of
    # item idx[i] at thumbnail i.
    assert tuple(e.sprite.single_image_dim) == (6, 6)
    sheet = np.asarray(Image.open(out / e.sprite.image_path))
    assert sheet.shape == (24, 24, 3)
    for i, j in enumerate(idx):
        r, c = divmod(i, 4)
        assert abs(int(sheet[r * 6, c * 6, 0]) - j / 23 * 255) <= 1
    assert len(glob.glob(str(out / "events.out.tfevents.*"))) == 1
    assert not glob.glob(str(out / "*.tmp"))


def test_projector_without_images_and_all_points(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(12, 5)).astype("float32")
    inp = keras.Input((5,))
    enc = keras.Model(
        inp, {"embeddings": keras.layers.UnitNormalization()(inp)}
    )
    cb = RetrievalEvaluationCallback(
        (feats, np.arange(12) % 3),
        encoder=enc,
        ks=(1,),
        projector_dir=str(tmp_path / "p"),
    )
    emb, labels = cb.embed()
    cb.write_projector(emb, labels)
    e, tsv, meta = _read_projector(tmp_path / "p")
    assert tsv.shape == (12, 5) and len(meta) == 13
    assert not e.sprite.image_path  # feature vectors: no sprite


def test_sprite_png_sizes(tmp_path):
    side = sprite_png(np.zeros((5, 100, 80), np.uint8), tmp_path / "a.png")
    assert side == 64  # capped thumbnail
    assert np.asarray(Image.open(tmp_path / "a.png")).shape == (192, 192, 3)
    big = np.zeros((10000, 2, 2, 3), np.float32)
    side = sprite_png(big, tmp_path / "b.png")
    assert side == 2  # 100 x 2 pixels, under the 8192 limit
    with pytest.raises(ValueError, match="images"):
        sprite_png(np.zeros((3, 4, 4, 2)), tmp_path / "c.png")


def test_callback_argument_errors():
    x, y = _data()
    for kw in (
        {"every_n_steps": 0},
        {"every_n_steps": 1.5},
        {"projector_points": 0},
        {"projector_points": True},
    ):
        name = next(iter(kw))
        with pytest.raises(ValueError, match=name):
            RetrievalEvaluationCallback((x, y), **kw)


def test_training_curves_png(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text(
        "epoch,loss,neg_sim,pos_sim,val_map@r\n"
        "0,1.5,0.1,0.5,\n1,1.2,0.05,0.6,0.31\n2,1.0,0.02,0.7,0.42\n"
    )
    h = plots.read_history(str(path))
    assert np.isnan(h["val_map@r"][0]) and h["loss"] == [1.5, 1.2, 1.0]
    png = plots.plot_training_curves(str(path), tmp_path / "p" / "c.png")
    img = np.asarray(Image.open(png))
    assert img.shape[1] > 3 * img.shape[0] // 2  # three panels side by side
    # Without pos/neg similarity: two panels, narrower.
    two = plots.plot_training_curves(
        {"epoch": [0, 1], "loss": [1.0, 0.5], "val_map@r": [0.1, 0.2]},
        tmp_path / "two.png",
    )
    assert np.asarray(Image.open(two)).shape[1] < img.shape[1]
    with pytest.raises(ValueError, match="epoch"):
        plots.plot_training_curves({"loss": [1.0]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="none of"):
        plots.plot_training_curves({"epoch": [0], "x": [1]}, tmp_path / "y.png")
    empty = tmp_path / "empty.csv"
    empty.write_text("epoch,loss\n")
    with pytest.raises(ValueError, match="no rows"):
        plots.read_history(str(empty))


@pytest.mark.parametrize(
    "override, key",
    [
        ("eval.every_n_steps=0", "eval.every_n_steps"),
        ("eval.projector=1", "eval.projector"),
        ("eval.projector_points=20000", "eval.projector_points"),
        ("export.threshold=1.5", "export.threshold"),
        ("export.target_precision=0", "export.target_precision"),
        ("export.calibration_mode=all", "export.calibration_mode"),
    ],
)
def test_config_errors(override, key):
    with pytest.raises(ConfigError) as e:
        config_lib.load(text="loss: TripletMarginLoss", overrides=[override])
    assert e.value.key == key


def test_config_threshold_and_target_exclusive():
    cfg = config_lib.load(
        text="loss: TripletMarginLoss",
        overrides=["eval.every_n_steps=50", "export.threshold=0.5"],
    )
    assert cfg["eval"]["every_n_steps"] == 50
    assert cfg["eval"]["projector"] is False
    assert cfg["export"]["threshold"] == 0.5
    with pytest.raises(ConfigError, match="not both"):
        config_lib.load(
            text="loss: TripletMarginLoss",
            overrides=["export.threshold=0.5", "export.target_precision=0.9"],
        )
