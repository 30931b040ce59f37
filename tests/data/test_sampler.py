"""P x K class-balanced sampler: shapes, balance, seeds, split isolation."""

import numpy as np
import pytest

from tfdml import data


def _source(seed=0, num_classes=12, per_class=(1, 9), size=8):
    return data.SyntheticSource(
        num_classes=num_classes,
        examples_per_class=per_class,
        size=size,
        seed=seed,
    )


def _take(ds, n):
    return [(x.numpy(), y.numpy()) for x, y in ds.take(n)]


@pytest.mark.parametrize("p, k", [(4, 2), (3, 5), (12, 3)])
def test_every_batch_is_exactly_p_by_k(p, k):
    src = _source()
    classes = src.classes
    ds = data.balanced_dataset(src, classes, p, k, image_size=6, channels=1)
    for x, y in _take(ds, 10):
        assert x.shape == (p * k, 6, 6, 1) and x.dtype == np.float32
        assert y.shape == (p * k,) and y.dtype == np.int32
        assert 0.0 <= x.min() and x.max() <= 1.0
        values, counts = np.unique(y, return_counts=True)
        assert len(values) == p
        assert np.all(counts == k)
        # class blocks are contiguous: K samples per class in a row
        assert np.all(y.reshape(p, k) == y.reshape(p, k)[:, :1])


def test_images_match_labels():
    """Each sampled image is an image of its label's class."""
    src = _source(size=6)
    ds = data.balanced_dataset(src, src.classes, 4, 3, 6, 1, seed=5)
    lookup = {}
    for i in range(len(src)):
        lookup.setdefault(src.images[i].tobytes(), set()).add(
            int(src.labels[i])
        )
    for x, y in _take(ds, 5):
        for img, lab in zip(x, y):
            key = np.round(img * 255).astype(np.uint8).tobytes()
            assert lab in lookup[key]


def test_without_replacement_when_enough_examples():
    src = _source(per_class=(6, 9))
    for idx in _islice(
        data.index_batches(src.labels, src.classes, 4, 5, 0), 20
    ):
        for block in idx.reshape(4, 5):
            assert len(set(block.tolist())) == 5


def test_with_replacement_for_small_classes():
    labels = np.array([0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    seen = False
    for idx in _islice(data.index_batches(labels, [0, 1, 2, 3], 4, 3, 1), 5):
        block0 = idx[labels[idx] == 0]
        assert np.all(block0 == 0) and len(block0) == 3
        seen = True
    assert seen


def _islice(gen, n):
    return [next(gen) for _ in range(n)]


def test_every_class_visited_before_repeating():
    labels = np.repeat(np.arange(10), 4)
    idx = _islice(data.index_batches(labels, np.arange(10), 5, 2, 3), 2)
    first_epoch = np.concatenate(idx)
    assert set(labels[first_epoch].tolist()) == set(range(10))


def test_reproducible_under_seed():
    src = _source()
    a = _take(data.balanced_dataset(src, src.classes, 4, 2, 8, 1, seed=11), 6)
    b = _take(data.balanced_dataset(src, src.classes, 4, 2, 8, 1, seed=11), 6)
    c = _take(data.balanced_dataset(src, src.classes, 4, 2, 8, 1, seed=12), 6)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa, xb)
    assert any(not np.array_equal(ya, yc) for (_, ya), (_, yc) in zip(a, c))


def test_reiterating_the_dataset_repeats_it():
    src = _source()
    ds = data.balanced_dataset(src, src.classes, 4, 2, 8, 1, seed=2)
    a, b = _take(ds, 3), _take(ds, 3)
    for (_, ya), (_, yb) in zip(a, b):
        np.testing.assert_array_equal(ya, yb)


def test_split_classes_never_leak():
    src = _source(num_classes=20, per_class=(2, 6))
    s = data.split_classes(src.labels, val_fraction=0.3, seed=0)
    for name, other in (("train", ("val", "test")), ("val", ("train",))):
        classes = s[name]
        p = min(3, len(classes))
        ds = data.balanced_dataset(src, classes, p, 2, 8, 1, seed=0)
        got = np.concatenate([y for _, y in _take(ds, 15)])
        assert set(got.tolist()) <= set(classes.tolist())
        for o in other:
            assert not set(got.tolist()) & set(s[o].tolist())


def test_mixed_size_source_batches():
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 255, (int(rng.integers(5, 20)), 9, c), np.uint8)
        for c in [1, 3] * 12
    ]
    src = data.ArraySource(images, np.repeat(np.arange(6), 4))
    ds = data.balanced_dataset(src, src.classes, 3, 2, 12, 3, seed=0)
    for x, y in _take(ds, 4):
        assert x.shape == (6, 12, 12, 3)
        assert len(np.unique(y)) == 3


def test_augmentation_keeps_shape_and_changes_images():
    src = _source()
    plain = _take(data.balanced_dataset(src, src.classes, 4, 2, 8, 1, 3), 2)
    aug = _take(
        data.balanced_dataset(
            src, src.classes, 4, 2, 8, 1, 3, augment="crop_flip"
        ),
        2,
    )
    for (xp, yp), (xa, ya) in zip(plain, aug):
        np.testing.assert_array_equal(yp, ya)
        assert xa.shape == xp.shape and xa.dtype == np.float32
    assert any(not np.allclose(xp, xa) for (xp, _), (xa, _) in zip(plain, aug))
    again = _take(
        data.balanced_dataset(
            src, src.classes, 4, 2, 8, 1, 3, augment="crop_flip"
        ),
        2,
    )
    for (xa, _), (xb, _) in zip(aug, again):
        np.testing.assert_array_equal(xa, xb)


def test_make_augmentation_layers():
    import keras

    assert data.make_augmentation(None) is None
    assert data.make_augmentation("none") is None
    layers = data.make_augmentation("crop_flip").layers
    assert isinstance(layers[0], keras.layers.RandomZoom)
    assert isinstance(layers[1], keras.layers.RandomFlip)
    glyph = data.make_augmentation({"crop": True, "flip": False}).layers
    assert not any(isinstance(lay, keras.layers.RandomFlip) for lay in glyph)
    with pytest.raises(ValueError, match="unknown preset"):
        data.make_augmentation("rotate")
    with pytest.raises(ValueError, match="unknown key"):
        data.make_augmentation({"crop": True, "colour": 1})
    with pytest.raises(ValueError, match="crop_scale"):
        data.make_augmentation({"crop": True, "crop_scale": 1.5})


@pytest.mark.parametrize(
    "p, k, key",
    [
        (4, 1, "samples_per_class"),
        (4, 0, "samples_per_class"),
        (13, 2, "classes_per_batch"),
        (0, 2, "classes_per_batch"),
        (2.5, 2, "classes_per_batch"),
    ],
)
def test_bad_p_k_raise_naming_the_key(p, k, key):
    src = _source()
    with pytest.raises(ValueError, match=key):
        data.balanced_dataset(src, src.classes, p, k, 8, 1)


def test_steps_per_epoch():
    labels = np.repeat(np.arange(10), 7)  # 70 examples
    assert data.steps_per_epoch(labels, np.arange(10), 4, 2) == 70 // 8
    assert data.steps_per_epoch(labels, [0, 1], 4, 4) == 1  # at least 1
    src = data.ArraySource(np.zeros((70, 4, 4), np.uint8), labels)
    assert data.steps_per_epoch(src, np.arange(5), 5, 2) == 35 // 10


def test_eval_dataset_is_finite_ordered_and_capped():
    src = _source(size=8)
    classes = src.classes[:5]
    idx = src.indices_of(classes)
    ds = data.eval_dataset(src, classes, 7, 8, 3)
    ys = np.concatenate([y.numpy() for _, y in ds])
    xs = np.concatenate([x.numpy() for x, _ in ds])
    np.testing.assert_array_equal(ys, src.labels[idx])
    assert xs.shape == (len(idx), 8, 8, 3)
    capped = data.eval_dataset(src, classes, 7, 8, 3, max_per_class=2)
    yc = np.concatenate([y.numpy() for _, y in capped])
    assert np.all(
        np.bincount(yc)[classes]
        == np.minimum(2, np.bincount(src.labels)[classes])
    )


def test_load_split_arrays_matches_split():
    cfg = {
        "data": {
            "source": "synthetic",
            "val_classes": 3,
            "test_fraction": 0.5,
            "num_classes": 12,
            "examples_per_class": 3,
            "size": 10,
        },
        "model": {"image_size": 8, "channels": 3},
        "train": {"seed": 4},
    }
    x, y = data.load_split_arrays(cfg, "test")
    assert x.dtype == np.uint8 and x.shape == (18, 8, 8, 3)
    assert set(y.tolist()) == set(range(6, 12))
    xv, yv = data.load_split_arrays(cfg, "val")
    s = data.split_classes(np.arange(12), val_classes=3, seed=4)
    assert set(yv.tolist()) == set(s["val"].tolist())
    with pytest.raises(ValueError, match="split"):
        data.load_split_arrays(cfg, "dev")


def test_example_ids_are_the_source_index_of_each_image():
    """example_ids=True: y = {labels, example_ids}; the id of a row is the
    source index of its image (stable across batches: the memory's drift
    metric matches an image with its own stored copy by it)."""
    src = _source(size=6)
    plain = data.balanced_dataset(src, src.classes, 4, 3, 6, 1, seed=5)
    ds = data.balanced_dataset(
        src, src.classes, 4, 3, 6, 1, seed=5, example_ids=True
    )
    for (x, y), (x0, y0) in zip(ds.take(5), plain.take(5)):
        ids, labels = y["example_ids"].numpy(), y["labels"].numpy()
        assert ids.dtype == np.int32 and labels.dtype == np.int32
        np.testing.assert_array_equal(labels, y0.numpy())
        np.testing.assert_array_equal(x.numpy(), x0.numpy())
        np.testing.assert_array_equal(src.labels[ids], labels)
        want = src.images[ids].astype(np.float32) / 255.0
        np.testing.assert_allclose(x.numpy(), want.reshape(x.shape), atol=1e-6)
