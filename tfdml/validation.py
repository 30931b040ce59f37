"""Argument checks shared by layers and losses: clear ``ValueError``s."""

import numpy as np


def check_int(name, value, minimum=1):
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
