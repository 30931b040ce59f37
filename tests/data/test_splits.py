"""Class-disjoint splits: the second half of the sorted class ids is test."""

import numpy as np
import pytest

from tfdml.data import split_classes


def _labels(n_classes, per_class=3, offset=0):
    return np.repeat(np.arange(n_classes) * 2 + offset, per_class)


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("n", [10, 11, 200])
def test_disjoint_and_complete(seed, n):
    labels = _labels(n)
    s = split_classes(labels, test_fraction=0.5, val_fraction=0.2, seed=seed)
    ids = np.unique(labels)
    sets = {k: set(v.tolist()) for k, v in s.items()}
    assert not sets["train"] & sets["val"]
    assert not sets["train"] & sets["test"]
    assert not sets["val"] & sets["test"]
    assert sets["train"] | sets["val"] | sets["test"] == set(ids.tolist())
    n_test = int(round(n * 0.5))
    # test = the highest class ids; validation only from the first half
    np.testing.assert_array_equal(s["test"], ids[n - n_test :])
    assert max(sets["val"]) < min(sets["test"])
    assert len(s["val"]) == max(1, int(round(0.2 * (n - n_test))))
    for v in s.values():
        assert v.dtype == np.int64
        assert np.all(np.diff(v) > 0)


def test_seed_reproducible_and_varies():
    labels = _labels(100)
    a = split_classes(labels, val_fraction=0.3, seed=3)
    b = split_classes(labels, val_fraction=0.3, seed=3)
    c = split_classes(labels, val_fraction=0.3, seed=4)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["val"], c["val"])
    # test classes never depend on the seed
    np.testing.assert_array_equal(a["test"], c["test"])


def test_val_classes_count_and_fraction():
    labels = _labels(40)
    s = split_classes(labels, test_fraction=0.5, val_classes=4, seed=0)
    assert len(s["val"]) == 4 and len(s["train"]) == 16
    s = split_classes(labels, test_fraction=0.5, val_classes=0.25, seed=0)
    assert len(s["val"]) == 5
    s = split_classes(labels, test_fraction=0.5, val_classes=0, seed=0)
    assert len(s["val"]) == 0 and len(s["train"]) == 20


def test_class_ids_as_input_equal_labels_as_input():
    labels = _labels(30, per_class=5)
    a = split_classes(labels, seed=2)
    b = split_classes(np.unique(labels), seed=2)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"val_classes": 5}, "val_classes"),  # 5 of the 5 training classes
        ({"val_classes": -1}, "val_classes"),
        ({"val_classes": "3"}, "val_classes"),
        ({"val_fraction": 0.1, "val_classes": 1}, "not both"),
    ],
)
def test_impossible_requests_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        split_classes(_labels(10), **kwargs)


def test_single_class_raises():
    with pytest.raises(ValueError, match="at least 2 classes"):
        split_classes(np.zeros(5, int))
