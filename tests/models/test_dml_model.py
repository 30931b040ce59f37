"""DMLModel: train/test steps against brute force, memory, XLA, hooks."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import reference
from tfdml.losses import MultiSimilarityLoss
from tfdml.losses import References
from tfdml.memory import CrossBatchMemory
from tfdml.models import DMLModel
from tfdml.models import build_embedding_model

DIM = 6


def dense_encoder(in_dim=5, dim=DIM, num_classes=None, seed=0):
    """A tiny functional encoder with the tfdml output dict."""
    inp = keras.Input((in_dim,))
    raw = keras.layers.Dense(
        dim, kernel_initializer=keras.initializers.GlorotUniform(seed)
    )(inp)
    out = {"embeddings": keras.layers.UnitNormalization()(raw), "raw": raw}
    if num_classes:
        out["logits"] = keras.layers.Dense(
            num_classes,
            kernel_initializer=keras.initializers.GlorotUniform(seed + 1),
        )(inp)
    return keras.Model(inp, out)


def data(n=16, in_dim=5, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, in_dim)).astype(np.float32)
    y = (np.arange(n) % classes).astype(np.int32)
    return x, y


class RecordingLoss(MultiSimilarityLoss):
    """Records what DMLModel passes to per_anchor (eager runs only)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = []

    def per_anchor(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return super().per_anchor(*args, **kwargs)


def ms_reference(emb, labels, ids, ref, ref_labels, ref_ids):
    return reference.multi_similarity(
        emb, labels, ref, ref_labels, ids, ref_ids, epsilon=0.1
    )


def test_fit_smoke_small_cnn_with_callbacks(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((32, 8, 8, 1)).astype(np.float32)
    y = (np.arange(32) % 4).astype(np.int32)
    for memory in (None, CrossBatchMemory(20, 8)):
        encoder = build_embedding_model((8, 8, 1), embedding_dim=8)
        model = DMLModel(encoder, memory=memory)
        model.compile(optimizer="adam", loss=MultiSimilarityLoss())
        hist = model.fit(
            x,
            y,
            batch_size=8,
            epochs=2,
            verbose=0,
            validation_data=(x[:16], y[:16]),
            callbacks=[
                keras.callbacks.CSVLogger(str(tmp_path / "h.csv")),
                keras.callbacks.TerminateOnNaN(),
                keras.callbacks.ModelCheckpoint(
                    str(tmp_path / "ckpt.weights.h5"), save_weights_only=True
                ),
            ],
        )
        for key in ("loss", "pos_sim", "neg_sim", "val_loss"):
            assert np.all(np.isfinite(hist.history[key])), key
        assert model.examples_seen.numpy() == 64
        if memory is not None:
            assert memory.pointer.numpy() == 64 % 20
            assert memory.filled.numpy() == 20
        out = model.predict(x[:3], verbose=0)
        assert out["embeddings"].shape == (3, 8)


@pytest.mark.parametrize("with_memory", [False, True], ids=["batch", "xbm"])
def test_step_loss_and_similarities_match_brute_force(with_memory):
    x, y = data(12)
    memory = CrossBatchMemory(10, DIM) if with_memory else None
    model = DMLModel(dense_encoder(), memory=memory)
    model.compile(
        optimizer=keras.optimizers.SGD(0.0), loss="MultiSimilarityLoss"
    )
    if with_memory:  # two steps fill the memory (10 slots, 12 rows each)
        model.train_on_batch(x[::-1], y[::-1])
        model.train_on_batch(x, (y + 1) % 4)
    seen = int(model.examples_seen.numpy())
    emb = model.predict(x, verbose=0)["embeddings"]
    ids = np.arange(seen, seen + len(y))
    ref, ref_labels, ref_ids = emb, y, ids
    if with_memory:
        m_emb, m_lab, m_ids, m_valid = (t.numpy() for t in memory.references())
        assert m_valid.all()
        ref = np.concatenate([emb, m_emb])
        ref_labels = np.concatenate([y, m_lab])
        ref_ids = np.concatenate([ids, m_ids])
    want = ms_reference(emb, y, ids, ref, ref_labels, ref_ids).mean()
    sim = reference.cosine(emb, ref)
    same = y[:, None] == ref_labels[None, :]
    not_self = ids[:, None] != ref_ids[None, :]
    pos_sim = sim[same & not_self].mean()
    neg_sim = sim[~same].mean()
    logs = model.evaluate(x, y, batch_size=len(y), verbose=0, return_dict=True)
    np.testing.assert_allclose(logs["loss"], want, rtol=1e-5)
    np.testing.assert_allclose(logs["pos_sim"], pos_sim, rtol=1e-5)
    np.testing.assert_allclose(logs["neg_sim"], neg_sim, rtol=1e-5)
    model.reset_metrics()
    # The train step reports the same loss (computed before its update).
    logs = model.train_on_batch(x, y, return_dict=True)
    np.testing.assert_allclose(logs["loss"], want, rtol=1e-5)
    assert want > 0


def test_memory_gets_unique_ids_in_stream_order():
    x, y = data(8)
    memory = CrossBatchMemory(40, DIM)
    model = DMLModel(dense_encoder(), memory=memory)
    model.compile(optimizer="sgd", loss=MultiSimilarityLoss())
    model.fit(x, y, batch_size=4, epochs=3, verbose=0, shuffle=False)
    np.testing.assert_array_equal(memory.ids.numpy()[:24], np.arange(24))
    np.testing.assert_array_equal(memory.labels.numpy()[:24], np.tile(y, 3))
    assert memory.pointer.numpy() == 24


def make_pair(jit, memory_size=9):
    models = []
    for kwargs in ({"jit_compile": jit}, {"run_eagerly": True}):
        model = DMLModel(
            dense_encoder(num_classes=4),
            memory=CrossBatchMemory(memory_size, DIM),
            classification_loss_weight=0.3,
        )
        model.compile(
            optimizer=keras.optimizers.Adam(0.05),
            loss=MultiSimilarityLoss(),
            **kwargs,
        )
        models.append(model)
    models[1].set_weights(models[0].get_weights())
    return models


def test_xla_step_matches_eager():
    compiled, eager = make_pair(jit=True)
    x, y = data(8)
    for step in range(3):
        a = compiled.train_on_batch(x, y, return_dict=True)
        b = eager.train_on_batch(x, y, return_dict=True)
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)
        x = x[::-1].copy()
    assert compiled.jit_compile
    for va, vb in zip(compiled.weights, eager.weights):
        np.testing.assert_allclose(va.numpy(), vb.numpy(), atol=1e-5)
    assert compiled.memory.pointer.numpy() == (3 * 8) % 9


def test_classification_loss_and_probs_context():
    loss = RecordingLoss()
    model = DMLModel(
        dense_encoder(num_classes=4), classification_loss_weight=0.5
    )
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=loss)
    model.run_eagerly = True
    x, y = data(8)
    logs = model.train_on_batch(x, y, return_dict=True)
    logits = model.predict(x, verbose=0)["logits"].astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ce = -np.log(p[np.arange(8), y]).mean()
    np.testing.assert_allclose(logs["classification_loss"], ce, rtol=1e-5)
    emb = model.predict(x, verbose=0)["embeddings"]
    ms = ms_reference(emb, y, np.arange(8), emb, y, np.arange(8)).mean()
    np.testing.assert_allclose(logs["loss"], ms + 0.5 * ce, rtol=1e-5)
    _, kwargs = loss.calls[-1]
    np.testing.assert_allclose(
        kwargs["probs"].numpy(), p[np.arange(8), y], rtol=1e-5
    )
    np.testing.assert_allclose(
        kwargs["ref_probs"].numpy(), p[np.arange(8), y], rtol=1e-5
    )


def test_classification_weight_without_logits_raises():
    model = DMLModel(dense_encoder(), classification_loss_weight=1.0)
    model.compile(optimizer="sgd", loss=MultiSimilarityLoss())
    x, y = data(8)
    with pytest.raises(ValueError, match="logits"):
        model.train_on_batch(x, y)


class FlipAugmenter:
    """Adds one synthetic row per example: -raw, same label, new id."""

    def __init__(self, with_embeddings_arg):
        self.calls = []
        if with_embeddings_arg:
            self.synthesize = self._synthesize4

    def synthesize(self, raw, labels, ids):
        self.calls.append(("raw", "labels", "ids"))
        return -raw, labels, ids + 10_000, ids

    def _synthesize4(self, raw, embeddings, labels, ids):
        self.calls.append(("raw", "embeddings", "labels", "ids"))
        return -embeddings, labels, ids + 10_000


@pytest.mark.parametrize("four_args", [False, True], ids=["3arg", "4arg"])
def test_augmenter_rows_are_appended_as_references(four_args):
    aug = FlipAugmenter(four_args)
    loss = RecordingLoss()
    model = DMLModel(
        dense_encoder(num_classes=4),
        memory=CrossBatchMemory(5, DIM),
        augmenter=aug,
    )
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=loss)
    model.run_eagerly = True
    x, y = data(8)
    logs = model.train_on_batch(x, y, return_dict=True)
    args, kwargs = loss.calls[-1]
    emb, labels, refs, ids = args
    assert isinstance(refs, References)
    ref, ref_labels, ref_ids, ref_valid = refs
    assert ref.shape[0] == 8 + 8 + 5
    assert len(aug.calls) == 1
    np.testing.assert_array_equal(ref_ids.numpy()[8:16], ids.numpy() + 10_000)
    np.testing.assert_array_equal(ref_valid.numpy(), [True] * 16 + [False] * 5)
    if not four_args:  # owner ids select the synthetic rows' probs
        np.testing.assert_allclose(
            kwargs["ref_probs"].numpy()[8:16], kwargs["probs"].numpy()
        )
    e, r = emb.numpy(), ref.numpy()[:16]
    unit = -r[8:] / np.linalg.norm(r[8:], axis=1, keepdims=True)
    np.testing.assert_allclose(unit, e, atol=1e-6)
    want = ms_reference(e, y, ids.numpy(), r, np.tile(y, 2), ref_ids[:16])
    np.testing.assert_allclose(logs["loss"], want.mean(), rtol=1e-5)
    # Evaluation does not synthesise.
    model.evaluate(x, y, verbose=0)
    assert len(aug.calls) == 1


def test_nan_loss_is_logged_and_stops_training():
    x, y = data(16)
    x[:8] = np.nan
    model = DMLModel(dense_encoder())
    model.compile(optimizer="sgd", loss=MultiSimilarityLoss())
    hist = model.fit(
        x,
        y,
        batch_size=8,
        epochs=3,
        verbose=0,
        shuffle=False,
        callbacks=[keras.callbacks.TerminateOnNaN()],
    )
    assert np.isnan(hist.history["loss"][0])
    assert len(hist.history["loss"]) == 1


def test_sample_weight_scales_anchor_losses():
    x, y = data(8)
    w = np.array([1, 0, 2, 0, 1, 1, 0, 3], np.float32)
    model = DMLModel(dense_encoder())
    model.compile(
        optimizer=keras.optimizers.SGD(0.0), loss=MultiSimilarityLoss()
    )
    logs = model.train_on_batch(x, y, sample_weight=w, return_dict=True)
    emb = model.predict(x, verbose=0)["embeddings"]
    per = ms_reference(emb, y, np.arange(8), emb, y, np.arange(8))
    np.testing.assert_allclose(logs["loss"], (w * per).sum() / 8, rtol=1e-5)


def test_compile_checks_the_loss():
    model = DMLModel(dense_encoder())
    with pytest.raises(ValueError, match="loss"):
        model.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="NoSuchLoss"):
        model.compile(optimizer="sgd", loss="NoSuchLoss")
    model.compile(
        optimizer="sgd", loss={"name": "MultiSimilarityLoss", "alpha": 3.0}
    )
    assert isinstance(model.pair_loss, MultiSimilarityLoss)
    assert model.pair_loss.alpha == 3.0


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        ({"encoder": "x"}, "encoder"),
        ({"memory": object()}, "memory"),
        ({"augmenter": object()}, "augmenter"),
        ({"classification_loss_weight": -1.0}, "classification_loss_weight"),
    ],
)
def test_bad_arguments_raise(kwargs, arg):
    kwargs = {"encoder": dense_encoder(), **kwargs}
    with pytest.raises(ValueError, match=arg):
        DMLModel(**kwargs)


def test_mixed_precision_step():
    keras.config.set_dtype_policy("mixed_float16")
    try:
        encoder = build_embedding_model((8, 8, 1), embedding_dim=8)
        model = DMLModel(encoder, memory=CrossBatchMemory(16, 8))
        model.compile(optimizer="adam", loss=MultiSimilarityLoss())
        rng = np.random.default_rng(0)
        x = rng.random((8, 8, 8, 1)).astype(np.float32)
        y = (np.arange(8) % 2).astype(np.int32)
        logs = model.train_on_batch(x, y, return_dict=True)
        assert np.isfinite(logs["loss"])
        assert model.memory.embeddings.dtype == "float32"
        assert model.predict(x, verbose=0)["embeddings"].dtype == np.float32
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    finally:
        keras.config.set_dtype_policy("float32")


def test_config_roundtrip():
    model = DMLModel(
        dense_encoder(num_classes=3),
        memory=CrossBatchMemory(7, DIM, start_after=2),
        classification_loss_weight=0.25,
    )
    clone = DMLModel.from_config(model.get_config())
    assert clone.memory.size == 7 and clone.memory.start_after == 2
    assert clone.classification_loss_weight == 0.25
    x, _ = data(2)
    assert set(clone(x)) == {"embeddings", "raw", "logits"}


def test_memory_variables_are_saved_with_the_model_weights(tmp_path):
    x, y = data(8)
    model = DMLModel(dense_encoder(), memory=CrossBatchMemory(6, DIM))
    model.compile(optimizer="sgd", loss=MultiSimilarityLoss())
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    path = str(tmp_path / "m.weights.h5")
    model.save_weights(path)
    other = DMLModel(dense_encoder(seed=5), memory=CrossBatchMemory(6, DIM))
    other.load_weights(path)
    np.testing.assert_array_equal(
        other.memory.embeddings.numpy(), model.memory.embeddings.numpy()
    )
    assert other.memory.pointer.numpy() == 8 % 6
    assert other.examples_seen.numpy() == 8
    tf.debugging.assert_equal(
        other.encoder.weights[0].value, model.encoder.weights[0].value
    )


def test_per_step_loss_hooks_for_subclasses():
    """Precomputed outputs (used by MMSIModel); no pair-weight hook (MMSI
    weights pairs with its own W-form, tfdml.meta.forms)."""
    x, y = data(8)
    model = DMLModel(dense_encoder(), memory=CrossBatchMemory(4, DIM))
    model.compile(optimizer="sgd", loss=MultiSimilarityLoss())
    plain, state = model.per_step_loss(x, y)
    assert state["refs"].embeddings.shape == (12, DIM)
    with pytest.raises(TypeError, match="pair_weights"):
        model.per_step_loss(x, y, pair_weights=tf.ones([8, 12]))
    out = model.encoder(x)
    again, _ = model.per_step_loss(None, y, outputs=out)
    np.testing.assert_allclose(again.numpy(), plain.numpy(), rtol=1e-6)


def test_keras_file_roundtrip_keeps_memory_and_loss(tmp_path):
    x, y = data(8)
    model = DMLModel(dense_encoder(), memory=CrossBatchMemory(6, DIM))
    model.compile(optimizer="adam", loss=MultiSimilarityLoss(alpha=3.0))
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    path = str(tmp_path / "dml.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, DMLModel)
    assert isinstance(loaded.pair_loss, MultiSimilarityLoss)
    assert loaded.pair_loss.alpha == 3.0
    for a, b in zip(loaded.memory.weights, model.memory.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0)["embeddings"],
        model.predict(x, verbose=0)["embeddings"],
        atol=1e-6,
    )
    logs = loaded.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["loss"])
