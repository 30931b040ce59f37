"""The Keras callbacks of a run: NaN guard, validation, best encoder,
history, checkpoints, TensorBoard (in the order :func:`chief_callbacks`
lists them), plus precise-BN recalibration before evaluations.
"""

import csv
import math
import os

from tfdml.training.build import eval_metrics


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

        def on_train_batch_end(self, batch, logs=None):
            if self.state.nan is None:
                self.inner.on_train_batch_end(batch, logs)

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


def chief_callbacks(cfg, built, parts, run_dir, state, checkpointer):
    """The chief's callbacks, in order (a non-chief worker runs the same
    minus those that only evaluate or write: ``loop._train_worker``)."""
    import keras

    NaNGuard, Guarded, BestEncoder, EpochCheckpoint = make_callbacks_module()
    cbs = [NaNGuard(state, cfg["train"]["debug_inject_nan_at_step"])]
    cbs += [Guarded(cb, state) for cb in parts.callbacks]
    evaluator = validation_callback(cfg, built, parts, run_dir)
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


def validation_callback(cfg, built, parts, run_dir=None):
    """H3's retrieval evaluation on the validation classes (``val_*``).

    With ``eval.recalibrate_bn`` the encoder's BatchNorm statistics are
    recalibrated on training batches before every evaluation (so the saved
    best encoder carries statistics that describe its weights). With a
    ``run_dir``: ``eval.every_n_steps`` evaluations are logged to
    ``tb/eval_steps``, ``eval.projector`` files go to ``tb/projector``."""
    from tfdml import eval as eval_lib

    ev = cfg["eval"]
    tb = os.path.join(run_dir, "tb") if run_dir else None
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
        every_n_steps=ev["every_n_steps"],
        step_log_dir=(
            os.path.join(tb, "eval_steps")
            if tb and ev["every_n_steps"]
            else None
        ),
        projector_dir=(
            os.path.join(tb, "projector") if tb and ev["projector"] else None
        ),
        projector_points=ev["projector_points"],
        projector_seed=cfg["train"]["seed"],
    )
