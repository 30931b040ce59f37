"""The run: validate, prepare the run folder, fit, resume, distribute.

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
    plots/               recall_at_k.png, retrieval_grid.png,
                         training_curves.png (+ precision_recall.png with
                         export.target_precision)

Resume: the same command finds ``checkpoints/state.json`` and continues at
the next epoch. The training data of epoch ``e`` is drawn with seed
``train.seed + e`` (:func:`train_dataset`), so with ``train.deterministic``
the resumed run ends with the same weights as an uninterrupted one.

NaN: a non-finite loss (or weight) stops training before the epoch is
checkpointed; the last good checkpoint is kept and :func:`main` returns
:data:`EXIT_NAN`.

Multi-worker (``train.strategy: multi_worker``): see :func:`_train`.
"""

import os
import shutil
import sys
import tempfile
import time

import numpy as np

from tfdml.data.pipeline import without_autotune
from tfdml.training import run_dir as run_dir_lib
from tfdml.training.build import apply_init_from
from tfdml.training.build import build_model
from tfdml.training.build import build_optimizer
from tfdml.training.build import build_proxy_optimizer
from tfdml.training.build import describe
from tfdml.training.build import plain
from tfdml.training.build import validate
from tfdml.training.callbacks import chief_callbacks
from tfdml.training.callbacks import make_callbacks_module
from tfdml.training.callbacks import trim_history
from tfdml.training.checkpoint import Checkpointer
from tfdml.training.checkpoint import RunState
from tfdml.training.checkpoint import state_variables
from tfdml.training.config import ConfigError
from tfdml.training.report import finish

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_NAN = 3
EXIT_INTERRUPTED = 130


def run_dir_of(cfg, config_path=None):
    if cfg["train"]["run_dir"]:
        return os.path.abspath(cfg["train"]["run_dir"])
    stem = "run"
    if config_path:
        stem = os.path.splitext(os.path.basename(config_path))[0]
    return os.path.abspath(os.path.join("runs", stem))


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


def main(cfg, config_path=None, check_only=False):
    """Validates and runs a resolved config; returns the exit status."""
    try:
        built = validate(cfg)
        run_dir = run_dir_of(cfg, config_path)
        mode = run_dir_lib.prepare_run_dir(cfg, run_dir)
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
    state = RunState(
        run_dir_lib.read_state(run_dir) if mode == "resume" else None
    )
    with strategy.scope():
        parts = build_model(cfg, built, strategy)
        model = parts.model
        model.compile(
            optimizer=build_optimizer(cfg),
            loss=built.loss,
            jit_compile=train["jit_compile"],
            proxy_optimizer=build_proxy_optimizer(cfg),
        )
        # Without the proxies when a proxy optimizer updates them.
        model.optimizer.build(model.main_trainable_variables)
        variables = state_variables(
            model, model.optimizer, getattr(model, "proxy_optimizer", None)
        ) + [v for obj in parts.state_objects for v in state_variables(obj)]
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
    callbacks = chief_callbacks(cfg, built, parts, run_dir, state, checkpointer)
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
    run_dir_lib.write_state(run_dir, state)
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
                    "kwargs": plain(built.encoder_kwargs),
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
    proxy_optimizer = getattr(parts.model, "proxy_optimizer", None)
    if proxy_optimizer is not None:
        # The proxies' own optimizer (optimizer.proxy_lr_multiplier): its
        # learning rate is the main one x the multiplier.
        doc["objects"]["proxy_optimizer"] = {
            **describe(proxy_optimizer),
            "lr_multiplier": cfg["optimizer"]["proxy_lr_multiplier"],
            "updates": "the loss's proxies (optimizer: everything else)",
        }
    for name, obj in parts.describe.items():
        doc["objects"][name] = describe(obj)
    run_dir_lib.write_config(run_dir, doc["resolved"], doc["objects"])


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
    # No autotune model thread: destroying its iterator at the end of fit
    # waited for its back-off sleep (tfdml.data.without_autotune).
    return without_autotune(ds.prefetch(tf.data.AUTOTUNE))
