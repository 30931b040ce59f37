"""Epoch checkpoints: every training variable plus ``state.json``.

``checkpoints/`` in the run folder (:mod:`tfdml.training.run_dir` reads and
writes the files): :class:`Checkpointer` writes ``epoch-NNNNN`` with
``tf.train.Checkpoint`` and records it in ``state.json`` (:class:`RunState`);
resuming restores the newest readable one.
"""

import os
import sys

from tfdml.training import run_dir as run_dir_lib

STATE_FILE = run_dir_lib.STATE_FILE


def state_variables(*objects):
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
            run_dir_lib.write_state(os.path.dirname(self.directory), state)
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
