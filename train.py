"""Trains a deep-metric-learning model from a YAML config (a thin CLI over
:mod:`tfdml.training`: :func:`tfdml.training.config.load` and
:func:`tfdml.training.loop.main`).

Usage::

  python train.py --config configs/smoke.yaml [--set section.key=value ...]

Re-running the same command resumes from the last checkpoint of the run
folder (``train.run_dir``, default ``runs/<config name>``). Exit status: 0 on
success, 2 for a bad config (nothing is written), 3 when the loss became NaN
(the last good checkpoint is kept), 130 on Ctrl-C.
"""

import argparse
import sys

from tfdml._cpu import enable_onednn

enable_onednn()  # oneDNN on before TensorFlow is imported: tfdml/_cpu.py


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Train a tfdml model from a YAML config."
    )
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (YAML scalar); repeatable",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the config (building every object) and exit",
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from tfdml.training import config as config_lib
    from tfdml.training import loop

    try:
        cfg = config_lib.load(args.config, args.overrides)
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return loop.EXIT_CONFIG
    return loop.main(cfg, config_path=args.config, check_only=args.check)


if __name__ == "__main__":
    sys.exit(main())
