"""``make demo`` / ``python -m tfdml.demo``: compatibility entry point of
:mod:`tfdml.training.demo` (CJK glyphs -> train -> evaluate -> export ->
query).

Usage::

  python -m tfdml.demo [--tiny] [--out DIR]
"""

import sys

from tfdml.training.demo import CONFIG
from tfdml.training.demo import TINY
from tfdml.training.demo import build_glyphs
from tfdml.training.demo import main
from tfdml.training.demo import parse_args
from tfdml.training.demo import query_export

__all__ = [
    "CONFIG",
    "TINY",
    "build_glyphs",
    "main",
    "parse_args",
    "query_export",
]

if __name__ == "__main__":
    from tfdml._cpu import enable_onednn

    enable_onednn()  # oneDNN on before TensorFlow is imported: tfdml/_cpu.py
    sys.exit(main())
