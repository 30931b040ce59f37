"""Argument checks shared by layers, losses, weightings and memories: one
home, clear ``ValueError``s that name the argument (NaN is refused too)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import numpy as np


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """Returns ``int(value)``; raises naming the argument unless it is an
    integer (not a bool) ``>= minimum``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < minimum
    ):
        raise ValueError(
            f"`{name}` must be an integer >= {minimum}; received "
            f"{name}={value!r}."
        )
    return int(value)


def _is_number(value):
    return not isinstance(value, bool) and isinstance(
        value, (int, float, np.integer, np.floating)
    )


def check_non_negative(name: str, value: Any) -> float:
    """Returns ``float(value)``; raises ``ValueError`` naming the argument
    unless ``value >= 0`` (None and NaN are refused)."""
    if not _is_number(value) or not value >= 0:
        raise ValueError(f"`{name}` must be >= 0; received {name}={value!r}.")
    return float(value)


def check_positive(name: str, value: Any) -> float:
    """Returns ``float(value)``; raises ``ValueError`` naming the argument
    unless ``value > 0`` (None and NaN are refused)."""
    if not _is_number(value) or not value > 0:
        raise ValueError(f"`{name}` must be > 0; received {name}={value!r}.")
    return float(value)


def check_choice(name: str, value: Any, choices: Collection[Any]) -> Any:
    """Returns ``value``; raises ``ValueError`` naming the argument and the
    accepted values unless ``value`` is one of ``choices``."""
    if value not in choices:
        try:
            shown = sorted(choices)
        except TypeError:  # e.g. None among strings
            shown = list(choices)
        raise ValueError(
            f"`{name}` must be one of {shown}; received {name}={value!r}."
        )
    return value
