"""Compatibility module: the config schema moved to
:mod:`tfdml.training.config`; ``tfdml.config.X`` keeps working for every
public name."""

from tfdml.training.config import PASSTHROUGH
from tfdml.training.config import REGISTRY_SECTIONS
from tfdml.training.config import SCHEMA
from tfdml.training.config import SECTIONS
from tfdml.training.config import ConfigError
from tfdml.training.config import Field
from tfdml.training.config import apply_overrides
from tfdml.training.config import check_value
from tfdml.training.config import defaults
from tfdml.training.config import dump_yaml
from tfdml.training.config import load
from tfdml.training.config import parse_override
from tfdml.training.config import parse_yaml
from tfdml.training.config import resolve

__all__ = [
    "SECTIONS",
    "REGISTRY_SECTIONS",
    "PASSTHROUGH",
    "ConfigError",
    "parse_yaml",
    "dump_yaml",
    "Field",
    "SCHEMA",
    "check_value",
    "defaults",
    "resolve",
    "parse_override",
    "apply_overrides",
    "load",
]
