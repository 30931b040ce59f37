"""tfdml: deep metric learning for TensorFlow 2.20 and Keras 3.

Subpackages load on first use: ``tfdml.losses``, ``tfdml.mining``,
``tfdml.weighting``, ``tfdml.memory``, ``tfdml.models``, ``tfdml.meta``,
``tfdml.augment``, ``tfdml.data``, ``tfdml.eval``, ``tfdml.export``.
"""

import importlib

from tfdml import _cpu
from tfdml.version import __version__  # noqa: F401

_cpu.on_import()  # oneDNN on unless TF is already imported (then: check)

_SUBPACKAGES = (
    "augment",
    "config",
    "data",
    "eval",
    "export",
    "losses",
    "memory",
    "meta",
    "mining",
    "models",
    "ops",
    "registry",
    "weighting",
)


def __getattr__(name):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"tfdml.{name}")
    raise AttributeError(f"module 'tfdml' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBPACKAGES))
