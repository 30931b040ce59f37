"""tfdml: deep metric learning for TensorFlow 2.20 and Keras 3."""

from tfdml.version import __version__  # noqa: F401
