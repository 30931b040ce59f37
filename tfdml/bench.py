"""Moved: the benchmark protocol is ``benchmarks/quality.py`` (issue 14).

``python -m tfdml.bench`` only says where it went: the benchmark is an
application over the repository (it reads ``configs/*.yaml``), not part of
the installed package. Run, from a checkout::

  python benchmarks/quality.py --dataset cjk_glyphs/small --methods all \\
      --seeds 3 --steps 300 --out benchmarks/results

(same flags as before; ``--render`` reads results written by either).
"""

import sys
import warnings

MESSAGE = (
    "tfdml.bench moved to benchmarks/quality.py in the repository (same "
    "flags): python benchmarks/quality.py --help"
)


def main(argv=None):
    """Prints where the benchmark went; returns exit status 2."""
    warnings.warn(MESSAGE, DeprecationWarning, stacklevel=2)
    print(MESSAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
