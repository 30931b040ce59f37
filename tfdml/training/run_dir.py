"""The run folder: the one reader and writer of what ``train.py`` writes.

Layout (``docs/architecture.md``)::

  RUN_DIR/
    config.yaml          {"resolved": config, "objects": {...}}
    history.csv          CSVLogger
    tb/                  TensorBoard logs (+ eval_steps/ with
                         eval.every_n_steps, projector/ with eval.projector)
    checkpoints/         state.json + epoch-NNNNN.{index,data-*} checkpoints
    best_encoder.keras   best validation encoder
    final_encoder.keras  encoder at the end of training
    eval_test.json       metrics on the test classes
    plots/               recall_at_k.png, retrieval_grid.png,
                         training_curves.png (+ precision_recall.png when the
                         export threshold is calibrated)
    export/              the SavedModel(s) when ``export.enabled`` and
                         ``export.dir`` is empty (the default)

A folder is a *tfdml run* when its ``config.yaml`` is a mapping with a
``resolved`` mapping (what :func:`write_config` writes). ``train.py`` never
writes into a non-empty folder that is not a run, and ``train.overwrite``
removes only the names above (:func:`clean_run_dir`), never the folder itself
or anything else in it.
"""

import json
import os
import re
import shutil

from tfdml.training import config as config_lib
from tfdml.training.config import ConfigError

CONFIG_FILE = "config.yaml"
HISTORY_FILE = "history.csv"
TB_DIR = "tb"
CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.json"
BEST_ENCODER = "best_encoder.keras"
FINAL_ENCODER = "final_encoder.keras"
EVAL_FILE = "eval_test.json"
PLOTS_DIR = "plots"
EXPORT_DIR = "export"

#: Files a run writes at its top level (with their atomic-write leftovers).
RUN_FILES = (
    CONFIG_FILE,
    HISTORY_FILE,
    BEST_ENCODER,
    FINAL_ENCODER,
    EVAL_FILE,
    CONFIG_FILE + ".tmp",
    EVAL_FILE + ".tmp",
    "best_encoder.tmp.keras",
)
#: Folders a run writes (``export/`` only in its default place: see
#: :func:`clean_run_dir`).
RUN_DIRS = (TB_DIR, CHECKPOINT_DIR, PLOTS_DIR)

#: What tf.train.Checkpoint writes for ``checkpoints/epoch-NNNNN``.
CHECKPOINT_FILE = re.compile(r"^(epoch-\d{5,})(\.index|\.data-\d{5}-of-\d{5})$")
#: tf.train.Checkpoint's staging folder, left behind by a killed save.
CHECKPOINT_TEMP = re.compile(r"^(epoch-\d{5,})_temp$")


class RunDirError(ConfigError):
    """A run folder is missing, corrupt or not a tfdml run.

    A :class:`~tfdml.training.config.ConfigError` of ``train.run_dir``
    (``train.py`` exits with status 2); ``message`` is the text without the
    key.
    """

    def __init__(self, message):
        self.message = message
        super().__init__("train.run_dir", message)


# -- files --


def config_path(run_dir):
    return os.path.join(run_dir, CONFIG_FILE)


def checkpoint_dir(run_dir):
    return os.path.join(run_dir, CHECKPOINT_DIR)


def state_path(run_dir):
    return os.path.join(run_dir, CHECKPOINT_DIR, STATE_FILE)


def atomic_write(path, text):
    """Writes ``text`` to ``path`` through ``path.tmp`` + rename."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- config.yaml --


def write_config(run_dir, cfg, objects=None):
    """``config.yaml``: ``{"resolved": cfg, "objects": objects}``."""
    doc = {"resolved": cfg, "objects": objects or {}}
    atomic_write(config_path(run_dir), config_lib.dump_yaml(doc))


def read_document(run_dir):
    """The whole ``config.yaml`` of a run (``resolved`` and ``objects``).

    Raises:
      RunDirError: no ``config.yaml``, unreadable YAML, or not written by
        ``train.py`` (no ``resolved`` mapping).
    """
    path = config_path(run_dir)
    if not os.path.isfile(path):
        raise RunDirError(f"{run_dir} is not a tfdml run: no {CONFIG_FILE}")
    try:
        with open(path, encoding="utf-8") as f:
            doc = config_lib.parse_yaml(f.read(), path)
    except (ConfigError, UnicodeDecodeError, OSError) as e:
        raise RunDirError(f"{path} cannot be read: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("resolved"), dict):
        raise RunDirError(
            f"{run_dir} is not a tfdml run: {path} has no 'resolved' "
            "section (the config.yaml that train.py writes)"
        )
    return doc


def read_config(run_dir):
    """The resolved config a run was trained with (``config.yaml``'s
    ``resolved`` section). Raises :class:`RunDirError`."""
    return read_document(run_dir)["resolved"]


def is_run(run_dir):
    """Whether ``run_dir`` holds a ``config.yaml`` written by train.py."""
    try:
        read_document(run_dir)
    except RunDirError:
        return False
    return True


# -- checkpoints/state.json --


def read_state(run_dir):
    """``checkpoints/state.json`` as a dict, or None when there is none.

    Raises:
      RunDirError: the file is truncated or corrupt (naming it).
    """
    path = state_path(run_dir)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (ValueError, OSError) as e:
        raise _bad_state(path, e) from None
    if not isinstance(state, dict):
        raise _bad_state(
            path, f"expected an object, got {type(state).__name__}"
        )
    epoch = state.get("epoch", 0)
    checkpoint = state.get("checkpoint")
    if (
        isinstance(epoch, bool)
        or not isinstance(epoch, int)
        or epoch < 0
        or (
            checkpoint is not None
            and not (
                isinstance(checkpoint, str)
                and re.fullmatch(r"epoch-\d{5,}", checkpoint)
            )
        )
        or (epoch > 0 and not checkpoint)
    ):
        raise _bad_state(path, "bad 'epoch' or 'checkpoint'")
    return state


def _bad_state(path, reason):
    return RunDirError(
        f"{path} is corrupt ({reason}). Delete it to train this run from "
        "scratch, or --set train.overwrite=true"
    )


def write_state(run_dir, state):
    """Writes ``checkpoints/state.json`` (``state``: a dict or an object
    with ``to_json()``) atomically."""
    if hasattr(state, "to_json"):
        state = state.to_json()
    path = state_path(run_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, json.dumps(state, indent=2))


# -- checkpoint files --


def checkpoint_names(directory):
    """``epoch-NNNNN`` prefixes with an ``.index`` file, oldest first."""
    if not os.path.isdir(directory):
        return []
    names = set()
    for f in os.listdir(directory):
        m = CHECKPOINT_FILE.match(f)
        if m and m.group(2) == ".index":
            names.add(m.group(1))
    return sorted(names, key=checkpoint_epoch)


def checkpoint_epoch(name):
    """``"epoch-00003"`` -> 3."""
    return int(name.split("-", 1)[1])


def remove_checkpoint(directory, name):
    """Removes the files of checkpoint ``name`` (and its staging folder)."""
    for f in os.listdir(directory):
        path = os.path.join(directory, f)
        m = CHECKPOINT_FILE.match(f)
        if m and m.group(1) == name and not os.path.isdir(path):
            os.remove(path)
        t = CHECKPOINT_TEMP.match(f)
        if t and t.group(1) == name and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)


def prune_checkpoints(directory, keep, keep_name=None):
    """Keeps the newest ``keep`` checkpoints (always ``keep_name``).

    Removes only checkpoint files and staging folders (``epoch-N_temp/``,
    stale once a save finished); anything else stays.
    """
    for f in os.listdir(directory):
        path = os.path.join(directory, f)
        if CHECKPOINT_TEMP.match(f) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
    names = [n for n in checkpoint_names(directory) if n != keep_name]
    # Orphans (data without an index) of an older epoch go too.
    orphans = (
        {
            m.group(1)
            for m in map(CHECKPOINT_FILE.match, os.listdir(directory))
            if m
        }
        - set(names)
        - {keep_name}
    )
    stale = names[: max(0, len(names) - (keep - 1))] + sorted(orphans)
    for name in stale:
        remove_checkpoint(directory, name)


# -- the folder --


def _comparable(cfg):
    """Config without the keys that may change between resumes (the folder
    may also be moved or copied)."""
    out = json.loads(json.dumps(cfg))
    train = out.get("train")
    if isinstance(train, dict):
        for key in (
            "overwrite",
            "verbose",
            "debug_inject_nan_at_step",
            "run_dir",
        ):
            train.pop(key, None)
    return out


def prepare_run_dir(cfg, run_dir):
    """Checks an existing run folder against ``cfg``; writes nothing.

    Returns:
      ``"new"`` (a missing or empty folder, a run to overwrite or a run
      that finished no epoch: :func:`clean_run_dir` it), ``"resume"`` or
      ``"done"``.

    Raises:
      ConfigError: of ``train.run_dir``: a non-empty folder that is not a
        tfdml run (even with ``train.overwrite``), a run of another
        config, or a corrupt ``state.json``.
    """
    if not os.path.exists(run_dir):
        return "new"
    if not os.path.isdir(run_dir):
        raise ConfigError("train.run_dir", f"{run_dir} is not a folder")
    if not os.listdir(run_dir):
        return "new"
    try:
        previous = read_config(run_dir)
    except RunDirError as e:
        raise ConfigError(
            "train.run_dir",
            f"{run_dir} is not empty and is not a tfdml run ({e.message}); "
            "train.py only writes into a new or empty folder or a tfdml "
            "run, so nothing was changed. Choose another train.run_dir.",
        ) from None
    if cfg["train"]["overwrite"]:
        return "new"
    if _comparable(previous) != _comparable(cfg):
        raise ConfigError(
            "train.run_dir",
            f"{run_dir} holds a run of a different config; choose another "
            "train.run_dir or --set train.overwrite=true",
        )
    state = read_state(run_dir)
    if state and state.get("done"):
        return "done"
    return "resume" if state else "new"


def default_export_dir(run_dir):
    return os.path.join(run_dir, EXPORT_DIR)


def _writes_default_export(run_dir, cfg):
    export = (cfg or {}).get("export") or {}
    if not export.get("enabled"):
        return False
    out = export.get("dir")
    return not out or os.path.abspath(out) == os.path.abspath(
        default_export_dir(run_dir)
    )


def clean_run_dir(run_dir):
    """Removes what a tfdml run writes from ``run_dir`` (overwrite).

    Only the names of :data:`RUN_FILES` and :data:`RUN_DIRS` (in
    ``checkpoints/`` only checkpoints and ``state.json``), and ``export/``
    when the run's own config exported there. The folder itself and any
    other file stay. A folder that is not a tfdml run is left alone.
    """
    if not os.path.isdir(run_dir) or not os.listdir(run_dir):
        return
    try:
        previous = read_config(run_dir)
    except RunDirError:
        return
    for name in RUN_DIRS + (
        (EXPORT_DIR,) if _writes_default_export(run_dir, previous) else ()
    ):
        path = os.path.join(run_dir, name)
        if name == CHECKPOINT_DIR and os.path.isdir(path):
            _clean_checkpoints(path)
        elif os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
    for name in RUN_FILES:
        path = os.path.join(run_dir, name)
        if os.path.isfile(path) or os.path.islink(path):
            os.remove(path)


def _clean_checkpoints(directory):
    for f in os.listdir(directory):
        path = os.path.join(directory, f)
        if f in (STATE_FILE, STATE_FILE + ".tmp") or CHECKPOINT_FILE.match(f):
            if not os.path.isdir(path):
                os.remove(path)
        elif CHECKPOINT_TEMP.match(f) and os.path.isdir(path):
            shutil.rmtree(path)
    if not os.listdir(directory):
        os.rmdir(directory)


# -- the encoder --


def load_encoder(run_dir, name=BEST_ENCODER, cfg=None):
    """A run's Keras encoder (``best_encoder.keras`` by default), checked
    against the run's ``model.image_size`` / ``model.channels``.

    Returns:
      ``(encoder, (H, W, C))``.

    Raises:
      RunDirError: the file is missing or does not match the config.
    """
    import keras

    import tfdml.models  # noqa: F401  (registers the encoder's layers)

    if cfg is None:
        cfg = read_config(run_dir)
    path = os.path.join(run_dir, name)
    if not os.path.isfile(path):
        raise RunDirError(f"{run_dir} has no {name}")
    encoder = keras.saving.load_model(path, compile=False)
    shape = encoder.inputs[0].shape
    h, w, c = (int(s) for s in shape[1:])
    model = cfg.get("model") or {}
    size = model.get("image_size")
    if size is not None and (int(size) != h or int(size) != w):
        raise RunDirError(
            f"{CONFIG_FILE} model.image_size={size} does not match the "
            f"input {tuple(shape)} of {path}"
        )
    if model.get("channels") is not None and int(model["channels"]) != c:
        raise RunDirError(
            f"{CONFIG_FILE} model.channels={model['channels']} does not "
            f"match the input {tuple(shape)} of {path}"
        )
    return encoder, (h, w, c)
