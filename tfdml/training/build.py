"""Builders: config sections -> library objects, validated before anything
is written.

One builder per config section (:data:`OBJECT_SECTIONS`, then
:data:`DATA_SECTIONS`): each checks its own section's values, and the rules
that tie it to the sections before it, and stores what it built on a
:class:`Built`. :func:`validate` runs every builder once, in that order;
:func:`validate_objects` runs the ones that read no data. The objects whose
variables belong to the distribution strategy (encoder, memory, IAA,
optimizers) are built afterwards, under its scope, from what the builders
checked (:func:`build_model`, :func:`build_optimizer`).

Library objects keep their defaults in their constructors: a section's keys
outside :data:`tfdml.training.config.SCHEMA` are constructor keyword
arguments (:func:`passthrough_kwargs`), checked by constructing the object.
Every error is a :class:`~tfdml.training.config.ConfigError` naming the key.
"""

import inspect
import os

import numpy as np

from tfdml.training import config as config_lib
from tfdml.training.config import ConfigError


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


def describe(obj):
    """``{"class_name", "config"}`` of an object (for config.yaml)."""
    if obj is None:
        return None
    try:
        cfg = obj.get_config()
    except Exception as e:  # noqa: BLE001 - informative only
        cfg = {"error": f"get_config failed: {e}"}
    return {"class_name": type(obj).__name__, "config": plain(cfg)}


def plain(value):
    """YAML-safe copy (objects -> their repr)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):
        try:
            return value.item()
        except (TypeError, ValueError):
            pass
    return repr(value)


# -- what the builders build --


class Built:
    """Everything built from a config before training starts, one attribute
    per builder (:data:`OBJECT_SECTIONS`, :data:`DATA_SECTIONS`)."""

    loss = None  # loss (+ miner, weighting): the loss object
    encoder_kwargs = None  # model: build_embedding_model keyword arguments
    memory_kwargs = None  # memory: CrossBatchMemory keyword arguments
    meta_kwargs = None  # meta: MMSIModel keyword arguments
    augment_kwargs = None  # augment: {"estimator", "augmenter", "refresh"}
    data = None  # data: the Data
    init_weights = None  # train.init_from: {variable path: array}
    init_from_path = None  # train.init_from: the encoder file read


# Stand-ins for the sizes that come from the encoder or the data when a
# constructor is called only to check the config's values (a probe): the
# memory's and IAA's variables must be created under the strategy scope, by
# build_model, which runs after the run folder is prepared.
_PROBE_DIM = 2
_PROBE_CLASSES = 2


# -- loss, miner, weighting --


def build_loss(cfg, num_classes=None):
    """The pair loss with its miner and weighting from the config (or a
    proxy loss; ``num_classes``: its number of classes, from the data)."""
    import tfdml.losses  # noqa: F401  (registers every loss)

    if cfg["meta"]["method"] == "mmsi":
        import tfdml.meta  # noqa: F401  (registers the MMSI base losses)
    from tfdml import mining
    from tfdml import registry
    from tfdml import weighting
    from tfdml.losses import PairLoss

    miner = build_registry_object(cfg, "miner", mining.Miner)
    weight = build_registry_object(cfg, "weighting", weighting.Weighting)
    from tfdml.losses import ProxyLoss

    spec = dict(cfg["loss"])
    proxy_losses = registry.registered(ProxyLoss)
    if spec["name"] in proxy_losses:
        return _build_proxy_loss(cfg, spec, num_classes, miner, weight)
    available = registry.registered(PairLoss)
    if spec["name"] not in available:
        raise ConfigError(
            "loss.name",
            f"unknown loss {spec['name']!r}; available: "
            f"{', '.join(sorted({**available, **proxy_losses}))}",
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


def _build_proxy_loss(cfg, spec, num_classes, miner, weight):
    """A proxy loss (:class:`tfdml.losses.ProxyLoss`): its sizes come from
    the data and the model, its proxies are created by ``DMLModel.compile``
    under the strategy scope."""
    from tfdml import registry
    from tfdml.losses import ProxyLoss

    for key in ("num_classes", "embedding_dim"):
        if key in spec:
            raise ConfigError(
                f"loss.{key}",
                "set by train.py for a proxy loss (the training classes, "
                "model.embedding_dim); remove it",
            )
    for section, obj in (("miner", miner), ("weighting", weight)):
        if obj is not None:
            raise ConfigError(
                section, f"proxy loss {spec['name']} takes no {section}"
            )
    if num_classes is not None:
        spec["num_classes"] = num_classes
    try:
        return registry.build(ProxyLoss, spec)
    except (TypeError, ValueError) as e:
        raise ConfigError(_spec_key("loss", spec, str(e)), str(e)) from None


def _loss_section(cfg, built):
    """``loss``, ``miner`` and ``weighting``: the loss, built once (the data
    section gives a proxy loss its number of classes). A proxy loss takes no
    memory bank, IAA or MMSI."""
    from tfdml.losses import ProxyLoss

    built.loss = build_loss(cfg)
    if not isinstance(built.loss, ProxyLoss):
        return
    for key, used in (
        ("memory.size", cfg["memory"]["size"] > 0),
        ("augment.method", cfg["augment"]["method"] != "none"),
        ("meta.method", cfg["meta"]["method"] != "none"),
    ):
        if used:
            raise ConfigError(
                key,
                f"proxy loss {cfg['loss']['name']} compares embeddings with "
                "class proxies: it takes no memory bank, IAA or MMSI",
            )


# -- optimizer --


def _optimizer_section(cfg, built):
    """``optimizer``: ``momentum`` only for sgd / rmsprop,
    ``proxy_lr_multiplier`` only with a proxy loss. The optimizers are
    built under the strategy scope (:func:`build_optimizer`,
    :func:`build_proxy_optimizer`)."""
    from tfdml.losses import ProxyLoss

    opt = cfg["optimizer"]
    if opt["name"] not in ("sgd", "rmsprop") and opt["momentum"]:
        raise ConfigError(
            "optimizer.momentum",
            f"only used by sgd / rmsprop, not {opt['name']!r}",
        )
    proxy = isinstance(built.loss, ProxyLoss)
    if opt["proxy_lr_multiplier"] is not None and not proxy:
        raise ConfigError(
            "optimizer.proxy_lr_multiplier",
            f"only used by proxy losses, not {cfg['loss']['name']!r}",
        )


def build_optimizer(cfg, lr_multiplier=1.0):
    """The optimizer of the config (learning rates x ``lr_multiplier``)."""
    import keras

    opt = cfg["optimizer"]
    train = cfg["train"]
    lr = opt["learning_rate"] * lr_multiplier
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


def build_proxy_optimizer(cfg):
    """``optimizer.proxy_lr_multiplier``: the proxies' optimizer (the same
    optimizer and schedule at ``learning_rate x multiplier``), else None."""
    mult = cfg["optimizer"]["proxy_lr_multiplier"]
    return None if mult is None else build_optimizer(cfg, mult)


# -- model --


def _default(fn, name):
    """The default of parameter ``name`` of ``fn`` (defaults live in the
    constructors)."""
    return inspect.signature(fn).parameters[name].default


def _model_section(cfg, built):
    """``model``: the encoder's keyword arguments (its keys outside the
    schema), checked here for the values ``build_embedding_model`` would
    reject only when the model is built (after the run folder is
    prepared)."""
    from tfdml import models
    from tfdml.models import embedding
    from tfdml.validation import check_int

    kwargs = passthrough_kwargs(
        cfg,
        "model",
        [models.build_embedding_model],
        reserved=("input_shape", "num_classes"),
    )[0]
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
    backbone = kwargs.get(
        "backbone", _default(models.build_embedding_model, "backbone")
    )
    app = getattr(embedding, "_APPLICATIONS", {}).get(backbone)
    size = cfg["model"]["image_size"]
    if app is not None and size < app[-1]:
        raise ConfigError(
            "model.image_size",
            f"backbone {backbone!r} needs inputs of at least "
            f"{app[-1]}x{app[-1]}; received {size}",
        )
    built.encoder_kwargs = kwargs


def input_shape(cfg):
    m = cfg["model"]
    return (m["image_size"], m["image_size"], m["channels"])


# -- eval --


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


def _eval_section(cfg, built):
    """``eval``: ``monitor`` is a metric the validation produces."""
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


# -- memory --


def _memory_section(cfg, built):
    """``memory``: the memory's keyword arguments, checked by a probe
    (memory options need ``memory.size > 0``)."""
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
            dim=_PROBE_DIM,
            start_after=mem["start_after"],
            **built.memory_kwargs,
        )
    elif set(mem) - set(config_lib.SCHEMA["memory"]):
        raise ConfigError("memory", "memory options given but memory.size is 0")


# -- meta --


def _meta_section(cfg, built):
    """``meta``: MMSI's keyword arguments; MMSI needs an MMSI base loss and
    no memory or IAA (meta options need ``meta.method: mmsi``)."""
    if cfg["meta"]["method"] != "mmsi":
        if set(cfg["meta"]) - set(config_lib.SCHEMA["meta"]):
            raise ConfigError(
                "meta", "meta options given but meta.method is none"
            )
        return
    from tfdml.meta import MMSIModel
    from tfdml.meta.forms import MMSIPairLoss

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


# -- augment --


def _augment_section(cfg, built):
    """``augment``: the keyword arguments of IAA's estimator, augmenter and
    refresh callback, checked by probes (augment options need
    ``augment.method: iaa``)."""
    if cfg["augment"]["method"] != "iaa":
        if set(cfg["augment"]) - set(config_lib.SCHEMA["augment"]):
            raise ConfigError(
                "augment", "augment options given but augment.method is none"
            )
        return
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
        "augment",
        augment.IAAEstimator,
        num_classes=_PROBE_CLASSES,
        dim=_PROBE_DIM,
        **kw["estimator"],
    )
    _construct("augment", augment.IAAugmenter, estimator, **kw["augmenter"])
    _construct("augment", augment.IAARefresh, None, **kw["refresh"])
    built.augment_kwargs = kw


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


def _data_section(cfg, built):
    """``data``: reads the data set and checks it against the batch shape
    (:func:`check_data`); a proxy loss gets the number of training
    classes."""
    built.data = Data(cfg)
    check_data(cfg, built.data)
    if getattr(built.loss, "num_classes", 0) is None:  # a proxy loss
        built.loss.num_classes = built.data.num_train_classes


# -- train --


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


# -- validation: every section's builder, once, in order --

# (section, builder(cfg, built)) of the sections that read no data; the
# loss comes first (the optimizer and meta sections check against it).
OBJECT_SECTIONS = (
    ("loss", _loss_section),  # with miner and weighting
    ("optimizer", _optimizer_section),
    ("model", _model_section),
    ("eval", _eval_section),
    ("memory", _memory_section),
    ("meta", _meta_section),
    ("augment", _augment_section),
)

# Then the data, and what needs it (train.init_from builds an encoder with
# the classification head sized by the data).
DATA_SECTIONS = (
    ("data", _data_section),
    ("train", check_init_from),
)


def _run_sections(cfg, built, sections):
    for _, builder in sections:
        builder(cfg, built)
    return built


def validate_objects(cfg):
    """Like :func:`validate` without reading any data
    (:data:`OBJECT_SECTIONS` only)."""
    return _run_sections(cfg, Built(), OBJECT_SECTIONS)


def validate(cfg):
    """Runs every section's builder once (:data:`OBJECT_SECTIONS`, then
    :data:`DATA_SECTIONS`) and returns what they built.

    Raises:
      ConfigError: naming the key. Nothing is written.
    """
    return _run_sections(cfg, validate_objects(cfg), DATA_SECTIONS)


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
