"""oneDNN (TensorFlow's fast CPU kernels) on by default.

TensorFlow reads ``TF_ENABLE_ONEDNN_OPTS`` once, when it is imported. On
Linux the 2.20 wheel turns oneDNN on by itself only on CPUs with AVX-512
VNNI / BF16, AVX-VNNI or AMX; on a plain AVX2 machine (measured: AMD) it
stays off and training ran at 0.53-0.57x PyTorch's speed, 0.98-1.07x with
``TF_ENABLE_ONEDNN_OPTS=1`` (docs/benchmarks.md, "oneDNN").

* :func:`enable_onednn` defaults the variable to ``1``, keeping any value
  the user set. Every entry point (``train.py``, ``export/export.py``,
  ``python -m tfdml.demo``, ``benchmarks/*.py``) calls it
  before TensorFlow is imported, and so does ``import tfdml`` when
  TensorFlow is not imported yet.
* :func:`check_onednn` (run by ``import tfdml`` when TensorFlow was imported
  first) warns once per process, with the fix, when oneDNN is off on a
  machine without a GPU. A user who set ``TF_ENABLE_ONEDNN_OPTS`` to ``0``
  or ``false`` chose that: no warning.

This module must not import TensorFlow (entry points import it first).
"""

import os
import sys
import warnings

ENV = "TF_ENABLE_ONEDNN_OPTS"

_warned = False


class OneDNNWarning(UserWarning):
    """TensorFlow runs without oneDNN on a CPU-only machine (slow)."""


def enable_onednn():
    """Sets ``TF_ENABLE_ONEDNN_OPTS=1`` unless it is set; returns its value.

    Has an effect only before TensorFlow is imported.
    """
    return os.environ.setdefault(ENV, "1")


def _user_disabled():
    # TensorFlow's ReadBoolFromEnvVar: "0" / "false", any case.
    return os.environ.get(ENV, "").strip().lower() in ("0", "false")


def onednn_enabled():
    """Whether the imported TensorFlow uses oneDNN; None if not imported."""
    if "tensorflow" not in sys.modules:
        return None
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:  # private module moved: say nothing
        return None
    return bool(_pywrap_util_port.IsMklEnabled())


def _has_gpu():
    try:
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    except Exception:
        return False


def check_onednn(stacklevel=2):
    """Warns (once per process) when TensorFlow runs without oneDNN on CPU.

    Silent when TensorFlow is not imported, when oneDNN is on, when the user
    set ``TF_ENABLE_ONEDNN_OPTS=0``, or when a GPU is visible. Returns True
    when it warned.
    """
    global _warned
    if _warned or _user_disabled() or onednn_enabled() is not False:
        return False
    if _has_gpu():
        return False
    _warned = True
    warnings.warn(
        "TensorFlow was imported with oneDNN off on a CPU-only machine: "
        "training can run at about half speed. Fix: set "
        f"{ENV}=1 before TensorFlow is imported (in the shell, or "
        f'os.environ.setdefault("{ENV}", "1") at the top of the script, '
        "or import tfdml before tensorflow). "
        f"Set {ENV}=0 to keep oneDNN off without this warning.",
        OneDNNWarning,
        stacklevel=stacklevel,
    )
    return True


def on_import():
    """``import tfdml``: enable oneDNN if TensorFlow is not imported yet,
    else check it."""
    if "tensorflow" in sys.modules:
        # this frame, tfdml/__init__.py (import frames are skipped), the
        # user's ``import tfdml``
        check_onednn(stacklevel=4)
    else:
        enable_onednn()
