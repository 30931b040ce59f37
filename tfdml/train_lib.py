"""Compatibility module: the training application moved to
:mod:`tfdml.training` (``docs/architecture.md``).

``tfdml.train_lib.X`` keeps working for every public name it had; new code
imports from the module that owns the name:

* :mod:`tfdml.training.build`: validation, data, the built objects
* :mod:`tfdml.training.checkpoint`: checkpoints and ``state.json``
* :mod:`tfdml.training.callbacks`: the Keras callbacks of a run
* :mod:`tfdml.training.loop`: :func:`main` (fit, resume, distribution)
* :mod:`tfdml.training.report`: test evaluation, plots, export
* :mod:`tfdml.training.run_dir`: the run folder
"""

from tfdml.training.build import INIT_ENCODERS
from tfdml.training.build import Built
from tfdml.training.build import Data
from tfdml.training.build import Parts
from tfdml.training.build import apply_init_from
from tfdml.training.build import build_loss
from tfdml.training.build import build_model
from tfdml.training.build import build_optimizer
from tfdml.training.build import build_registry_object
from tfdml.training.build import check_class_sizes
from tfdml.training.build import check_data
from tfdml.training.build import check_init_from
from tfdml.training.build import describe
from tfdml.training.build import eval_metrics
from tfdml.training.build import init_from_encoder
from tfdml.training.build import input_shape
from tfdml.training.build import match_init_weights
from tfdml.training.build import monitor_metrics
from tfdml.training.build import passthrough_kwargs
from tfdml.training.build import plain
from tfdml.training.build import validate
from tfdml.training.build import validate_objects
from tfdml.training.callbacks import RECALIBRATION_SEED_OFFSET
from tfdml.training.callbacks import chief_callbacks
from tfdml.training.callbacks import make_callbacks_module
from tfdml.training.callbacks import recalibrate
from tfdml.training.callbacks import recalibration_data
from tfdml.training.callbacks import trim_history
from tfdml.training.callbacks import validation_callback
from tfdml.training.checkpoint import STATE_FILE
from tfdml.training.checkpoint import Checkpointer
from tfdml.training.checkpoint import RunState
from tfdml.training.checkpoint import state_variables
from tfdml.training.config import ConfigError
from tfdml.training.loop import EXIT_CONFIG
from tfdml.training.loop import EXIT_INTERRUPTED
from tfdml.training.loop import EXIT_NAN
from tfdml.training.loop import EXIT_OK
from tfdml.training.loop import check_workers_agree
from tfdml.training.loop import is_chief
from tfdml.training.loop import main
from tfdml.training.loop import make_strategy
from tfdml.training.loop import run_dir_of
from tfdml.training.loop import setup_runtime
from tfdml.training.loop import teardown_runtime
from tfdml.training.loop import train_dataset
from tfdml.training.report import embed_dataset
from tfdml.training.report import evaluate_split
from tfdml.training.report import export_encoder
from tfdml.training.report import finish
from tfdml.training.run_dir import prepare_run_dir
from tfdml.training.run_dir import read_state
from tfdml.training.run_dir import write_state

__all__ = [
    "passthrough_kwargs",
    "build_registry_object",
    "build_loss",
    "describe",
    "plain",
    "Data",
    "check_class_sizes",
    "check_data",
    "Built",
    "validate",
    "INIT_ENCODERS",
    "init_from_encoder",
    "match_init_weights",
    "check_init_from",
    "apply_init_from",
    "validate_objects",
    "eval_metrics",
    "monitor_metrics",
    "build_optimizer",
    "Parts",
    "input_shape",
    "build_model",
    "make_callbacks_module",
    "trim_history",
    "chief_callbacks",
    "RECALIBRATION_SEED_OFFSET",
    "recalibration_data",
    "recalibrate",
    "validation_callback",
    "STATE_FILE",
    "RunState",
    "Checkpointer",
    "state_variables",
    "EXIT_OK",
    "EXIT_CONFIG",
    "EXIT_NAN",
    "EXIT_INTERRUPTED",
    "run_dir_of",
    "setup_runtime",
    "teardown_runtime",
    "make_strategy",
    "is_chief",
    "main",
    "check_workers_agree",
    "train_dataset",
    "embed_dataset",
    "evaluate_split",
    "finish",
    "export_encoder",
    "ConfigError",
    "prepare_run_dir",
    "read_state",
    "write_state",
]
