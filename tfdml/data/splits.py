"""Class-disjoint splits (the DML protocol).

The second half of the sorted class ids is the test split (untouched);
validation classes are drawn (seeded) from the first half; the rest of the
first half is the training split. Oh Song et al., "Deep Metric Learning
via Lifted Structured Feature Embedding", CVPR 2016 (the CUB / Cars / SOP
protocol).
"""

from __future__ import annotations

import numbers

import numpy as np
import numpy.typing as npt


def split_classes(
    labels: npt.ArrayLike,
    test_fraction: float = 0.5,
    val_fraction: float | None = None,
    seed: int = 0,
    *,
    val_classes: int | float | None = None,
) -> dict[str, np.ndarray]:
    """Splits class ids into disjoint ``train`` / ``val`` / ``test`` sets.

    Args:
      labels: int labels ``[N]`` (or the class ids themselves); only the
        distinct values matter.
      test_fraction: fraction of the classes (the highest sorted ids) held
        out as test, in (0, 1).
      val_fraction: fraction of the *training half* used for validation,
        in [0, 1). Default 0.2 when ``val_classes`` is not given either.
      seed: seeds the choice of validation classes.
      val_classes: alternative to ``val_fraction``: an int count, or a
        float in [0, 1) read as a fraction.

    Returns:
      ``{"train", "val", "test"}``: sorted np.int64 class id arrays.

    Raises:
      ValueError: impossible requests (naming the argument and value).
    """
    ids = np.unique(np.asarray(labels).reshape(-1)).astype(np.int64)
    n = len(ids)
    if n < 2:
        raise ValueError(f"labels: need at least 2 classes; received {n}")
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(
            f"test_fraction must be in (0, 1); received {test_fraction}"
        )
    n_test = int(round(n * float(test_fraction)))
    if n_test < 1 or n_test >= n:
        raise ValueError(
            f"test_fraction={test_fraction} of {n} classes leaves "
            f"{n_test} test and {n - n_test} training classes; both need >= 1"
        )
    first, test = ids[: n - n_test], ids[n - n_test :]
    if val_fraction is not None and val_classes is not None:
        raise ValueError(
            "give val_fraction or val_classes, not both; received "
            f"val_fraction={val_fraction}, val_classes={val_classes}"
        )
    name, value = "val_classes", val_classes
    if val_classes is None:
        name = "val_fraction"
        value = 0.2 if val_fraction is None else val_fraction
    if isinstance(value, bool) or not isinstance(value, numbers.Number):
        raise ValueError(f"{name} must be a number; received {value!r}")
    if name == "val_classes" and isinstance(value, numbers.Integral):
        n_val = int(value)
        if n_val < 0:
            raise ValueError(f"val_classes must be >= 0; received {value}")
    else:
        if not 0.0 <= float(value) < 1.0:
            raise ValueError(
                f"{name} as a fraction must be in [0, 1); received {value}"
            )
        n_val = int(round(float(value) * len(first)))
        if float(value) > 0:
            n_val = max(n_val, 1)
    if n_val >= len(first):
        raise ValueError(
            f"{name}={value} asks for {n_val} validation classes but the "
            f"training half has only {len(first)}; at least one must stay "
            "for training"
        )
    rng = np.random.default_rng(seed)
    val = np.sort(rng.choice(first, n_val, replace=False)).astype(np.int64)
    train = np.setdiff1d(first, val).astype(np.int64)
    return {"train": train, "val": val, "test": test.astype(np.int64)}
