"""The run logic behind ``train.py``: config -> objects -> run folder.

:func:`main` validates a resolved config (building every object once, before
anything is written), then trains with ``model.fit`` and fills the run
folder described in ``docs/architecture.md``::

  RUN_DIR/
    config.yaml          resolved config + each built object's get_config()
    history.csv          CSVLogger (rows of re-run epochs dropped on resume)
    tb/                  TensorBoard logs
    checkpoints/         state.json + the last ``train.keep_checkpoints``
                         tf.train.Checkpoint files (all model, optimizer and
                         memory / IAA / MMSI variables)
    best_encoder.keras   best ``val_<eval.monitor>`` on the validation classes
    final_encoder.keras  encoder at the end of training
    eval_test.json       metrics on the test classes (reported only)
    plots/               recall_at_k.png, retrieval_grid.png

Resume: the same command finds ``checkpoints/state.json`` and continues at
the next epoch. The training data of epoch ``e`` is drawn with seed
``train.seed + e``, so with ``train.deterministic`` the resumed run ends with
the same weights as an uninterrupted one.

NaN: a non-finite loss (or weight) stops training before the epoch is
checkpointed; the last good checkpoint is kept and :func:`main` returns
:data:`EXIT_NAN`.

Multi-worker (``train.strategy: multi_worker``): see :func:`_train`.
"""

import csv
import inspect
import json
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from tfdml import config as config_lib
from tfdml.config import ConfigError
from tfdml.training import run_dir as run_dir_lib

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_NAN = 3
EXIT_INTERRUPTED = 130

STATE_FILE = run_dir_lib.STATE_FILE


# -- validation --


def _signature_keys(fn):
    """Named keyword parameters of ``fn`` (``**kwargs`` is ignored: for
    layers and models it only takes Keras' ``name`` / ``dtype``)."""
    params = inspect.signature(fn).parameters.values()
    return {
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def passthrough_kwargs(cfg, section, targets, reserved=()):
    """The keys of ``cfg[section]`` that are not trainer keys.

    Each must be a keyword of at least one callable in ``targets``.

    Returns:
      ``{target_index: {key: value}}``: each key goes to every target that
      accepts it.
    """
    schema = config_lib.SCHEMA.get(section, {})
    extra = {k: v for k, v in cfg[section].items() if k not in schema}
    out = {i: {} for i in range(len(targets))}
    for key, value in extra.items():
        if key in reserved:
            raise ConfigError(
                f"{section}.{key}",
                "is set by the trainer from other keys; remove it",
            )
        taken = False
        for i, fn in enumerate(targets):
            keys = _signature_keys(fn)
            if keys is None or key in keys:
                out[i][key] = value
                taken = True
        if not taken:
            accepted = set(config_lib.SCHEMA.get(section, {}))
            for fn in targets:
                accepted |= (_signature_keys(fn) or set()) - set(reserved)
            accepted -= {"self", "name", "kwargs"}
            raise ConfigError(
                f"{section}.{key}",
                f"unknown key; expected one of {sorted(accepted)}",
            )
    return out


def _construct(key, fn, *args, **kwargs):
    """Calls ``fn(...)``; TypeError / ValueError -> ConfigError(key)."""
    try:
        return fn(*args, **kwargs)
    except (TypeError, ValueError) as e:
        if "." not in key:
            key = _spec_key(key, kwargs, str(e))
        raise ConfigError(key, str(e)) from None


def _spec_key(section, spec, message):
    """The sub-key a constructor error message names first, if any."""
    best = None
    for k in spec:
        if k == "name":
            continue
        for quoted in (f"`{k}`", f"'{k}'", f"{k}="):
            pos = message.find(quoted)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, k)
    return section if best is None else f"{section}.{best[1]}"


def build_registry_object(cfg, section, base):
    """Builds ``cfg[section]`` through the registry (None stays None)."""
    from tfdml import registry

    spec = cfg[section]
    if spec is None:
        return None
    try:
        return registry.build(base, dict(spec))
    except (TypeError, ValueError) as e:
        raise ConfigError(_spec_key(section, spec, str(e)), str(e)) from None


def build_loss(cfg):
    """The pair loss with its miner and weighting from the config."""
    import tfdml.losses  # noqa: F401  (registers every loss)

    if cfg["meta"]["method"] == "mmsi":
        import tfdml.meta  # noqa: F401  (registers the MMSI base losses)
    from tfdml import mining
    from tfdml import registry
    from tfdml import weighting
    from tfdml.losses import PairLoss

    miner = build_registry_object(cfg, "miner", mining.Miner)
    weight = build_registry_object(cfg, "weighting", weighting.Weighting)
    spec = dict(cfg["loss"])
    available = registry.registered(PairLoss)
    if spec["name"] not in available:
        raise ConfigError(
            "loss.name",
            f"unknown loss {spec['name']!r}; available: "
            f"{', '.join(sorted(available))}",
        )
    keys = _signature_keys(available[spec["name"]].__init__)
    if miner is not None:
        if "miner" in spec:
            raise ConfigError(
                "loss.miner", "set the miner in the miner section only"
            )
        spec["miner"] = miner
    if weight is not None:
        if keys is not None and "weighting" not in keys:
            raise ConfigError(
                "weighting",
                f"loss {spec['name']} does not take a weighting",
            )
        spec["weighting"] = weight
    try:
        return registry.build(PairLoss, spec)
    except (TypeError, ValueError) as e:
        raise ConfigError(_spec_key("loss", spec, str(e)), str(e)) from None


def describe(obj):
    """``{"class_name", "config"}`` of an object (for config.yaml)."""
    if obj is None:
        return None
    try:
        cfg = obj.get_config()
    except Exception as e:  # noqa: BLE001 - informative only
        cfg = {"error": f"get_config failed: {e}"}
    return {"class_name": type(obj).__name__, "config": _plain(cfg)}


def _plain(value):
    """YAML-safe copy (objects -> their repr)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):
        try:
            return value.item()
        except (TypeError, ValueError):
            pass
    return repr(value)


# -- data --


class Data:
    """Class-disjoint splits of one source (``tfdml.data``).

    Attributes:
      source: the :class:`tfdml.data.Source`.
      splits: ``{"train", "val", "test"}`` -> sorted original class ids.
      num_train_classes: training batches carry labels remapped to
        ``[0, num_train_classes)`` (classification head, IAA, MMSI).
    """

    def __init__(self, cfg):
        from tfdml import data as data_lib

        self.cfg = cfg
        d, m = cfg["data"], cfg["model"]
        self.image_size, self.channels = m["image_size"], m["channels"]
        try:
            self.source = data_lib.source_from_config(
                dict(d), self.image_size, self.channels
            )
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise _data_error(d, e) from None
        try:
            self.splits = data_lib.split_classes(
                self.source.labels,
                test_fraction=d["test_fraction"],
                val_classes=d["val_classes"],
                seed=cfg["train"]["seed"],
            )
            data_lib.make_augmentation(d["augmentation"])
        except ValueError as e:
            raise _data_error(d, e) from None
        self.num_train_classes = len(self.splits["train"])
        # Sorted training class ids; a label's rank among them is its
        # training id (no table sized by the largest id).
        self._train_ids = np.asarray(self.splits["train"], np.int64)

    def _train_labels(self, ds):
        import tensorflow as tf

        ids = tf.constant(self._train_ids)
        last = len(self._train_ids) - 1

        def remap(x, y):
            if isinstance(y, dict):  # {"labels", "example_ids"}
                x, labels = remap(x, y["labels"])
                return x, {**y, "labels": labels}
            y = tf.cast(y, tf.int64)
            flat = tf.reshape(y, [-1])
            pos = tf.minimum(tf.searchsorted(ids, flat), last)
            known = tf.equal(tf.gather(ids, pos), flat)
            out = tf.where(known, tf.cast(pos, tf.int32), -1)
            return x, tf.reshape(out, tf.shape(y))

        return ds.map(remap, num_parallel_calls=tf.data.AUTOTUNE)

    def train_batches(
        self,
        seed,
        classes_per_batch=None,
        samples_per_class=None,
        example_ids=False,
    ):
        """Infinite P x K batches drawn with ``seed`` only (a new pipeline
        per epoch, so resuming at any epoch replays the same batches).

        ``example_ids``: ``y = {"labels", "example_ids"}`` with stable
        per-image ids (the memory's ``xbm_drift`` metric needs them)."""
        from tfdml import data as data_lib

        d = self.cfg["data"]
        p = classes_per_batch or d["classes_per_batch"]
        k = samples_per_class or d["samples_per_class"]
        if k == 1:
            return self._one_per_class(p, seed)
        ds = data_lib.balanced_dataset(
            self.source,
            self.splits["train"],
            p,
            k,
            self.image_size,
            self.channels,
            seed=seed,
            augment=d["augmentation"],
            example_ids=example_ids,
        )
        return self._train_labels(ds)

    def _one_per_class(self, p, seed):
        """K = 1 batches (MMSI's validation stream, from training classes)."""
        import tensorflow as tf

        from tfdml import data as data_lib

        steps = self.cfg["train"]["steps_per_epoch"]
        rng = np.random.default_rng(seed)
        labels = np.asarray(self.source.labels)
        classes = np.asarray(self.splits["train"])
        pools = {int(c): np.flatnonzero(labels == c) for c in classes}
        idx = [
            rng.choice(pools[int(c)])
            for _ in range(steps)
            for c in rng.choice(classes, size=p, replace=False)
        ]
        size, ch = self.image_size, self.channels
        ds = self.source.dataset(np.asarray(idx, np.int64)).map(
            lambda x, y: (data_lib.preprocess(x, size, ch), y),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        return self._train_labels(ds.batch(p, drop_remainder=True)).repeat()

    def eval_dataset(self, split, batch_size):
        """Finite ``(float32 images, int32 labels)`` batches of a split."""
        from tfdml import data as data_lib

        ds = data_lib.eval_dataset(
            self.source,
            self.splits[split],
            batch_size,
            self.image_size,
            self.channels,
            max_per_class=self.cfg["data"]["eval_max_per_class"],
        )
        return self._train_labels(ds) if split == "train" else ds

    def estimation_dataset(self, batch_size):
        """Unshuffled training images (IAA re-estimation)."""
        return self.eval_dataset("train", batch_size)

    def arrays(self, split, limit=None):
        """``(float32 images [N, H, W, C] in [0, 1], int32 labels)``."""
        xs, ys, n = [], [], 0
        for x, y in self.eval_dataset(split, 256):
            xs.append(np.asarray(x, np.float32))
            ys.append(np.asarray(y, np.int32))
            n += len(xs[-1])
            if limit is not None and n >= limit:
                break
        x, y = np.concatenate(xs), np.concatenate(ys)
        return (x, y) if limit is None else (x[:limit], y[:limit])


def _data_error(d, e):
    """A data ValueError -> ConfigError naming ``data.<key>``: the key the
    message starts with (``"data.path ..."``), else the first it names."""
    msg = str(e)
    head = msg.split(" ", 1)[0].rstrip(":")
    if head.startswith("data.") and head[5:].isidentifier():
        return ConfigError(head, msg[len(head) :].lstrip(": "))
    return ConfigError(_spec_key("data", d, msg), msg)


def _data_key(cfg):
    """The data key that names the data set itself."""
    d = cfg["data"]
    if d["source"] == "synthetic":
        return "data.examples_per_class"
    if d.get("path") or d["source"] in ("folder", "npz"):
        return "data.path"
    return "data.name"


def check_class_sizes(cfg, data):
    """Every class of every split has >= 2 images (a positive to sample
    and to retrieve), counted after ``data.eval_max_per_class``.

    Raises:
      ConfigError: naming the data set's key, the split and the classes.
    """
    labels = np.asarray(data.source.labels)
    ids, counts = np.unique(labels, return_counts=True)
    cap = cfg["data"]["eval_max_per_class"]
    for split in ("train", "val", "test"):
        classes = np.asarray(data.splits[split])
        n = counts[np.searchsorted(ids, classes)]
        if split != "train" and cap is not None:
            n = np.minimum(n, cap)
        small = classes[n < 2]
        if len(small):
            shown = ", ".join(str(int(c)) for c in small[:10])
            more = f" (and {len(small) - 10} more)" if len(small) > 10 else ""
            raise ConfigError(
                _data_key(cfg),
                f"{len(small)} class(es) of the {split} split have fewer "
                f"than 2 images: {shown}{more}; every class needs at least "
                "2 (a positive pair). Remove them or add images.",
            )


def check_data(cfg, data):
    """Batch-shape and class-size checks against the actual data."""
    check_class_sizes(cfg, data)
    p = cfg["data"]["classes_per_batch"]
    n = data.num_train_classes
    if p > n:
        raise ConfigError(
            "data.classes_per_batch",
            f"P={p} classes per batch but the training split has only "
            f"{n} classes",
        )
    meta = cfg["meta"]
    if meta["method"] == "mmsi" and meta["val_classes_per_batch"] > n:
        raise ConfigError(
            "meta.val_classes_per_batch",
            f"{meta['val_classes_per_batch']} exceeds the {n} training classes",
        )
    if len(data.splits["val"]) < 2:
        raise ConfigError(
            "data.val_classes",
            "the validation split needs at least 2 classes for model "
            f"selection; it has {len(data.splits['val'])}",
        )


# -- objects --


class Built:
    """Everything built from a config before training starts."""

    loss = None
    data = None
    encoder_kwargs = None
    memory_kwargs = None
    meta_kwargs = None
    augment_kwargs = None
    init_weights = None  # train.init_from: {variable path: array}


def validate(cfg):
    """Builds every object once (cheaply) and checks the config.

    Raises:
      ConfigError: naming the key. Nothing is written.
    """
    built = validate_objects(cfg)
    built.data = Data(cfg)
    check_data(cfg, built.data)
    check_init_from(cfg, built)
    return built


INIT_ENCODERS = ("best_encoder.keras", "final_encoder.keras")


def init_from_encoder(run_dir):
    """The encoder file a warm start reads from a run folder: its
    ``best_encoder.keras``, else its ``final_encoder.keras``.

    Raises:
      ConfigError: naming ``train.init_from``.
    """
    if not os.path.isdir(run_dir):
        raise ConfigError(
            "train.init_from",
            f"{run_dir!r} is not a folder; expected a run folder holding "
            f"{' or '.join(INIT_ENCODERS)}",
        )
    for name in INIT_ENCODERS:
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            return path
    raise ConfigError(
        "train.init_from",
        f"{run_dir!r} holds neither {' nor '.join(INIT_ENCODERS)} (is it a "
        "finished run folder?)",
    )


def match_init_weights(source, encoder, where):
    """Pairs the source weights ``{variable path: array}`` with the
    encoder's variables by path. A classification head (``logits/``) present
    on one side only is left out (a new head starts fresh); anything else
    must match in name and shape.

    Returns ``{path: array}`` for the encoder's variables.

    Raises:
      ConfigError: naming ``train.init_from``, with the first differences.
    """
    paths = [v.path for v in encoder.weights]
    problems = []
    if len(set(paths)) != len(paths):
        problems.append("the encoder has duplicate variable paths")
    for v in encoder.weights:
        if v.path in source:
            have = tuple(source[v.path].shape)
            if have != tuple(v.shape):
                problems.append(
                    f"{v.path} has shape {have} there, {tuple(v.shape)} here"
                )
        elif not v.path.startswith("logits/"):
            problems.append(f"{v.path} is missing there")
    problems += [
        f"{k} exists only there"
        for k in source
        if k not in set(paths) and not k.startswith("logits/")
    ]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ConfigError(
            "train.init_from",
            f"the encoder in {where} does not match this config's model "
            f"(another architecture): {'; '.join(problems[:5])}{more}",
        )
    return {p: source[p] for p in paths if p in source}


def check_init_from(cfg, built):
    """``train.init_from``: reads the source encoder and checks it against
    a freshly built encoder of this config; keeps its weights in
    ``built.init_weights`` (loaded into a new run's encoder by
    :func:`apply_init_from`). Runs before the run folder is touched."""
    src = cfg["train"].get("init_from")
    if not src:
        return
    import keras

    from tfdml import models

    path = init_from_encoder(os.path.abspath(src))
    try:
        source = keras.saving.load_model(path, compile=False)
    except Exception as e:  # noqa: BLE001 (any load failure is the config's)
        raise ConfigError(
            "train.init_from", f"cannot load {path}: {e}"
        ) from None
    weights = {v.path: np.array(v) for v in source.weights}
    num_classes = None
    if cfg["model"]["classification_head"]:
        num_classes = built.data.num_train_classes
    target = _construct(
        "model",
        models.build_embedding_model,
        input_shape=input_shape(cfg),
        num_classes=num_classes,
        **built.encoder_kwargs,
    )
    built.init_weights = match_init_weights(weights, target, path)
    built.init_from_path = path


def apply_init_from(built, encoder):
    """Loads ``built.init_weights`` (see :func:`check_init_from`) into the
    encoder of a new run (not on resume: the checkpoint wins)."""
    for v in encoder.weights:
        if v.path in built.init_weights:
            v.assign(built.init_weights[v.path])
    print(f"encoder initialised from {built.init_from_path}")


def validate_objects(cfg):
    """Like :func:`validate` without reading any data."""
    built = Built()
    built.loss = build_loss(cfg)
    _validate_optimizer(cfg)
    from tfdml import models

    built.encoder_kwargs = passthrough_kwargs(
        cfg,
        "model",
        [models.build_embedding_model],
        reserved=("input_shape", "num_classes"),
    )[0]
    _validate_encoder_kwargs(cfg, built.encoder_kwargs)
    _validate_monitor(cfg)
    mem = cfg["memory"]
    if mem["size"] > 0:
        from tfdml.memory import CrossBatchMemory

        built.memory_kwargs = passthrough_kwargs(
            cfg, "memory", [CrossBatchMemory], reserved=("dim",)
        )[0]
        _construct(
            "memory",
            CrossBatchMemory,
            size=mem["size"],
            dim=2,
            start_after=mem["start_after"],
            **built.memory_kwargs,
        )
    elif set(mem) - set(config_lib.SCHEMA["memory"]):
        raise ConfigError("memory", "memory options given but memory.size is 0")
    if cfg["meta"]["method"] == "mmsi":
        from tfdml.meta import MMSIModel

        built.meta_kwargs = passthrough_kwargs(
            cfg,
            "meta",
            [MMSIModel.__init__],
            reserved=(
                "encoder",
                "memory",
                "augmenter",
                "classification_loss_weight",
                "base_loss",
                "num_classes",
                "dictionary",
            ),
        )[0]
        from tfdml.meta.forms import MMSIPairLoss

        if not isinstance(built.loss, MMSIPairLoss):
            raise ConfigError(
                "loss.name",
                "meta.method=mmsi needs an MMSI base loss "
                "(MMSIContrastiveLoss, MMSIMultiSimilarityLoss, "
                f"MMSITripletLoss); received {cfg['loss']['name']!r}",
            )
        if cfg["memory"]["size"] or cfg["augment"]["method"] != "none":
            raise ConfigError(
                "meta.method",
                "MMSI uses its own class dictionary; set memory.size=0 and "
                "augment.method=none",
            )
    elif set(cfg["meta"]) - set(config_lib.SCHEMA["meta"]):
        raise ConfigError("meta", "meta options given but meta.method is none")
    if cfg["augment"]["method"] == "iaa":
        built.augment_kwargs = _iaa_kwargs(cfg)
    elif set(cfg["augment"]) - set(config_lib.SCHEMA["augment"]):
        raise ConfigError(
            "augment", "augment options given but augment.method is none"
        )
    return built


def _validate_encoder_kwargs(cfg, kwargs):
    """The encoder's values that its constructor would reject only when the
    model is built (after the run folder is prepared)."""
    from tfdml.models import embedding
    from tfdml.validation import check_int

    if "embedding_dim" in kwargs:
        try:
            check_int("embedding_dim", kwargs["embedding_dim"], minimum=1)
        except ValueError as e:
            raise ConfigError("model.embedding_dim", str(e)) from None
    for key, options in (
        ("backbone", embedding.BACKBONES),
        ("pooling", embedding.POOLINGS),
    ):
        if key in kwargs and kwargs[key] not in options:
            raise ConfigError(
                f"model.{key}",
                f"must be one of {list(options)}; received {kwargs[key]!r}",
            )
    backbone = kwargs.get("backbone", "small_cnn")
    app = getattr(embedding, "_APPLICATIONS", {}).get(backbone)
    size = cfg["model"]["image_size"]
    if app is not None and size < app[-1]:
        raise ConfigError(
            "model.image_size",
            f"backbone {backbone!r} needs inputs of at least "
            f"{app[-1]}x{app[-1]}; received {size}",
        )


def eval_metrics(cfg):
    """``eval.metrics`` plus ``eval.monitor`` (when it is a metric name):
    the ``metrics=`` of every validation and test evaluation."""
    from tfdml.eval.metrics import _resolve_metrics

    ev = cfg["eval"]
    names = list(ev["metrics"])
    every = _resolve_metrics(
        ["recall", "precision@1", "r_precision", "map@r", "map", "mrr"],
        tuple(ev["recall_at"]),
    )[1]
    if ev["monitor"] in every and ev["monitor"] not in names:
        names.append(ev["monitor"])
    return names


def monitor_metrics(cfg):
    """The ``val_*`` metric names the validation callback produces
    (without ``val_``): what :func:`tfdml.eval.retrieval_metrics` returns
    for ``eval.metrics`` and ``eval.recall_at``, counts excluded."""
    from tfdml.eval.metrics import _resolve_metrics

    return list(
        _resolve_metrics(eval_metrics(cfg), tuple(cfg["eval"]["recall_at"]))[1]
    )


def _validate_monitor(cfg):
    monitor = cfg["eval"]["monitor"]
    names = monitor_metrics(cfg)
    if monitor not in names:
        hint = ""
        if monitor.startswith("val_") and monitor[4:] in names:
            hint = f" (without the val_ prefix: {monitor[4:]!r})"
        raise ConfigError(
            "eval.monitor",
            f"{monitor!r} is not a validation metric{hint}; expected one of "
            f"{names} (recall@K for K in eval.recall_at)",
        )


def _iaa_kwargs(cfg):
    from tfdml import augment

    targets = [augment.IAAEstimator, augment.IAAugmenter, augment.IAARefresh]
    split = passthrough_kwargs(
        cfg,
        "augment",
        targets,
        reserved=("dim", "num_classes", "estimator", "dataset", "epochs"),
    )
    kw = {"estimator": split[0], "augmenter": split[1], "refresh": split[2]}
    estimator = _construct(
        "augment", augment.IAAEstimator, num_classes=2, dim=2, **kw["estimator"]
    )
    _construct("augment", augment.IAAugmenter, estimator, **kw["augmenter"])
    _construct("augment", augment.IAARefresh, None, **kw["refresh"])
    return kw


def _validate_optimizer(cfg):
    opt = cfg["optimizer"]
    if opt["name"] != "sgd" and opt["name"] != "rmsprop":
        if opt["momentum"]:
            raise ConfigError(
                "optimizer.momentum",
                f"only used by sgd / rmsprop, not {opt['name']!r}",
            )


def build_optimizer(cfg):
    import keras

    opt = cfg["optimizer"]
    train = cfg["train"]
    lr = opt["learning_rate"]
    steps = train["steps_per_epoch"]
    if opt["schedule"] == "multistep":
        bounds = [m * steps for m in opt["milestones"]]
        values = [lr * opt["gamma"] ** i for i in range(len(bounds) + 1)]
        lr = keras.optimizers.schedules.PiecewiseConstantDecay(bounds, values)
    elif opt["schedule"] == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(
            lr, decay_steps=train["epochs"] * steps
        )
    kwargs = {"learning_rate": lr}
    if opt["weight_decay"]:
        kwargs["weight_decay"] = opt["weight_decay"]
    if opt["clipnorm"]:
        kwargs["clipnorm"] = opt["clipnorm"]
    name = opt["name"]
    if name == "adam":
        return keras.optimizers.Adam(**kwargs)
    if name == "adamw":
        kwargs.setdefault("weight_decay", 0.0)
        return keras.optimizers.AdamW(**kwargs)
    if name == "sgd":
        return keras.optimizers.SGD(momentum=opt["momentum"], **kwargs)
    return keras.optimizers.RMSprop(momentum=opt["momentum"], **kwargs)


# -- run folder --


def run_dir_of(cfg, config_path=None):
    if cfg["train"]["run_dir"]:
        return os.path.abspath(cfg["train"]["run_dir"])
    stem = "run"
    if config_path:
        stem = os.path.splitext(os.path.basename(config_path))[0]
    return os.path.abspath(os.path.join("runs", stem))


# The one reader / writer of the run folder is tfdml.training.run_dir; these
# names stay for callers of train_lib.
_comparable = run_dir_lib._comparable
read_state = run_dir_lib.read_state
write_state = run_dir_lib.write_state
_atomic_write = run_dir_lib.atomic_write
prepare_run_dir = run_dir_lib.prepare_run_dir


# -- runtime options --


def setup_runtime(cfg):
    """Seeds, op determinism and the dtype policy (process-wide)."""
    import keras
    import tensorflow as tf

    train = cfg["train"]
    keras.utils.set_random_seed(train["seed"])
    if train["deterministic"]:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(
        "mixed_float16" if train["mixed_precision"] else "float32"
    )


def teardown_runtime(cfg):
    import keras

    keras.mixed_precision.set_global_policy("float32")
    # Op determinism stays on: TF has no public switch to turn it off.


def make_strategy(cfg):
    import tensorflow as tf

    name = cfg["train"]["strategy"]
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def is_chief(strategy):
    import tensorflow as tf

    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    if resolver is None:
        return True
    return resolver.task_type in (None, "chief") or (
        resolver.task_type == "worker" and resolver.task_id == 0
    )


# -- checkpoints --


def _state_variables(*objects):
    """All variables of ``objects`` (deduplicated, in a stable order)."""
    seen, out = set(), []
    for obj in objects:
        if obj is None:
            continue
        variables = []
        if hasattr(obj, "trainable_variables") and hasattr(
            obj, "non_trainable_variables"
        ):
            variables = list(obj.trainable_variables) + list(
                obj.non_trainable_variables
            )
        elif hasattr(obj, "variables"):
            variables = list(obj.variables)
        for v in variables:
            if id(v) not in seen:
                seen.add(id(v))
                out.append(v)
    return out


class RunState:
    """What ``checkpoints/state.json`` holds (and the live NaN flag)."""

    def __init__(self, state=None):
        state = state or {}
        self.epoch = int(state.get("epoch", 0))  # epochs completed
        self.checkpoint = state.get("checkpoint")
        self.best = state.get("best")
        self.best_epoch = state.get("best_epoch")
        self.done = bool(state.get("done", False))
        self.nan = None  # (epoch, batch, value) once the loss is not finite

    def to_json(self):
        return {
            "epoch": self.epoch,
            "checkpoint": self.checkpoint,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "done": self.done,
        }


class Checkpointer:
    """Epoch checkpoints of every training variable.

    The variables are listed explicitly (model, optimizer and extra state
    such as an IAA estimator), so random-seed states and memory banks are
    included.

    Multi-worker: every worker must call :meth:`save` (a collective
    operation); a non-chief (``chief=False``) writes into its own temporary
    ``directory`` and never writes ``state.json``, and every worker restores
    from ``restore_directory`` (the chief's ``checkpoints/``).
    """

    def __init__(
        self, directory, variables, keep=2, chief=True, restore_directory=None
    ):
        import tensorflow as tf

        self.directory = directory
        self.restore_directory = restore_directory or directory
        self.keep = keep
        self.chief = chief
        self.ckpt = tf.train.Checkpoint(variables=list(variables))

    def save(self, epoch, state):
        os.makedirs(self.directory, exist_ok=True)
        prefix = os.path.join(self.directory, f"epoch-{epoch:05d}")
        path = self.ckpt.write(prefix)
        state.checkpoint = os.path.basename(path)
        state.epoch = epoch
        if self.chief:
            write_state(os.path.dirname(self.directory), state)
        self._prune(keep_name=state.checkpoint)
        return path

    def restore(self, name):
        path = os.path.join(self.restore_directory, name)
        self.ckpt.read(path).assert_consumed()

    def restore_latest(self, state):
        """Restores ``state.checkpoint`` or, when it cannot be read (a
        truncated file), the newest older checkpoint that can; updates
        ``state`` and says so on stderr.

        Raises:
          RunDirError: no checkpoint can be read.
        """
        names = run_dir_lib.checkpoint_names(self.restore_directory)
        older = [
            n
            for n in reversed(names)
            if state.checkpoint is None
            or run_dir_lib.checkpoint_epoch(n)
            < run_dir_lib.checkpoint_epoch(state.checkpoint)
        ]
        errors = []
        for name in [state.checkpoint, *older]:
            if name is None:
                continue
            try:
                self.restore(name)
            except Exception as e:  # noqa: BLE001 - any unreadable file
                reason = str(e).strip().splitlines()
                reason = reason[0] if reason else type(e).__name__
                errors.append(f"{name}: {reason}")
                print(
                    f"warning: checkpoint {name} in {self.restore_directory}"
                    f" cannot be read ({type(e).__name__}: {reason})",
                    file=sys.stderr,
                )
                continue
            if name != state.checkpoint:
                epoch = run_dir_lib.checkpoint_epoch(name)
                print(
                    f"warning: falling back from {state.checkpoint} to the "
                    f"previous good checkpoint {name}: resuming after epoch "
                    f"{epoch} instead of {state.epoch}",
                    file=sys.stderr,
                )
                state.checkpoint, state.epoch = name, epoch
            return name
        raise run_dir_lib.RunDirError(
            f"no readable checkpoint in {self.restore_directory} "
            f"({'; '.join(errors) or 'none found'}); use --set "
            "train.overwrite=true to train from scratch"
        )

    def _prune(self, keep_name):
        run_dir_lib.prune_checkpoints(self.directory, self.keep, keep_name)


def _finite(value):
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return True


def make_callbacks_module():
    """Callbacks (defined lazily so that importing is cheap)."""
    import keras
    import numpy as np

    class NaNGuard(keras.callbacks.Callback):
        """Stops on a non-finite loss; optionally poisons a step (tests)."""

        def __init__(self, state, inject_at=None):
            super().__init__()
            self.state = state
            self.inject_at = inject_at
            self.epoch = 0

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_begin(self, batch, logs=None):
            if self.inject_at is None:
                return
            step = int(self.model.optimizer.iterations.numpy())
            if step == self.inject_at:
                v = self.model.trainable_variables[0]
                v.assign(np.full(v.shape, np.nan, v.dtype))

        def on_train_batch_end(self, batch, logs=None):
            # Any non-finite training log counts: a loss computed on NaN
            # embeddings can be masked to 0 while the similarities are NaN.
            for name, value in (logs or {}).items():
                if not _finite(value):
                    self.state.nan = (self.epoch, batch, name, float(value))
                    self.model.stop_training = True
                    return

        def on_epoch_end(self, epoch, logs=None):
            if self.state.nan is None and not all(
                np.all(np.isfinite(v.numpy()))
                for v in self.model.trainable_variables
            ):
                self.state.nan = (epoch, None, "weights", float("nan"))
                self.model.stop_training = True

    class Guarded(keras.callbacks.Callback):
        """Runs ``inner``'s epoch-end hook only while there is no NaN."""

        def __init__(self, inner, state):
            super().__init__()
            self.inner = inner
            self.state = state

        def set_model(self, model):
            super().set_model(model)
            self.inner.set_model(model)

        def set_params(self, params):
            super().set_params(params)
            self.inner.set_params(params)

        def on_train_begin(self, logs=None):
            self.inner.on_train_begin(logs)

        def on_epoch_begin(self, epoch, logs=None):
            self.inner.on_epoch_begin(epoch, logs)

        def on_epoch_end(self, epoch, logs=None):
            if self.state.nan is None:
                self.inner.on_epoch_end(epoch, logs)

        def on_train_end(self, logs=None):
            self.inner.on_train_end(logs)

    class BestEncoder(keras.callbacks.Callback):
        """Saves the encoder when ``monitor`` (validation) improves."""

        def __init__(self, encoder, path, monitor, state):
            super().__init__()
            self.encoder = encoder
            self.path = path
            self.monitor = monitor
            self.state = state

        def on_epoch_end(self, epoch, logs=None):
            if self.state.nan is not None:
                return
            value = (logs or {}).get(self.monitor)
            if value is None or not _finite(value):
                return
            value = float(value)
            if self.state.best is None or value > self.state.best:
                tmp = self.path[: -len(".keras")] + ".tmp.keras"
                self.encoder.save(tmp)
                os.replace(tmp, self.path)
                self.state.best = value
                self.state.best_epoch = epoch + 1

    class EpochCheckpoint(keras.callbacks.Callback):
        """Writes the checkpoint + state.json at each good epoch end."""

        def __init__(self, checkpointer, state):
            super().__init__()
            self.checkpointer = checkpointer
            self.state = state

        def on_epoch_end(self, epoch, logs=None):
            if self.state.nan is None:
                self.checkpointer.save(epoch + 1, self.state)

    return NaNGuard, Guarded, BestEncoder, EpochCheckpoint


def trim_history(path, epochs_done):
    """Drops CSV rows of epochs that will be re-run after a resume."""
    if not os.path.exists(path):
        return
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    header, body = rows[0], rows[1:]
    if "epoch" not in header:
        return
    i = header.index("epoch")
    keep = [r for r in body if r and int(float(r[i])) < epochs_done]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(keep)


# -- main --


def main(cfg, config_path=None, check_only=False):
    """Validates and runs a resolved config; returns the exit status."""
    try:
        built = validate(cfg)
        run_dir = run_dir_of(cfg, config_path)
        mode = prepare_run_dir(cfg, run_dir)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if check_only:
        print(f"config OK (run folder would be {run_dir})")
        return EXIT_OK
    if mode == "done":
        print(
            f"{run_dir} already holds a finished run; use --set "
            "train.overwrite=true to train again."
        )
        return EXIT_OK
    setup_runtime(cfg)
    try:
        return _train(cfg, built, run_dir, mode)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; run the same command again to resume from "
            f"{os.path.join(run_dir, 'checkpoints')}.",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    finally:
        teardown_runtime(cfg)


def _train(cfg, built, run_dir, mode):
    """Trains and fills the run folder; returns the exit status.

    Multi-worker training (``train.strategy: multi_worker``, a
    ``tf.distribute.MultiWorkerMirroredStrategy``): start the *same* command
    on every machine, each with its own ``TF_CONFIG``, e.g. for two
    machines::

      # machine A (the chief: task "chief", or "worker" 0 without a chief)
      TF_CONFIG='{"cluster": {"worker": ["hostA:12345", "hostB:12345"]},
                  "task": {"type": "worker", "index": 0}}' \\
        python train.py --config my.yaml --set train.strategy=multi_worker
      # machine B: the same, with "index": 1

    * ``data.classes_per_batch x data.samples_per_class`` is the *global*
      batch: every worker builds the same batches (same seeds) and
      ``tf.distribute`` gives each worker its slice (auto-shard policy
      ``DATA``); ``DMLModel`` all-gathers the embeddings, so the loss and
      the memory see the whole global batch and every worker ends with the
      same weights.
    * Only the chief writes the run folder (config.yaml, history.csv, tb/,
      checkpoints/, best/final encoders, eval_test.json, plots/, export).
      The run folder is the chief's ``train.run_dir``. Other workers write
      nothing there: saving a checkpoint is a collective operation, so they
      save too, into a temporary directory that is deleted at the end.
    * The validation evaluation (``val_*``, best encoder) and the final test
      evaluation run on the chief only, eagerly (no collective op).
    * Resume: re-run the same command on every machine. Every worker reads
      ``checkpoints/state.json`` and restores the chief's checkpoint, so
      ``train.run_dir`` must be on storage that all workers can read
      (a shared file system, or a copy of the chief's folder). The workers
      check that they start at the same epoch and stop with an error
      otherwise.
    """
    strategy = make_strategy(cfg)
    chief = is_chief(strategy)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if chief:
        if mode == "new":
            # Only what a tfdml run writes; the folder and other files stay
            # (prepare_run_dir refused any other non-empty folder).
            run_dir_lib.clean_run_dir(run_dir)
            os.makedirs(run_dir, exist_ok=True)
            # First, so that a folder this run writes to is a tfdml run.
            run_dir_lib.write_config(run_dir, cfg)
        os.makedirs(ckpt_dir, exist_ok=True)
        write_dir = ckpt_dir
    else:
        write_dir = tempfile.mkdtemp(prefix="tfdml-worker-ckpt-")
    try:
        return _train_in(
            cfg, built, run_dir, mode, strategy, chief, ckpt_dir, write_dir
        )
    finally:
        if not chief:
            shutil.rmtree(write_dir, ignore_errors=True)


def _train_in(cfg, built, run_dir, mode, strategy, chief, ckpt_dir, write_dir):
    train = cfg["train"]
    state = RunState(read_state(run_dir) if mode == "resume" else None)
    with strategy.scope():
        parts = build_model(cfg, built, strategy)
        model = parts.model
        model.compile(
            optimizer=build_optimizer(cfg),
            loss=built.loss,
            jit_compile=train["jit_compile"],
        )
        model.optimizer.build(model.trainable_variables)
        variables = _state_variables(model, model.optimizer) + [
            v for obj in parts.state_objects for v in _state_variables(obj)
        ]
        variables = list({id(v): v for v in variables}.values())
        checkpointer = Checkpointer(
            write_dir,
            variables,
            keep=train["keep_checkpoints"],
            chief=chief,
            restore_directory=ckpt_dir,
        )
        if mode != "resume" and built.init_weights is not None:
            apply_init_from(built, parts.encoder)
        if mode == "resume":
            try:
                checkpointer.restore_latest(state)
            except run_dir_lib.RunDirError as e:
                print(f"error: {e.message}", file=sys.stderr)
                return EXIT_CONFIG
            print(
                f"resuming {run_dir} after epoch {state.epoch} "
                f"({state.checkpoint})"
            )
    check_workers_agree(strategy, state.epoch)
    if not chief:
        return _train_worker(cfg, built, parts, state, checkpointer, strategy)
    _write_config(cfg, built, parts, run_dir)
    start = state.epoch
    history = os.path.join(run_dir, "history.csv")
    trim_history(history, start)
    callbacks = _callbacks(cfg, built, parts, run_dir, state, checkpointer)
    if start < train["epochs"]:
        dataset = train_dataset(cfg, built, start, strategy)
        t0 = time.time()
        model.fit(
            dataset,
            epochs=train["epochs"],
            initial_epoch=start,
            steps_per_epoch=train["steps_per_epoch"],
            callbacks=callbacks,
            verbose=train["verbose"],
            shuffle=False,
        )
        print(f"training took {time.time() - t0:.1f} s")
    if state.nan is not None:
        epoch, batch, name, value = state.nan
        where = f"epoch {epoch + 1}" + (
            f", batch {batch + 1}" if batch is not None else ""
        )
        last = state.checkpoint or "none (no epoch finished)"
        print(
            f"error: non-finite training value ({name}={value}) at {where}; "
            "training stopped. "
            f"The last good checkpoint is kept: {last} in "
            f"{os.path.join(run_dir, 'checkpoints')} (epoch {state.epoch}). "
            "Lower optimizer.learning_rate or enable optimizer.clipnorm.",
            file=sys.stderr,
        )
        return EXIT_NAN
    finish(cfg, built, parts, run_dir, state)
    state.done = True
    write_state(run_dir, state)
    print(f"run folder: {run_dir}")
    return EXIT_OK


def _train_worker(cfg, built, parts, state, checkpointer, strategy):
    """A non-chief worker: the same steps and collectives, no run folder.

    Its callbacks are the chief's minus those that only write or evaluate
    (validation, best encoder, CSV, TensorBoard), in the same order, so both
    issue the same collective operations (IAA refresh, checkpoint save).
    """
    train = cfg["train"]
    NaNGuard, Guarded, _, EpochCheckpoint = make_callbacks_module()
    callbacks = [NaNGuard(state, train["debug_inject_nan_at_step"])]
    callbacks += [Guarded(cb, state) for cb in parts.callbacks]
    callbacks.append(EpochCheckpoint(checkpointer, state))
    if state.epoch < train["epochs"]:
        parts.model.fit(
            train_dataset(cfg, built, state.epoch, strategy),
            epochs=train["epochs"],
            initial_epoch=state.epoch,
            steps_per_epoch=train["steps_per_epoch"],
            callbacks=callbacks,
            verbose=train["verbose"],
            shuffle=False,
        )
    if state.nan is not None:
        print("error: non-finite training value; stopped", file=sys.stderr)
        return EXIT_NAN
    resolver = strategy.cluster_resolver
    print(
        f"worker {resolver.task_type}:{resolver.task_id} done (the chief "
        "writes the run folder)"
    )
    return EXIT_OK


def check_workers_agree(strategy, start):
    """All workers start at the same epoch (multi-worker only).

    Raises:
      RuntimeError: a worker resumes at another epoch (e.g. it cannot read
        the chief's run folder).
    """
    import tensorflow as tf

    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    local = strategy.run(lambda: tf.constant([start], tf.int64))
    starts = np.asarray(strategy.gather(local, axis=0)).tolist()
    if len(set(starts)) != 1:
        raise RuntimeError(
            f"workers start at different epochs {starts}: every worker must "
            "read the chief's train.run_dir (shared storage) to resume"
        )


def _write_config(cfg, built, parts, run_dir):
    doc = {
        "resolved": cfg,
        "objects": {
            "loss": describe(built.loss),
            "encoder": {
                "class_name": "Functional",
                "config": {
                    "kwargs": _plain(built.encoder_kwargs),
                    "input_shape": [
                        cfg["model"]["image_size"],
                        cfg["model"]["image_size"],
                        cfg["model"]["channels"],
                    ],
                },
            },
            "model": describe(parts.model),
            "optimizer": describe(parts.model.optimizer),
        },
    }
    for name, obj in parts.describe.items():
        doc["objects"][name] = describe(obj)
    run_dir_lib.write_config(run_dir, doc["resolved"], doc["objects"])


def _callbacks(cfg, built, parts, run_dir, state, checkpointer):
    import keras

    NaNGuard, Guarded, BestEncoder, EpochCheckpoint = make_callbacks_module()
    cbs = [NaNGuard(state, cfg["train"]["debug_inject_nan_at_step"])]
    cbs += [Guarded(cb, state) for cb in parts.callbacks]
    evaluator = validation_callback(cfg, built, parts)
    if evaluator is not None:
        cbs.append(Guarded(evaluator, state))
        cbs.append(
            BestEncoder(
                parts.encoder,
                os.path.join(run_dir, "best_encoder.keras"),
                "val_" + cfg["eval"]["monitor"],
                state,
            )
        )
    # The history row is written before the checkpoint records the epoch:
    # a kill -9 between the two then re-runs the epoch (trim_history drops
    # its row) instead of resuming after an epoch whose row was never written.
    cbs.append(
        keras.callbacks.CSVLogger(
            os.path.join(run_dir, "history.csv"), append=True
        )
    )
    cbs.append(EpochCheckpoint(checkpointer, state))
    cbs.append(keras.callbacks.TensorBoard(os.path.join(run_dir, "tb")))
    return cbs


# -- wiring of the library pieces --


class Parts:
    """The built model and what belongs to it."""

    def __init__(self):
        self.model = None
        self.encoder = None
        self.memory = None
        self.augmenter = None
        self.callbacks = []  # extra Keras callbacks (IAA refresh)
        self.state_objects = []  # extra objects whose variables are saved
        self.describe = {}  # name -> object for config.yaml


def input_shape(cfg):
    m = cfg["model"]
    return (m["image_size"], m["image_size"], m["channels"])


def build_model(cfg, built, strategy=None):
    """Encoder, memory, IAA and the (MMSI) DML model from the config."""
    from tfdml import models

    parts = Parts()
    num_classes = None
    if cfg["model"]["classification_head"]:
        num_classes = built.data.num_train_classes
    parts.encoder = _construct(
        "model",
        models.build_embedding_model,
        input_shape=input_shape(cfg),
        num_classes=num_classes,
        **built.encoder_kwargs,
    )
    dim = int(parts.encoder.output["embeddings"].shape[-1])
    mem = cfg["memory"]
    if mem["size"] > 0:
        from tfdml.memory import CrossBatchMemory

        parts.memory = CrossBatchMemory(
            mem["size"],
            dim,
            start_after=mem["start_after"],
            **built.memory_kwargs,
        )
        parts.describe["memory"] = parts.memory
    if built.augment_kwargs is not None:
        from tfdml import augment

        kw = built.augment_kwargs
        estimator = _construct(
            "augment",
            augment.IAAEstimator,
            num_classes=built.data.num_train_classes,
            dim=int(parts.encoder.output["raw"].shape[-1]),
            **kw["estimator"],
        )
        aug_kw = dict(kw["augmenter"])
        aug_kw.setdefault("seed", cfg["train"]["seed"])
        parts.augmenter = _construct(
            "augment", augment.IAAugmenter, estimator, **aug_kw
        )
        parts.callbacks.append(
            _construct(
                "augment",
                augment.IAARefresh,
                built.data.estimation_dataset(cfg["eval"]["batch_size"]),
                epochs=cfg["train"]["epochs"],
                **kw["refresh"],
            )
        )
        parts.state_objects += [estimator, parts.augmenter]
        parts.describe["iaa_estimator"] = estimator
        parts.describe["iaa_augmenter"] = parts.augmenter
    common = dict(
        memory=parts.memory,
        augmenter=parts.augmenter,
        classification_loss_weight=cfg["train"]["classification_loss_weight"],
    )
    if cfg["meta"]["method"] == "mmsi":
        from tfdml.meta import MMSIModel

        parts.model = _construct(
            "meta",
            MMSIModel,
            encoder=parts.encoder,
            base_loss=built.loss,
            num_classes=built.data.num_train_classes,
            classification_loss_weight=common["classification_loss_weight"],
            **built.meta_kwargs,
        )
        dictionary = getattr(parts.model, "dictionary", None)
        parts.state_objects.append(dictionary)
        parts.describe["mmsi_dictionary"] = dictionary
    else:
        parts.model = _construct(
            "model",
            models.DMLModel,
            encoder=parts.encoder,
            classification_loss=cfg["train"]["classification_loss"],
            **common,
        )
    return parts


def _concat_epochs(make, start, epochs, steps):
    """Epoch ``e`` comes from ``make(e)``: resumable at any epoch."""
    ds = None
    for epoch in range(start, epochs):
        part = make(epoch).take(steps)
        ds = part if ds is None else ds.concatenate(part)
    return ds


def train_dataset(cfg, built, start, strategy=None):
    """Training batches for epochs ``start..epochs-1``.

    Epoch ``e`` is sampled with seed ``train.seed + e`` (MMSI's validation
    stream with ``train.seed + e + 7919``), so a resumed run sees the same
    batches as an uninterrupted one.
    """
    import tensorflow as tf

    train = cfg["train"]
    seed = train["seed"]
    steps = train["steps_per_epoch"]
    data = built.data
    # Stable image ids for a memory run: xbm_drift (cos to own stored copy).
    with_ids = bool(cfg["memory"]["size"])
    ds = _concat_epochs(
        lambda e: data.train_batches(seed + e, example_ids=with_ids),
        start,
        train["epochs"],
        steps,
    )
    if cfg["meta"]["method"] == "mmsi":
        meta = cfg["meta"]
        val = _concat_epochs(
            lambda e: data.train_batches(
                seed + e + 7919,
                classes_per_batch=meta["val_classes_per_batch"],
                samples_per_class=meta["val_samples_per_class"],
            ),
            start,
            train["epochs"],
            steps,
        )
        ds = tf.data.Dataset.zip((ds, val))
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        # Every worker builds the same global batches; each takes its
        # slice of every batch (never whole files or whole batches).
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        ds = ds.with_options(options)
    return ds.prefetch(tf.data.AUTOTUNE)


RECALIBRATION_SEED_OFFSET = 1_000_003


def recalibration_data(cfg, built, encoder):
    """``(training batches, number of batches)`` for precise BN, or
    ``(None, None)`` when ``eval.recalibrate_bn`` is off or ``encoder`` has
    no trainable BatchNorm.

    The batches are training batches exactly as the step sees them (P x K,
    augmentation included), drawn with a fixed seed so that every
    recalibration (and a resumed run) uses the same images.
    """
    from tfdml.models import has_trainable_batchnorm

    ev = cfg["eval"]
    if not ev["recalibrate_bn"] or not has_trainable_batchnorm(encoder):
        return None, None
    d = cfg["data"]
    batch = d["classes_per_batch"] * d["samples_per_class"]
    num = max(1, -(-ev["recalibrate_images"] // batch))
    seed = cfg["train"]["seed"] + RECALIBRATION_SEED_OFFSET
    ds = built.data.train_batches(seed)
    return ds.take(num), num


def recalibrate(cfg, built, encoder):
    """Runs precise BN on ``encoder`` per ``eval.recalibrate_bn``."""
    from tfdml.models import recalibrate_batchnorm

    ds, num = recalibration_data(cfg, built, encoder)
    if ds is None:
        return 0
    return recalibrate_batchnorm(encoder, ds, num_batches=num)


def validation_callback(cfg, built, parts):
    """H3's retrieval evaluation on the validation classes (``val_*``).

    With ``eval.recalibrate_bn`` the encoder's BatchNorm statistics are
    recalibrated on training batches before every evaluation (so the saved
    best encoder carries statistics that describe its weights)."""
    from tfdml import eval as eval_lib

    ev = cfg["eval"]
    recal_ds, recal_n = recalibration_data(cfg, built, parts.encoder)
    return eval_lib.RetrievalEvaluationCallback(
        built.data.eval_dataset("val", ev["batch_size"]),
        encoder=parts.encoder,
        prefix="val_",
        every_n_epochs=ev["every_n_epochs"],
        ks=tuple(ev["recall_at"]),
        batch_size=ev["batch_size"],
        metric_options={
            "method": "scann" if ev["index"] == "scann" else "exact",
            "seed": cfg["train"]["seed"],
            "metrics": eval_metrics(cfg),
        },
        recalibrate_data=recal_ds,
        recalibrate_batches=recal_n,
    )


def embed_dataset(encoder, ds):
    """``(embeddings float32 [N, d], labels int32 [N])`` of a dataset of
    ``(images, labels)`` batches (:func:`tfdml.eval.embed`)."""
    from tfdml.eval.embed import embed

    emb, y = embed(encoder, ds, batched=True, return_labels=True)
    return emb, np.asarray(y, np.int32).reshape(-1)


def evaluate_split(cfg, encoder, ds):
    """Retrieval metrics of ``encoder`` on ``ds`` (queries = references)."""
    from tfdml import eval as eval_lib

    emb, y = embed_dataset(encoder, ds)
    metrics = eval_lib.retrieval_metrics(
        emb,
        y,
        recall_at=cfg["eval"]["recall_at"],
        method="scann" if cfg["eval"]["index"] == "scann" else "exact",
        seed=cfg["train"]["seed"],
        metrics=eval_metrics(cfg),
    )
    return {k: _plain(v) for k, v in metrics.items()}, emb, y


def finish(cfg, built, parts, run_dir, state):
    """final_encoder.keras, eval_test.json, plots and the optional export."""
    import keras

    final_path = os.path.join(run_dir, "final_encoder.keras")
    # Precise BN before the final encoder is saved, tested and exported.
    recalibrate(cfg, built, parts.encoder)
    parts.encoder.save(final_path)
    ds = built.data.eval_dataset("test", cfg["eval"]["batch_size"])
    report = {
        "classes": "test (never used for model selection)",
        "best_epoch": state.best_epoch,
        "best_val": state.best,
        "monitor": "val_" + cfg["eval"]["monitor"],
    }
    report["final"], emb, y = evaluate_split(cfg, parts.encoder, ds)
    report["num_queries"] = int(len(y))
    report["num_classes"] = int(len(np.unique(y)))
    best_path = os.path.join(run_dir, "best_encoder.keras")
    if os.path.exists(best_path):
        best = keras.saving.load_model(best_path, compile=False)
        report["best"], _, _ = evaluate_split(cfg, best, ds)
    _atomic_write(
        os.path.join(run_dir, "eval_test.json"), json.dumps(report, indent=2)
    )
    if cfg["eval"]["plots"]:
        n = min(len(y), 2000)
        x, _ = built.data.arrays("test", limit=n)
        _plots(cfg, run_dir, emb[:n], x, y[:n], report)
    if cfg["export"]["enabled"]:
        export_encoder(cfg, run_dir, parts.encoder, emb, y)
    _print_summary(report)
    return report


def _plots(cfg, run_dir, emb, x, y, report):
    from tfdml.eval import plots

    out = os.path.join(run_dir, "plots")
    os.makedirs(out, exist_ok=True)
    plots.plot_recall_at_k(
        {
            "final": report["final"],
            **({"best": report["best"]} if "best" in report else {}),
        },
        os.path.join(out, "recall_at_k.png"),
    )
    plots.retrieval_grid_from_embeddings(
        emb,
        y,
        x,
        os.path.join(out, "retrieval_grid.png"),
        seed=cfg["train"]["seed"],
    )


def export_encoder(cfg, run_dir, encoder, db_emb, db_labels):
    from tfdml import export as export_lib

    out = cfg["export"]["dir"] or os.path.join(run_dir, "export")
    index = cfg["export"]["index"]
    written = export_lib.export_saved_model(
        encoder,
        out,
        database=db_emb,
        database_labels=db_labels,
        index="brute_force" if index == "bruteforce" else index,
    )
    print(f"exported SavedModel(s): {written}")
    return written


def _print_summary(report):
    keys = [k for k in report["final"] if isinstance(report["final"][k], float)]
    print("\ntest classes (reported only):")
    print(f"  {'metric':<16}{'final':>10}{'best(val)':>12}")
    for k in keys:
        best = report.get("best", {}).get(k)
        b = f"{best:12.4f}" if isinstance(best, float) else f"{'-':>12}"
        print(f"  {k:<16}{report['final'][k]:10.4f}{b}")
