"""Sources (npz, folder, arrays, synthetic, TFDS), preprocessing, configs."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from tfdml import data


def _collect(ds):
    return [(x.numpy(), y.numpy()) for x, y in ds]


def test_array_source_gray_and_rgb():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 5, 7), np.uint8)
    src = data.ArraySource(x, [0, 0, 1, 1, 2, 2])
    assert src.labels.dtype == np.int64
    np.testing.assert_array_equal(src.classes, [0, 1, 2])
    out = _collect(src.dataset([4, 1]))
    assert out[0][0].shape == (5, 7, 1) and out[0][0].dtype == np.uint8
    np.testing.assert_array_equal(out[0][0][..., 0], x[4])
    assert [y for _, y in out] == [2, 0]
    rgba = rng.integers(0, 256, (2, 4, 4, 4), np.uint8)
    src = data.ArraySource(rgba, [0, 1])
    np.testing.assert_array_equal(src.load(1), rgba[1, ..., :3])


@pytest.mark.parametrize(
    "images, labels, match",
    [
        (np.zeros((2, 4, 4), np.float32), [0, 1], "uint8"),
        (np.zeros((2, 4, 4, 2), np.uint8), [0, 1], "shape"),
        (np.zeros((3, 4, 4), np.uint8), [0, 1], "length"),
        (np.zeros((2, 4, 4), np.uint8), [0.5, 1.0], "integer"),
        (np.zeros((2, 4, 4), np.uint8), [-1, 1], ">= 0"),
    ],
)
def test_array_source_rejects_bad_input(images, labels, match):
    with pytest.raises(ValueError, match=match):
        data.ArraySource(images, np.asarray(labels))


def test_npz_source(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (8, 6, 6, 3), np.uint8)
    y = np.repeat([3, 5], 4)
    path = str(tmp_path / "d.npz")
    np.savez(path, X=x, y=y)
    src = data.source_from_config({"source": "npz", "path": path})
    np.testing.assert_array_equal(src.labels, y)
    np.testing.assert_array_equal(src.load(6), x[6])
    np.savez(str(tmp_path / "bad.npz"), images=x, y=y)
    with pytest.raises(ValueError, match="missing array"):
        data.source_from_config(
            {"source": "npz", "path": str(tmp_path / "bad.npz")}
        )
    with pytest.raises(ValueError, match="no such"):
        data.source_from_config({"source": "npz", "path": "/nonexistent.npz"})


def test_folder_source_mixed_gray_rgb_sizes(tmp_path):
    rng = np.random.default_rng(2)
    expected = {}
    specs = {
        "cat": [("L", (10, 12)), ("RGB", (20, 8)), ("RGBA", (9, 9))],
        "dog": [("RGB", (31, 17)), ("L", (5, 40))],
        "eel": [("P", (12, 12)), ("L", (7, 7))],
    }
    for name, files in specs.items():
        (tmp_path / name).mkdir()
        for j, (mode, (w, h)) in enumerate(files):
            ch = {"L": 1, "RGB": 3, "RGBA": 4, "P": 1}[mode]
            arr = rng.integers(0, 256, (h, w, ch), np.uint8).squeeze()
            im = Image.fromarray(arr, "L" if mode == "P" else mode)
            if mode == "P":
                im = im.convert("P")
            ext = "jpg" if (mode == "RGB" and j == 1) else "png"
            im.save(tmp_path / name / f"{j}.{ext}")
            expected[(name, j)] = (h, w)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    src = data.source_from_config({"source": "folder", "path": str(tmp_path)})
    assert src.class_names == ["cat", "dog", "eel"]
    np.testing.assert_array_equal(src.labels, [0, 0, 0, 1, 1, 2, 2])
    shapes = [src.load(i).shape for i in range(len(src))]
    assert shapes[0] == (12, 10, 1) and shapes[1] == (8, 20, 3)
    assert shapes[2] == (9, 9, 3)  # RGBA -> RGB
    for c in (1, 3):
        ds = data.eval_dataset(src, src.classes, 3, 16, c)
        xs = np.concatenate([x.numpy() for x, _ in ds])
        assert xs.shape == (7, 16, 16, c) and xs.dtype == np.float32
        assert 0.0 <= xs.min() and xs.max() <= 1.0
    with pytest.raises(ValueError, match="no images"):
        (tmp_path / "empty" / "x").mkdir(parents=True)
        data.FolderSource(str(tmp_path / "empty"))


def test_synthetic_is_deterministic_and_learnable():
    a = data.source_from_config({"source": "synthetic"})
    b = data.source_from_config({"source": "synthetic"})
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    other = data.SyntheticSource(seed=1)
    assert not np.array_equal(a.images, other.images)
    assert a.images.dtype == np.uint8 and a.images.shape[1:] == (32, 32, 1)
    assert len(a.classes) == 24
    # class structure: nearest class mean (leave-one-out) on raw pixels
    x = a.images.reshape(len(a), -1).astype(np.float64)
    y = a.labels
    means = np.stack([x[y == c].mean(0) for c in a.classes])
    pred = np.argmin(((x[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert np.mean(pred == y) > 0.8  # chance is 1/24
    rgb = data.SyntheticSource(num_classes=3, examples_per_class=2, channels=3)
    assert rgb.images.shape == (6, 32, 32, 3)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("in_shape", [(9, 13, 1), (40, 20, 3), (7, 7)])
def test_preprocess_shape_dtype_range(in_shape, channels):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, in_shape, np.uint8)
    if img.ndim == 2:
        img = img[..., None]
    out = data.preprocess(img, 16, channels).numpy()
    assert out.shape == (16, 16, channels) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    batch = data.preprocess(np.stack([img, img]), (8, 12), channels).numpy()
    assert batch.shape == (2, 8, 12, channels)


def test_preprocess_values():
    """Same size, same channels: exactly x / 255; gray -> RGB replicates."""
    img = np.arange(16, dtype=np.uint8).reshape(4, 4, 1) * 16
    out = data.preprocess(img, 4, 1).numpy()
    np.testing.assert_allclose(out, img / 255.0, atol=1e-6)
    rgb = data.preprocess(img, 4, 3).numpy()
    for k in range(3):
        np.testing.assert_allclose(rgb[..., k], out[..., 0], atol=1e-6)
    white = np.full((5, 5, 3), 255, np.uint8)
    # rgb_to_grayscale weights sum to 0.9999
    np.testing.assert_allclose(
        data.preprocess(white, 3, 1).numpy(), 1.0, atol=2e-4
    )
    with pytest.raises(ValueError, match="channels"):
        data.preprocess(img, 4, 2)


def test_preprocess_unknown_channels_in_graph():
    @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.uint8)])
    def f(x):
        return data.preprocess(x, 6, 3)

    assert f(np.zeros((4, 5, 1), np.uint8)).shape == (6, 6, 3)
    assert f(np.zeros((9, 5, 3), np.uint8)).shape == (6, 6, 3)


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"source": "imagenet"}, "data.source"),
        ({"source": "npz"}, "data.path"),
        ({"source": "folder"}, "data.path"),
        ({"source": "tfds"}, "data.name"),
        ({"source": "npz", "path": "x.npz", "colour": 1}, "colour"),
        ({"source": "synthetic", "num_classes": 1}, "num_classes"),
        ({"source": "synthetic", "synthetic_channels": 2}, "channels"),
    ],
)
def test_bad_configs_raise(cfg, match):
    with pytest.raises(ValueError, match=match):
        data.source_from_config(cfg)


def test_sampler_keys_are_ignored_by_the_source():
    cfg = {
        "source": "synthetic",
        "classes_per_batch": 4,
        "samples_per_class": 2,
        "val_classes": 0.2,
        "test_fraction": 0.5,
        "augmentation": "none",
        "name": None,
        "path": None,
        "data_dir": None,
    }
    src = data.source_from_config(cfg, image_size=16, channels=1)
    assert len(src.classes) == 24


@pytest.mark.parametrize(
    "name, label_key",
    [
        ("caltech_birds2011", "label"),
        ("cars196", "label"),
        ("stanford_online_products", "class_id"),
    ],
)
def test_tfds_source_with_mock_data(name, label_key):
    with tfds.testing.mock_data(num_examples=12):
        src = data.source_from_config({"source": "tfds", "name": name})
        assert src.label_key == label_key
        assert len(src) > 0 and src.labels.dtype == np.int64
        img = src.load(0)
        assert img.dtype == np.uint8 and img.ndim == 3
        ds = data.eval_dataset(src, src.classes, 5, 24, 3)
        xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
        assert np.concatenate(xs).shape == (len(src), 24, 24, 3)
        np.testing.assert_array_equal(np.concatenate(ys), src.labels)
        with pytest.raises(ValueError, match="label_key"):
            data.source_from_config(
                {"source": "tfds", "name": name, "label_key": "nope"}
            )
