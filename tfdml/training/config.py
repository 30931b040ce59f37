"""Training configs: schema, YAML loading, ``--set`` overrides, validation.

A config is a YAML mapping whose top-level sections are named after the
library's modules: ``data, model, loss, miner, weighting, memory, meta,
augment, optimizer, train, eval, export``. :data:`SCHEMA` lists every key of
the sections that belong to the trainer (type, default, check). Library
objects keep their defaults in their constructors:

* ``loss``, ``miner`` and ``weighting`` are registry specs
  (``{name: MultiSimilarityLoss, alpha: 2.0}``) passed to
  :func:`tfdml.registry.build`; they are validated by constructing the object.
* ``model``, ``memory``, ``meta`` and ``augment`` have a few trainer keys
  (listed in :data:`SCHEMA`); their other keys are keyword arguments of the
  library constructor they feed and are checked against its signature by
  :func:`tfdml.training.build.validate` (see ``PASSTHROUGH``).

Every error is a :class:`ConfigError` naming the key
(``data.samples_per_class``)
and the value received. Nothing here touches the disk except reading the YAML.
"""

import copy
import dataclasses
import math
import re
from typing import Any
from typing import Callable

import yaml

SECTIONS = (
    "data",
    "model",
    "loss",
    "miner",
    "weighting",
    "memory",
    "meta",
    "augment",
    "optimizer",
    "train",
    "eval",
    "export",
)

# Sections given to the registry as a whole (None = not used).
REGISTRY_SECTIONS = ("loss", "miner", "weighting")

# Sections whose keys outside SCHEMA are constructor keyword arguments.
PASSTHROUGH = ("data", "model", "memory", "meta", "augment")


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or impossible.

    Attributes:
      key: dotted key (``"data.samples_per_class"``) or section name.
    """

    def __init__(self, key, message):
        self.key = key
        super().__init__(f"{key}: {message}")


# -- YAML --


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` (no dot) as a float (YAML 1.2)."""


_FLOAT = re.compile(
    r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)$"
    r"|^[-+]?(?:[0-9][0-9_]*)?\.[0-9_]+(?:[eE][-+]?[0-9]+)?$"
    r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", _FLOAT, list("-+0123456789.")
)


def _no_duplicates(loader, node, deep=False):
    keys = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in keys:
            raise ConfigError(str(key), "duplicate key in the YAML mapping")
        keys.add(key)
    return loader.construct_mapping(node, deep)


_Loader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates
)


def parse_yaml(text, source="<string>"):
    """Parses YAML text (floats like ``1e-5`` included)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(source, f"invalid YAML: {e}") from None


def dump_yaml(config):
    """YAML text of a resolved config (stable key order)."""
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None)


# -- schema --


@dataclasses.dataclass(frozen=True)
class Field:
    """One config key.

    Attributes:
      type: a Python type or tuple of types (``float`` also accepts ints,
        never bools).
      default: value used when the key is absent.
      check: optional ``value -> error message or None`` (not called on
        ``None`` when ``nullable``).
      nullable: whether ``null`` is allowed.
      doc: one line for ``--help``-style listings.
    """

    type: Any
    default: Any = None
    check: Callable | None = None
    nullable: bool = False
    doc: str = ""


def _ge(lo):
    return lambda v: None if v >= lo else f"must be >= {lo}"


def _gt(lo):
    return lambda v: None if v > lo else f"must be > {lo}"


def _in_unit(v):
    return None if 0.0 < v < 1.0 else "must be in (0, 1)"


def _choice(*options):
    def check(v):
        return None if v in options else f"must be one of {list(options)}"

    return check


def _ints_ge(lo):
    def check(v):
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            return "must be a list of integers"
        if any(x < lo for x in v):
            return f"every entry must be >= {lo}"
        return None

    return check


def _nonempty_ints_ge(lo):
    def check(v):
        if not v:
            return f"must be a non-empty list of integers >= {lo}"
        return _ints_ge(lo)(v)

    return check


def _metric_names(v):
    from tfdml.eval.metrics import _resolve_metrics

    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        return "must be a list of metric names"
    try:
        _resolve_metrics(v, (1,))
    except ValueError as e:
        return str(e).replace("`metrics`: ", "")
    return None


def _increasing_ints(v):
    msg = _ints_ge(1)(v)
    if msg:
        return msg
    if list(v) != sorted(set(v)):
        return "must be strictly increasing"
    return None


SCHEMA = {
    "data": {
        "source": Field(
            str,
            "synthetic",
            _choice(
                "synthetic",
                "tfds",
                "folder",
                "npz",
                "cjk_glyphs",
                "hangul_glyphs",
                "fashion_mnist",
            ),
            doc="where images come from (other data keys: its options)",
        ),
        "name": Field(str, None, nullable=True, doc="TFDS name"),
        "path": Field(str, None, nullable=True, doc="folder or .npz path"),
        "data_dir": Field(str, None, nullable=True, doc="TFDS data_dir"),
        "classes_per_batch": Field(int, 8, _ge(2), doc="P classes per batch"),
        "samples_per_class": Field(
            int, 4, _ge(2), doc="K samples per class (K >= 2 for positives)"
        ),
        "val_classes": Field(
            (int, float),
            0.2,
            _gt(0),
            doc="validation classes carved from the training classes "
            "(an int count, or a fraction < 1)",
        ),
        "test_fraction": Field(
            float, 0.5, _in_unit, doc="fraction of classes held out as test"
        ),
        "augmentation": Field(
            (str, dict),
            "none",
            doc="none | flip | crop | crop_flip | {crop, crop_scale, flip}",
        ),
        "eval_max_per_class": Field(
            int,
            None,
            _ge(2),
            nullable=True,
            doc="cap per class at eval (>= 2: a query needs a positive)",
        ),
    },
    "model": {
        "image_size": Field(int, 64, _ge(8), doc="input height = width"),
        "channels": Field(int, 3, _choice(1, 3), doc="input channels"),
        "classification_head": Field(
            bool, False, doc="add a logits output over the training classes"
        ),
    },
    "memory": {
        "size": Field(int, 0, _ge(0), doc="XBM size M; 0 = no memory"),
        "start_after": Field(int, 0, _ge(0), doc="steps before use"),
    },
    "meta": {
        "method": Field(str, "none", _choice("none", "mmsi")),
        "val_classes_per_batch": Field(int, 10, _ge(1)),
        "val_samples_per_class": Field(int, 1, _ge(1)),
    },
    "augment": {
        "method": Field(str, "none", _choice("none", "iaa")),
    },
    "optimizer": {
        "name": Field(str, "adam", _choice("adam", "adamw", "sgd", "rmsprop")),
        "learning_rate": Field(float, 1e-3, _gt(0.0)),
        "weight_decay": Field(float, None, _ge(0.0), nullable=True),
        "momentum": Field(float, 0.0, _ge(0.0), doc="sgd / rmsprop"),
        "clipnorm": Field(float, None, _gt(0.0), nullable=True),
        "schedule": Field(
            str, "constant", _choice("constant", "multistep", "cosine")
        ),
        "milestones": Field(
            list,
            [],
            _increasing_ints,
            doc="multistep: epochs at which lr *= gamma",
        ),
        "gamma": Field(float, 0.1, _gt(0.0), doc="multistep factor"),
        "proxy_lr_multiplier": Field(
            float,
            None,
            _gt(0.0),
            nullable=True,
            doc="proxy losses: a second optimizer for the proxies at "
            "learning_rate x this (same schedule); null: one optimizer",
        ),
    },
    "train": {
        "epochs": Field(int, 2, _ge(1)),
        "steps_per_epoch": Field(int, 10, _ge(1)),
        "seed": Field(int, 0, _ge(0)),
        "deterministic": Field(
            bool, False, doc="tf.config.experimental.enable_op_determinism"
        ),
        "mixed_precision": Field(bool, False, doc="mixed_float16 policy"),
        "jit_compile": Field(bool, False, doc="XLA (single device only)"),
        "strategy": Field(
            str, "none", _choice("none", "mirrored", "multi_worker")
        ),
        "run_dir": Field(
            str, None, nullable=True, doc="default: runs/<config name>"
        ),
        "overwrite": Field(
            bool, False, doc="start afresh even if the run folder has a run"
        ),
        "keep_checkpoints": Field(int, 2, _ge(1)),
        "classification_loss_weight": Field(float, 0.0, _ge(0.0)),
        "classification_loss": Field(
            str,
            "sparse_ce",
            _choice("sparse_ce", "gaussian_weighted"),
            doc="loss of the classification head: sparse_ce, or "
            "gaussian_weighted (official OSM + CAA: CE with sample weights "
            "N(p; 0.5, 0.18) of the true-class probability)",
        ),
        "init_from": Field(
            str,
            None,
            nullable=True,
            doc="warm start: a run folder whose best_encoder.keras (else "
            "final_encoder.keras) weights initialise a new run (not a resume)",
        ),
        "verbose": Field(int, 1, _choice(0, 1, 2)),
        "debug_inject_nan_at_step": Field(
            int,
            None,
            _ge(0),
            nullable=True,
            doc="test only: poisons the weights before this global step",
        ),
    },
    "eval": {
        "every_n_epochs": Field(int, 1, _ge(1)),
        "every_n_steps": Field(
            int,
            None,
            _ge(1),
            nullable=True,
            doc="also evaluate every N training steps (TensorBoard tags "
            "val_*_by_step in tb/eval_steps; epoch-end evaluations, history "
            "and the best encoder are unchanged)",
        ),
        "projector": Field(
            bool,
            False,
            doc="write the TensorBoard embedding projector files (labels, "
            "image sprite) of the validation embeddings to tb/projector at "
            "every epoch-end evaluation",
        ),
        "projector_points": Field(
            int,
            1000,
            lambda v: None if 1 <= v <= 10000 else "must be in [1, 10000]",
            doc="validation items shown in the projector (a seeded sample)",
        ),
        "monitor": Field(
            str,
            "map@r",
            doc="validation metric for best_encoder.keras (without val_)",
        ),
        "recall_at": Field(list, [1, 2, 4, 8], _nonempty_ints_ge(1)),
        "metrics": Field(
            list,
            ["recall", "precision@1", "r_precision", "map@r"],
            _metric_names,
            doc="validation / test metrics (tfdml.eval.retrieval_metrics "
            "names; 'recall' = recall@K for K in recall_at); eval.monitor is "
            "always added. 'map' and 'mrr' need every relevant item's rank "
            "(a slower path)",
        ),
        "index": Field(
            str,
            "brute_force",
            _choice("brute_force", "scann", "bruteforce"),
            doc="'bruteforce' is the old spelling of 'brute_force'",
        ),
        "batch_size": Field(int, 128, _ge(1)),
        "plots": Field(bool, True),
        "recalibrate_bn": Field(
            bool,
            True,
            doc="precise BN: before every validation / test evaluation and "
            "the export, set BatchNorm moving statistics to the exact "
            "statistics of training-mode batches (no-op without trainable "
            "BatchNorm)",
        ),
        "recalibrate_images": Field(
            int,
            1024,
            _ge(1),
            doc="training images (in training batches) used by recalibrate_bn",
        ),
    },
    "export": {
        "enabled": Field(bool, False, doc="write RUN_DIR/export at the end"),
        "dir": Field(str, None, nullable=True, doc="default RUN_DIR/export"),
        "index": Field(
            str,
            "brute_force",
            _choice("brute_force", "scann", "both", "bruteforce"),
            doc="as export/export.py --index; 'bruteforce' is the old "
            "spelling of 'brute_force'",
        ),
        "threshold": Field(
            float,
            None,
            lambda v: None if -1.0 <= v <= 1.0 else "must be in [-1, 1]",
            nullable=True,
            doc="cosine-similarity threshold: the search signatures also "
            "return matched = scores >= threshold",
        ),
        "target_precision": Field(
            float,
            None,
            lambda v: None if 0.0 < v <= 1.0 else "must be in (0, 1]",
            nullable=True,
            doc="calibrate the threshold on the validation classes for this "
            "precision (tfdml.eval.calibrate); exclusive with threshold; "
            "unreachable there: a warning, export without a threshold",
        ),
        "calibration_mode": Field(
            str,
            "pairs",
            _choice("pairs", "nearest"),
            doc="what target_precision is measured on: same-class pairs, or "
            "each query's nearest match",
        ),
    },
}


def _type_name(t):
    if isinstance(t, tuple):
        return " or ".join(x.__name__ for x in t)
    return t.__name__


def check_value(key, field, value):
    """Type- and value-checks ``value`` for ``field``; returns the value.

    Ints are accepted (and converted) where a float is expected; bools never
    count as numbers.
    """
    if value is None:
        if field.nullable:
            return None
        raise ConfigError(key, "must not be null")
    types = field.type if isinstance(field.type, tuple) else (field.type,)
    ok = False
    if isinstance(value, bool):
        ok = bool in types
    elif isinstance(value, int):
        ok = int in types or float in types
        if ok and int not in types:
            value = float(value)
    elif isinstance(value, float):
        ok = float in types
        if ok and not math.isfinite(value):
            raise ConfigError(key, f"must be finite; received {value!r}")
    else:
        ok = isinstance(value, types)
    if not ok:
        raise ConfigError(
            key,
            f"expected {_type_name(field.type)}; received {value!r} "
            f"({type(value).__name__})",
        )
    if field.check is not None:
        msg = field.check(value)
        if msg:
            raise ConfigError(key, f"{msg}; received {value!r}")
    return value


def defaults():
    """The config of all defaults (registry sections are null)."""
    out = {s: {} for s in SECTIONS}
    for section, fields in SCHEMA.items():
        out[section] = {k: copy.deepcopy(f.default) for k, f in fields.items()}
    for s in REGISTRY_SECTIONS:
        out[s] = None
    return out


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _not_a_mapping(raw):
    return ConfigError(
        "config",
        "the top level must be a mapping of sections "
        f"({', '.join(SECTIONS)}); received a {type(raw).__name__}: "
        f"{raw!r:.80}",
    )


def resolve(raw):
    """Merges ``raw`` over the defaults and checks keys, types and values.

    Registry sections must be null, a class name or a mapping with ``name``;
    passthrough keys are kept as given (checked later against constructors).

    Returns:
      A new dict with every section present.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _not_a_mapping(raw)
    for section in raw:
        if section not in SECTIONS:
            raise ConfigError(
                str(section),
                f"unknown section; expected one of {list(SECTIONS)}",
            )
    out = defaults()
    for section in SECTIONS:
        value = raw.get(section)
        if section in REGISTRY_SECTIONS:
            out[section] = _registry_spec(section, value)
            continue
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(section, f"must be a mapping; received {value!r}")
        fields = SCHEMA.get(section, {})
        for key, v in value.items():
            dotted = f"{section}.{key}"
            if not isinstance(key, str):
                raise ConfigError(dotted, "keys must be strings")
            if key in fields:
                out[section][key] = check_value(dotted, fields[key], v)
            elif section in PASSTHROUGH:
                out[section][key] = v
            else:
                raise ConfigError(
                    dotted,
                    f"unknown key; expected one of {sorted(fields)}",
                )
    _cross_checks(out)
    return out


def _registry_spec(section, value):
    if value is None:
        return None
    if isinstance(value, str):
        return {"name": value}
    if not isinstance(value, dict):
        raise ConfigError(
            section,
            f"must be null, a class name or a mapping with 'name'; "
            f"received {value!r}",
        )
    if "name" not in value or not isinstance(value["name"], str):
        raise ConfigError(
            f"{section}.name", "a class name (string) is required"
        )
    return dict(value)


def _cross_checks(cfg):
    data, train = cfg["data"], cfg["train"]
    vc = data["val_classes"]
    if isinstance(vc, float) and not _is_int(vc) and vc >= 1.0:
        raise ConfigError(
            "data.val_classes",
            f"a fraction must be < 1 (use an int for a count); received {vc!r}",
        )
    if data["source"] == "tfds" and not data.get("name"):
        raise ConfigError("data.name", "required when data.source is 'tfds'")
    if data["source"] in ("folder", "npz") and not data.get("path"):
        raise ConfigError(
            "data.path", f"required when data.source is {data['source']!r}"
        )
    if cfg["loss"] is None:
        raise ConfigError("loss", "a loss is required (e.g. name: ...)")
    if train["strategy"] != "none" and train["jit_compile"]:
        raise ConfigError(
            "train.jit_compile",
            "XLA does not work with a distribution strategy in TF 2.20 "
            "(resource on another device); set it to false",
        )
    ex = cfg["export"]
    if ex["threshold"] is not None and ex["target_precision"] is not None:
        raise ConfigError(
            "export.target_precision",
            "give export.threshold or export.target_precision, not both",
        )
    opt = cfg["optimizer"]
    if opt["schedule"] == "multistep" and not opt["milestones"]:
        raise ConfigError(
            "optimizer.milestones", "required when schedule is 'multistep'"
        )
    if any(m > train["epochs"] for m in opt["milestones"]):
        raise ConfigError(
            "optimizer.milestones",
            f"every milestone must be <= train.epochs={train['epochs']}; "
            f"received {opt['milestones']!r}",
        )


# -- overrides --


def parse_override(text):
    """``"section.key=value"`` -> ``(["section", "key"], value)``.

    The value is parsed as a YAML scalar (or flow list/mapping), so
    ``lr=1e-4`` gives a float, ``true`` a bool and ``null`` None.
    """
    if "=" not in text:
        raise ConfigError(text, "an override must look like section.key=value")
    dotted, value = text.split("=", 1)
    path = dotted.strip().split(".")
    whole = len(path) == 1 and path[0] in REGISTRY_SECTIONS
    if (len(path) < 2 and not whole) or not all(path):
        raise ConfigError(dotted, "an override key must look like section.key")
    return path, parse_yaml(value, source=dotted)


def apply_overrides(raw, overrides):
    """Applies ``--set`` strings to the raw (unresolved) config, in order.

    A registry section can be replaced as a whole (``--set loss=TripletLoss``)
    or key by key (``--set loss.margin=0.2``).
    """
    if raw is not None and not isinstance(raw, dict):
        raise _not_a_mapping(raw)
    raw = copy.deepcopy(raw) if raw else {}
    for text in overrides or ():
        path, value = parse_override(text)
        section = path[0]
        if section not in SECTIONS:
            raise ConfigError(
                section, f"unknown section; expected one of {list(SECTIONS)}"
            )
        node = raw
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
                node[part] = child
            elif (
                isinstance(child, str)
                and i == 0
                and section in (REGISTRY_SECTIONS)
            ):
                child = {"name": child}
                node[part] = child
            elif not isinstance(child, dict):
                raise ConfigError(
                    ".".join(path[: i + 1]),
                    f"is not a mapping ({child!r}); cannot set "
                    f"{'.'.join(path)}",
                )
            node = child
        node[path[-1]] = value
    return raw


def load(path=None, overrides=(), text=None):
    """Reads a YAML config, applies ``--set`` overrides and resolves it.

    Args:
      path: YAML file (or None with ``text``).
      overrides: iterable of ``"section.key=value"`` strings.
      text: YAML text instead of a file.

    Returns:
      The resolved config dict (every section present).

    Raises:
      ConfigError: naming the offending key.
    """
    if text is None:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError("--config", f"cannot read {path!r}: {e}") from e
        except UnicodeDecodeError as e:
            raise ConfigError(
                "--config",
                f"{path!r} is not UTF-8 text (byte {e.object[e.start]:#04x} "
                f"at offset {e.start}); save the file as UTF-8",
            ) from None
    raw = parse_yaml(text, source=str(path or "<string>"))
    return resolve(apply_overrides(raw, overrides))
