"""MMSIModel: fit smoke test, gate, fallback, paths, two replicas."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfdml import ops
from tfdml.memory import ClassDictionary
from tfdml.meta import MMSIModel
from tfdml.meta import meta_dataset
from tfdml.meta import validation_dataset
from tfdml.meta.mmsi import shuffle_weights
from tfdml.models import build_embedding_model


def dense_encoder(seed=0, p=6, d=4):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((p,))
    h = keras.layers.Dense(16, activation="tanh")(inp)
    raw = keras.layers.Dense(d)(h)
    emb = keras.layers.UnitNormalization()(raw)
    return keras.Model(inp, {"embeddings": emb, "raw": raw})


def dense_data(k=3, classes=4, seed=0, steps=2):
    rng = np.random.default_rng(seed)
    n = classes * k * steps
    x = rng.normal(size=(n, 6)).astype("float32")
    y = np.tile(np.repeat(np.arange(classes), k), steps).astype("int32")
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(classes * k)
    val = validation_dataset(x, y, classes_per_batch=classes, seed=seed)
    return meta_dataset(train, val)


def _moved(before, model):
    return max(
        np.abs(a - b).max() for a, b in zip(before, model.encoder.get_weights())
    )


def test_fit_smoke_small_cnn():
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(40, 8, 8, 1)).astype("float32")
    labels = np.repeat(np.arange(5), 8).astype("int32")
    train = (
        tf.data.Dataset.from_tensor_slices((images, labels))
        .shuffle(40, seed=0)
        .batch(10)
    )
    data = meta_dataset(train, validation_dataset(images, labels, 5))
    keras.utils.set_random_seed(0)
    enc = build_embedding_model((8, 8, 1), embedding_dim=8)
    model = MMSIModel(enc, base_loss="ms", num_classes=5, d_size=2)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    before = [np.array(w) for w in model.encoder.get_weights()]
    hist = model.fit(data, epochs=1, verbose=0).history
    for key in (
        "loss",
        "meta_loss",
        "pos_sim",
        "neg_sim",
        "weight_positive_fraction",
        "gate_open",
    ):
        assert np.isfinite(hist[key]).all(), key
    assert 0 < hist["weight_positive_fraction"][-1] <= 1
    assert _moved(before, model) > 0
    assert int(model.dictionary.num_classes_seen()) == 5
    counts = model.dictionary.counts.numpy()
    np.testing.assert_array_equal(counts, 2)
    ev = model.evaluate(train, verbose=0, return_dict=True)
    assert np.isfinite(ev["loss"])


def test_gate_blocks_updates_but_fills_dictionary():
    model = MMSIModel(
        dense_encoder(), num_classes=4, d_size=1, min_classes_before_update=5
    )
    model.compile(optimizer=keras.optimizers.Adam(0.1))
    before = [np.array(w) for w in model.encoder.get_weights()]
    hist = model.fit(dense_data(), epochs=1, verbose=0).history
    assert hist["gate_open"][-1] == 0.0
    assert _moved(before, model) == 0.0
    assert int(model.dictionary.num_classes_seen()) == 4
    # The same model with the gate at 4 classes trains.
    model = MMSIModel(
        dense_encoder(), num_classes=4, d_size=1, min_classes_before_update=4
    )
    model.compile(optimizer=keras.optimizers.Adam(0.1))
    hist = model.fit(dense_data(), epochs=1, verbose=0).history
    assert hist["gate_open"][-1] == 1.0
    assert _moved(before, model) > 0


def test_fallback_skip_when_no_pair_is_selected():
    # K = 1: no positive pair, so the MS S-form selects nothing.
    model = MMSIModel(dense_encoder(), base_loss="ms", num_classes=4)
    model.compile(optimizer=keras.optimizers.Adam(0.1))
    before = [np.array(w) for w in model.encoder.get_weights()]
    hist = model.fit(dense_data(k=1), epochs=1, verbose=0).history
    assert hist["gate_open"][-1] == 0.0
    assert np.isfinite(hist["loss"]).all()
    assert _moved(before, model) == 0.0


@pytest.mark.parametrize("base", ["contrastive", "triplet"])
def test_nested_and_fast_paths_train_identically(base):
    weights = []
    for path in ("nested", "fast"):
        model = MMSIModel(
            dense_encoder(),
            base_loss=base,
            num_classes=4,
            d_size=2,
            path=path,
            virtual_lr=1e-3,
        )
        model.compile(optimizer=keras.optimizers.SGD(0.5))
        model.fit(dense_data(), epochs=1, verbose=0)
        weights.append(model.encoder.get_weights())
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert (
        _moved([np.array(w) for w in dense_encoder().get_weights()], model)
        > 1e-3
    )


def test_xla_step_matches_eager():
    weights = []
    for jit in (False, True):
        model = MMSIModel(dense_encoder(), base_loss="ms", num_classes=4)
        model.compile(optimizer=keras.optimizers.SGD(0.5), jit_compile=jit)
        model.fit(dense_data(), epochs=1, verbose=0)
        weights.append(model.encoder.get_weights())
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, atol=1e-5)


def _cnn_meta_data():
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(16, 8, 8, 1)).astype("float32")
    labels = np.repeat(np.arange(4), 4).astype("int32")
    train = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    return meta_dataset(train, validation_dataset(images, labels, 4))


@pytest.mark.parametrize("jit", [False, True])
def test_skipped_step_changes_no_weight_statistic_or_optimizer_state(jit):
    # Under XLA the skip is branch-free (apply, then restore): a skipped
    # step must still leave weights, BatchNorm statistics and the Adam
    # state (iterations, moments) exactly as they were.
    keras.utils.set_random_seed(0)
    enc = build_embedding_model((8, 8, 1), embedding_dim=4)
    model = MMSIModel(
        enc, base_loss="ms", num_classes=4, min_classes_before_update=99
    )
    model.compile(optimizer=keras.optimizers.Adam(0.1), jit_compile=jit)
    before = [np.array(w) for w in model.encoder.get_weights()]
    assert any("moving" in v.path for v in enc.non_trainable_variables)
    hist = model.fit(_cnn_meta_data(), epochs=1, verbose=0).history
    assert hist["gate_open"] == [0.0]
    after = model.encoder.get_weights()
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert int(model.optimizer.iterations.numpy()) == 0
    moments = [v for v in model.optimizer.variables if len(v.shape)]
    assert len(moments) == 2 * len(model.encoder.trainable_variables)
    for v in moments:
        np.testing.assert_array_equal(v.numpy(), 0)


def test_xla_adam_step_with_batchnorm_matches_eager():
    weights = []
    for jit in (False, True):
        keras.utils.set_random_seed(0)
        enc = build_embedding_model((8, 8, 1), embedding_dim=4)
        model = MMSIModel(enc, base_loss="contrastive", num_classes=4)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=jit)
        hist = model.fit(_cnn_meta_data(), epochs=1, verbose=0).history
        assert hist["gate_open"] == [1.0]
        assert int(model.optimizer.iterations.numpy()) == 2
        weights.append(model.encoder.get_weights())
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_bad_arguments_and_config_round_trip():
    enc = dense_encoder()
    with pytest.raises(ValueError, match="memory"):
        MMSIModel(enc, memory=object(), num_classes=4)
    with pytest.raises(ValueError, match="path"):
        MMSIModel(enc, num_classes=4, path="slow")
    with pytest.raises(ValueError, match="num_classes"):
        MMSIModel(enc)
    with pytest.raises(ValueError, match="virtual_lr"):
        MMSIModel(enc, num_classes=4, virtual_lr=0.0)
    with pytest.raises(ValueError, match="min_classes_before_update"):
        MMSIModel(enc, num_classes=4, min_classes_before_update=-1)
    with pytest.raises(ValueError, match="base_loss"):
        MMSIModel(enc, num_classes=4, base_loss=3)
    with pytest.raises(ValueError, match="classes_per_batch"):
        validation_dataset(np.zeros((4, 2)), [0, 0, 1, 1], 3)
    model = MMSIModel(
        enc,
        dictionary=ClassDictionary(4, 4, 3),
        base_loss="triplet",
        normalization="separate",
        fallback="uniform",
    )
    clone = MMSIModel.from_config(model.get_config())
    assert clone.dictionary.d_size == 3
    assert clone.normalization == "separate" and clone.fallback == "uniform"
    assert type(clone.base_loss).__name__ == "MMSITripletLoss"
    model.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="zipped"):
        model.train_step((np.zeros((4, 6), "float32"),))


def test_validation_dataset_is_k1_of_distinct_classes():
    labels = np.repeat(np.arange(7), [1, 2, 3, 4, 5, 6, 7])
    images = np.arange(len(labels), dtype=np.float32)[:, None]
    seen = set()
    for x, y in validation_dataset(images, labels, 5, seed=1).take(20):
        y = y.numpy()
        assert len(set(y.tolist())) == 5
        np.testing.assert_array_equal(labels[x.numpy()[:, 0].astype(int)], y)
        seen.update(x.numpy()[:, 0].astype(int).tolist())
    assert len(seen) > 15


# -- control rows: "MMSI base with w = 1" and "random weights with MMSI's
# sparsity" (weights_mode) --


def _one_batch(k=3, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(classes * k, 6)).astype("float32")
    y = np.repeat(np.arange(classes), k).astype("int32")
    return x, y


@pytest.mark.parametrize("base", ["contrastive", "ms"])
def test_weights_mode_ones_is_the_base_loss(base):
    x, y = _one_batch()
    model = MMSIModel(
        dense_encoder(), base_loss=base, num_classes=4, weights_mode="ones"
    )
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    # expected: one SGD step on the W-form with w = 1 on every selected pair
    ref = dense_encoder()
    loss = model.base_loss
    with tf.GradientTape() as tape:
        e = ref(x)["embeddings"]
        sim = loss.similarity(e, e)
        ids = tf.range(len(y), dtype=tf.int32)
        pos, neg = ops.pair_masks(y, y, ids, ids)
        sel = loss.select(sim, pos, neg)
        ones = tf.cast(tf.logical_or(sel["pos"], sel["neg"]), tf.float32)
        total = tf.reduce_mean(loss.weighted(sim, sel, ones))
    grads = tape.gradient(total, ref.trainable_variables)
    want = [
        v.numpy() - 0.5 * g.numpy()
        for v, g in zip(ref.trainable_variables, grads)
    ]
    val = tf.data.Dataset.from_tensors((x, y)).repeat()
    data = meta_dataset(tf.data.Dataset.from_tensors((x, y)), val)
    logs = model.fit(data, epochs=1, verbose=0).history
    assert logs["weight_positive_fraction"][-1] == 1.0
    assert logs["gate_open"][-1] == 1.0
    for a, b in zip(model.encoder.trainable_variables, want):
        np.testing.assert_allclose(a.numpy(), b, atol=1e-5)


def test_shuffle_weights_keeps_sparsity_per_polarity():
    rng = np.random.default_rng(0)
    pos = rng.uniform(size=(16, 16)) < 0.2
    neg = (rng.uniform(size=(16, 16)) < 0.5) & ~pos
    w = rng.uniform(size=(16, 16)) * (pos | neg)
    w[rng.uniform(size=(16, 16)) < 0.4] = 0.0  # meta weights: many zeros
    w = w.astype("float32")
    sel = {"pos": tf.constant(pos), "neg": tf.constant(neg)}
    got = shuffle_weights(tf.constant(w), sel, seed=(0, 7)).numpy()
    for m in (pos, neg):
        np.testing.assert_array_equal(np.sort(got[m]), np.sort(w[m]))
        assert (got[m] == 0).sum() == (w[m] == 0).sum()
    assert (got[~(pos | neg)] == 0).all()
    assert not np.array_equal(got, w)
    again = shuffle_weights(tf.constant(w), sel, seed=(0, 7)).numpy()
    np.testing.assert_array_equal(again, got)
    other = shuffle_weights(tf.constant(w), sel, seed=(0, 8)).numpy()
    assert not np.array_equal(other, got)


def test_weights_mode_random_sparse_matches_meta_sparsity():
    logs = {}
    weights = {}
    for mode in ("meta", "random_sparse"):
        model = MMSIModel(
            dense_encoder(),
            base_loss="contrastive",
            num_classes=4,
            d_size=2,
            weights_mode=mode,
        )
        model.compile(optimizer=keras.optimizers.SGD(0.5))
        data = dense_data(steps=1)
        logs[mode] = model.fit(data, epochs=1, verbose=0).history
        weights[mode] = model.encoder.get_weights()
    frac = logs["meta"]["weight_positive_fraction"][-1]
    assert 0.0 < frac < 1.0
    assert logs["random_sparse"]["weight_positive_fraction"][-1] == frac
    assert (
        max(
            np.abs(a - b).max()
            for a, b in zip(weights["meta"], weights["random_sparse"])
        )
        > 1e-6
    )


def test_weights_mode_argument_and_round_trip():
    enc = dense_encoder()
    with pytest.raises(ValueError, match="weights_mode"):
        MMSIModel(enc, num_classes=4, weights_mode="uniform")
    model = MMSIModel(enc, num_classes=4, weights_mode="random_sparse")
    clone = MMSIModel.from_config(model.get_config())
    assert clone.weights_mode == "random_sparse"


def test_multi_hot_labels_are_refused_with_a_clear_message():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 6)).astype("float32")
    multi = (rng.uniform(size=(12, 4)) < 0.5).astype("float32")
    ids = np.repeat(np.arange(4), 3).astype("int32")
    model = MMSIModel(dense_encoder(), num_classes=4)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    for train_y, val_y, name in ((multi, ids, "y"), (ids, multi, "y_val")):
        with pytest.raises(ValueError, match=f"{name} of shape .*multi-hot"):
            model.train_step(((x, train_y), (x, val_y)))
