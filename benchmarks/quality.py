"""Retrieval-quality benchmark: a thin wrapper around ``tfdml.bench``.

Usage (same flags as ``python -m tfdml.bench``)::

  python benchmarks/quality.py --dataset cjk_glyphs/small --methods all \\
      --seeds 3 --steps 300 --out benchmarks/results

Writes ``quality_<dataset>.md`` (table), ``.png`` (bar plot) and ``.json``
(raw per-seed numbers) under ``--out``.
"""

import sys

from tfdml._cpu import enable_onednn

enable_onednn()  # before TensorFlow is imported: tfdml/_cpu.py

from tfdml.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
