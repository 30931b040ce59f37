"""RetrievalEvaluationCallback in a tiny fit; the PNG plots."""

import csv

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfdml.eval import RetrievalEvaluationCallback
from tfdml.eval import plots
from tfdml.eval import retrieval_metrics


def _encoder():
    inp = keras.Input((6, 6, 1))
    h = keras.layers.Flatten()(inp)
    raw = keras.layers.Dense(4, name="raw")(h)
    emb = keras.layers.UnitNormalization(name="embeddings")(raw)
    return keras.Model(inp, {"embeddings": emb, "raw": raw})


class Trainer(keras.Model):
    """Trains the encoder's raw output on a toy regression."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def call(self, x, training=False):
        return self.encoder(x, training=training)["raw"]


def _data(seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(4), 6)
    x = rng.random((24, 6, 6, 1)).astype("float32")
    return x, y


def test_callback_writes_logs_csv_and_tensorboard(tmp_path):
    x, y = _data()
    enc = _encoder()
    model = Trainer(enc)
    model.compile(optimizer="sgd", loss="mse")
    cb = RetrievalEvaluationCallback(
        (x, y),
        encoder=enc,
        every_n_epochs=1,
        ks=(1, 2),
        log_dir=str(tmp_path / "tb"),
        batch_size=7,
    )
    csv_path = tmp_path / "history.csv"
    stop = keras.callbacks.EarlyStopping(
        monitor="val_map@r", mode="max", patience=5
    )
    hist = model.fit(
        x,
        np.zeros((24, 4), "float32"),
        epochs=2,
        verbose=0,
        callbacks=[cb, keras.callbacks.CSVLogger(str(csv_path)), stop],
    )
    for key in (
        "val_recall@1",
        "val_recall@2",
        "val_map@r",
        "val_map",
        "val_num_queries",
    ):
        assert key in hist.history and len(hist.history[key]) == 2, key
    want = retrieval_metrics(np.asarray(enc(x)["embeddings"]), y, ks=(1, 2))
    assert hist.history["val_map@r"][-1] == pytest.approx(want["map@r"])
    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == 2 and float(rows[1]["val_map@r"]) == pytest.approx(
        want["map@r"]
    )
    events = list((tmp_path / "tb").glob("events.*"))
    assert events
    tags = {
        v.tag
        for e in tf.compat.v1.train.summary_iterator(str(events[0]))
        for v in e.summary.value
    }
    assert "val_map@r" in tags


def test_callback_every_n_and_dataset(tmp_path):
    x, y = _data(1)
    enc = _encoder()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    cb = RetrievalEvaluationCallback(ds, every_n_epochs=2, prefix="v_")
    model = Trainer(enc)
    model.compile(optimizer="sgd", loss="mse")
    # self.model (the trainer) outputs a tensor: used as the embedding
    hist = model.fit(
        x, np.zeros((24, 4), "float32"), epochs=3, verbose=0, callbacks=[cb]
    )
    assert [e for e, _ in cb.history] == [1, 2]  # epoch 2 and the last
    assert "v_map" in hist.history
    with pytest.raises(ValueError, match="every_n_epochs"):
        RetrievalEvaluationCallback((x, y), every_n_epochs=0)
    with pytest.raises(ValueError, match="labels"):
        RetrievalEvaluationCallback(x, y[:3])


def test_plots(tmp_path):
    m1 = {"recall@1": 0.5, "recall@2": 0.6, "recall@4": 0.8, "map": 0.3}
    m2 = {"recall@1": 0.6, "recall@2": 0.7, "recall@4": 0.9}
    p = plots.plot_recall_at_k({"a": m1, "b": m2}, str(tmp_path / "r.png"))
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (10, 12, 12, 3), dtype=np.uint8)
    lab = np.array([0, 0, 1, 1, 2, 2, 0, 1, 2, 0])
    nb = np.array([[1, 6, 2], [9, 3, 4]])
    g = plots.plot_retrieval_grid(
        imgs[:2], lab[:2], imgs, lab, nb, str(tmp_path / "g.png")
    )
    emb = rng.normal(size=(10, 3))
    g2 = plots.retrieval_grid_from_embeddings(
        emb, lab, imgs[..., :1], str(tmp_path / "g2.png"), num_queries=3, k=4
    )
    from PIL import Image

    for path in (p, g, g2):
        im = np.asarray(Image.open(path).convert("RGB"))
        assert im.shape[0] > 100 and im.std() > 0
    im = np.asarray(Image.open(g).convert("RGB")).reshape(-1, 3)
    green = np.sum((im[:, 1] > 100) & (im[:, 0] < 60) & (im[:, 2] < 60))
    red = np.sum((im[:, 0] > 200) & (im[:, 1] < 60) & (im[:, 2] < 60))
    assert green > 50 and red > 50  # hits and misses are framed
    with pytest.raises(ValueError, match="recall@K"):
        plots.plot_recall_at_k({"x": {"map": 1.0}}, str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="neighbors"):
        plots.plot_retrieval_grid(
            imgs[:2], lab[:2], imgs, lab, nb[:1], str(tmp_path / "y.png")
        )
