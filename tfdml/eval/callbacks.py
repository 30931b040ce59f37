"""Keras callback: retrieval metrics on held-out classes every N epochs (or
steps), optionally with the TensorBoard embedding projector files."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import numpy.typing as npt
import tensorflow as tf
from keras import callbacks

from tfdml.data.pipeline import without_autotune
from tfdml.eval.embed import embed
from tfdml.eval.metrics import retrieval_metrics
from tfdml.validation import check_int


class RetrievalEvaluationCallback(callbacks.Callback):
    """Evaluates retrieval on validation classes and writes it into ``logs``.

    The metrics of :func:`tfdml.eval.retrieval_metrics` (queries are their
    own references) are added to ``logs`` as ``prefix + name`` (e.g.
    ``val_map@r``) at the end of every ``every_n_epochs``-th epoch and of the
    last epoch, so callbacks placed *after* this one (``CSVLogger``,
    ``EarlyStopping``/``ModelCheckpoint(monitor="val_map@r")``,
    ``TensorBoard``) see them. With ``every_n_epochs > 1`` the first epochs
    carry no ``val_*`` keys (``CSVLogger`` fixes its columns at the first
    epoch, so use ``every_n_epochs=1`` with it).

    ``every_n_steps`` adds evaluations every N training steps (global steps,
    ``model.optimizer.iterations``): they go to :attr:`step_history` and,
    with ``step_log_dir`` (default ``log_dir``), to TensorBoard as
    ``<prefix><name>_by_step`` at that step; epoch logs are unchanged (an
    epoch end that falls on an evaluated step reuses that evaluation).

    ``projector_dir`` writes the TensorBoard embedding projector files of
    the validation embeddings there at every epoch-end evaluation
    (overwritten each time): ``embeddings.tsv`` (the vectors),
    ``metadata.tsv`` (``label`` and ``index`` columns), ``sprite.png`` (one
    thumbnail per point, when the inputs are images ``[N, H, W(, C)]``),
    ``projector_config.pbtxt`` and an event file so that TensorBoard lists
    the folder as a run (point TensorBoard at its parent). At most
    ``projector_points`` points, a seeded sample.

    Args:
      dataset_or_arrays: ``(images, labels)`` arrays, an ``images`` array
        with ``labels`` given, or a ``tf.data.Dataset`` of ``(images,
        labels)`` batches.
      labels: ``[N]`` int labels when the first argument is an array.
      encoder: model whose output dict holds ``"embeddings"`` (default: the
        model being trained).
      every_n_epochs: evaluation period.
      prefix: key prefix in ``logs``.
      ks: the K of ``recall@K``.
      batch_size: embedding batch size for arrays.
      log_dir: if given, also writes ``tf.summary`` scalars there.
      metric_options: extra keyword arguments of ``retrieval_metrics``.
      recalibrate_data: training batches (a ``tf.data.Dataset`` of images
        or ``(images, labels)``, or an image array) for
        :func:`tfdml.models.recalibrate_batchnorm`, run before every
        evaluation so that inference-mode BatchNorm statistics describe
        the current weights (recommended when training from scratch).
        ``None``: evaluate with the moving statistics as they are.
      recalibrate_batches: how many batches of ``recalibrate_data`` to use
        (required for an infinite dataset).
      every_n_steps: also evaluate every N training steps (None: never).
      step_log_dir: ``tf.summary`` folder of the step evaluations (default:
        ``log_dir``).
      projector_dir: folder for the projector files (None: none written).
      projector_points: the most points written to the projector.
      projector_seed: seed of the projector's sample of points.
    """

    def __init__(
        self,
        dataset_or_arrays: tf.data.Dataset
        | tuple[npt.ArrayLike, npt.ArrayLike]
        | npt.ArrayLike,
        labels: npt.ArrayLike | None = None,
        encoder: keras.Model | None = None,
        every_n_epochs: int = 1,
        prefix: str = "val_",
        ks: Sequence[int] = (1, 2, 4, 8),
        batch_size: int = 128,
        log_dir: str | None = None,
        metric_options: Mapping[str, Any] | None = None,
        recalibrate_data: tf.data.Dataset | npt.ArrayLike | None = None,
        recalibrate_batches: int | None = None,
        every_n_steps: int | None = None,
        step_log_dir: str | None = None,
        projector_dir: str | None = None,
        projector_points: int = 1000,
        projector_seed: int = 0,
    ):
        super().__init__()
        if int(every_n_epochs) < 1:
            raise ValueError(
                f"`every_n_epochs` must be >= 1; received {every_n_epochs}."
            )
        for name, v in (
            ("every_n_steps", every_n_steps),
            ("projector_points", projector_points),
        ):
            if v is None and name == "every_n_steps":
                continue
            check_int(name, v)
        if isinstance(dataset_or_arrays, tf.data.Dataset):
            self._ds = dataset_or_arrays
            self._x = self._y = None
        else:
            if isinstance(dataset_or_arrays, (tuple, list)):
                if labels is not None or len(dataset_or_arrays) != 2:
                    raise ValueError(
                        "Pass `(images, labels)` or `images, labels`; "
                        f"received a sequence of {len(dataset_or_arrays)}."
                    )
                x, labels = dataset_or_arrays
            else:
                x = dataset_or_arrays
            if labels is None:
                raise ValueError("`labels` is required with an image array.")
            self._ds = None
            self._x = np.asarray(x)
            self._y = np.asarray(labels).reshape(-1)
            if len(self._x) != len(self._y):
                raise ValueError(
                    f"`labels` must have {len(self._x)} entries; received "
                    f"{len(self._y)}."
                )
        self.encoder = encoder
        self.every_n_epochs = int(every_n_epochs)
        self.prefix = prefix
        self.ks = tuple(ks)
        self.batch_size = int(batch_size)
        self.log_dir = log_dir
        self.metric_options = dict(metric_options or {})
        self._writer = None
        self.history = []
        self.recalibrate_data = recalibrate_data
        self.recalibrate_batches = recalibrate_batches
        self.every_n_steps = (
            None if every_n_steps is None else int(every_n_steps)
        )
        self.step_history = []
        self.step_log_dir = step_log_dir or log_dir
        self._step_writer = None
        self.projector_dir = projector_dir
        self.projector_points = int(projector_points)
        self.projector_seed = projector_seed
        self._last = None  # (step, metrics, embeddings, labels)
        self._projector_writer = None

    def _net(self):
        return self.encoder if self.encoder is not None else self.model

    def embed(self) -> tuple[np.ndarray, np.ndarray]:
        """``(embeddings float32 [N, d], labels int64 [N])`` of the
        evaluation data (:func:`tfdml.eval.embed`, inference mode)."""
        net = self._net()
        if self._ds is not None:
            emb, y = embed(net, self._ds, batched=True, return_labels=True)
        else:
            emb, y = embed(net, self._x, self.batch_size), self._y
        return emb, np.asarray(y).reshape(-1).astype(np.int64)

    def recalibrate(self) -> int:
        """Precise BN on ``recalibrate_data`` (no-op when it is None)."""
        if self.recalibrate_data is None:
            return 0
        from tfdml.models.batchnorm import recalibrate_batchnorm

        return recalibrate_batchnorm(
            self._net(),
            self.recalibrate_data,
            num_batches=self.recalibrate_batches,
            batch_size=self.batch_size,
        )

    def evaluate(self) -> dict[str, float]:
        return self._evaluate()[0]

    def _evaluate(self):
        """(metrics, embeddings, labels)."""
        self.recalibrate()
        emb, y = self.embed()
        metrics = retrieval_metrics(emb, y, ks=self.ks, **self.metric_options)
        return metrics, emb, y

    def _step(self):
        try:
            return int(self.model.optimizer.iterations.numpy())
        except (AttributeError, TypeError, ValueError):
            return None

    def _write_scalars(self, named, step, by_step=False):
        folder = self.step_log_dir if by_step else self.log_dir
        if not folder:
            return
        attr = "_step_writer" if by_step else "_writer"
        if getattr(self, attr) is None:
            setattr(self, attr, tf.summary.create_file_writer(folder))
        writer = getattr(self, attr)
        suffix = "_by_step" if by_step else ""
        with writer.as_default():
            for k, v in named.items():
                tf.summary.scalar(k + suffix, float(v), step=step)
        writer.flush()

    def on_train_batch_end(
        self, batch: int, logs: Mapping[str, Any] | None = None
    ) -> None:
        if self.every_n_steps is None:
            return
        step = self._step()
        if step is None or step % self.every_n_steps:
            return
        metrics, emb, y = self._evaluate()
        self._last = (step, metrics, emb, y)
        named = {self.prefix + k: v for k, v in metrics.items()}
        self.step_history.append((step, named))
        self._write_scalars(named, step, by_step=True)

    def on_epoch_end(
        self, epoch: int, logs: Mapping[str, Any] | None = None
    ) -> None:
        last = self.params and epoch + 1 == self.params.get("epochs")
        if (epoch + 1) % self.every_n_epochs and not last:
            return
        step = self._step()
        if (
            self._last is not None
            and step is not None
            and self._last[0] == step
        ):
            metrics, emb, y = self._last[1:]  # evaluated at this very step
        else:
            metrics, emb, y = self._evaluate()
        self._last = None
        named = {self.prefix + k: v for k, v in metrics.items()}
        self.history.append((epoch, named))
        if logs is not None:
            logs.update(named)
        self._write_scalars(named, epoch)
        if self.projector_dir:
            self.write_projector(emb, y, epoch)

    # -- embedding projector --

    def _images(self, idx):
        """The evaluation inputs at the sorted indices ``idx``, or None
        when they are not images."""
        if self._x is not None:
            x = self._x
            return x[idx] if x.ndim in (3, 4) else None
        want, out, start = set(idx.tolist()), [], 0
        for batch in without_autotune(self._ds):
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            x = np.asarray(x)
            if x.ndim not in (3, 4):
                return None
            rows = [
                i - start for i in range(start, start + len(x)) if i in want
            ]
            out.extend(x[rows])
            start += len(x)
            if start > idx[-1]:
                break
        return np.stack(out) if len(out) == len(idx) else None

    def write_projector(
        self,
        embeddings: npt.ArrayLike,
        labels: npt.ArrayLike,
        epoch: int | None = None,
    ) -> str:
        """Writes the projector files of ``embeddings`` (a seeded sample of
        at most ``projector_points``) to ``projector_dir``; returns the
        folder."""
        from tensorboard.plugins import projector

        out = self.projector_dir
        os.makedirs(out, exist_ok=True)
        n = len(embeddings)
        idx = np.arange(n)
        if n > self.projector_points:
            rng = np.random.default_rng(self.projector_seed)
            idx = np.sort(rng.choice(n, self.projector_points, replace=False))
        emb = np.asarray(embeddings, np.float32)[idx]
        y = np.asarray(labels).reshape(-1)[idx]
        _atomic_text(
            os.path.join(out, "embeddings.tsv"),
            "".join("\t".join(f"{v:.6g}" for v in row) + "\n" for row in emb),
        )
        _atomic_text(
            os.path.join(out, "metadata.tsv"),
            "label\tindex\n" + "".join(f"{a}\t{b}\n" for a, b in zip(y, idx)),
        )
        config = projector.ProjectorConfig()
        e = config.embeddings.add()
        e.tensor_name = self.prefix + "embeddings"
        e.tensor_path = "embeddings.tsv"
        e.tensor_shape.extend(emb.shape)
        e.metadata_path = "metadata.tsv"
        images = self._images(idx)
        if images is not None and len(images):
            side = sprite_png(images, os.path.join(out, "sprite.png"))
            e.sprite.image_path = "sprite.png"
            e.sprite.single_image_dim.extend([side, side])
        from google.protobuf import text_format

        _atomic_text(
            os.path.join(out, "projector_config.pbtxt"),
            text_format.MessageToString(config),
        )
        # An event file makes the folder a TensorBoard run (one writer, so
        # one event file, per callback).
        if self._projector_writer is None:
            self._projector_writer = tf.summary.create_file_writer(out)
        writer = self._projector_writer
        with writer.as_default():
            tf.summary.text(
                "projector",
                f"{len(idx)} of {n} validation embeddings"
                + ("" if epoch is None else f" after epoch {epoch + 1}"),
                step=0 if epoch is None else epoch,
            )
        writer.flush()
        return out


#: TensorBoard's projector reads sprites up to 8192 x 8192 pixels.
SPRITE_MAX_SIDE = 8192


def sprite_png(images, path, max_thumb=64):
    """A square sprite of ``images`` ([N, H, W(, C)], uint8 or float in
    [0, 1]; row-major, blank padding) written as PNG; returns the thumbnail
    side in pixels."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise ValueError(
            "`images` must be [N, H, W] or [N, H, W, C] with C in 1, 3, 4; "
            f"received shape {x.shape}."
        )
    if np.issubdtype(x.dtype, np.floating):
        x = np.round(np.clip(np.nan_to_num(x), 0.0, 1.0) * 255.0)
    x = x.astype(np.uint8)[..., :3]
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    n = len(x)
    grid = math.ceil(math.sqrt(n))
    side = max(1, min(max_thumb, max(x.shape[1:3]), SPRITE_MAX_SIDE // grid))
    thumbs = tf.image.resize(x, [side, side], antialias=True)
    thumbs = np.clip(np.round(thumbs.numpy()), 0, 255).astype(np.uint8)
    sheet = np.full((grid * side, grid * side, 3), 255, np.uint8)
    for i, t in enumerate(thumbs):
        r, c = divmod(i, grid)
        sheet[r * side : (r + 1) * side, c * side : (c + 1) * side] = t
    tmp = str(path) + ".tmp"
    tf.io.write_file(tmp, tf.io.encode_png(sheet))
    os.replace(tmp, path)
    return side


def _atomic_text(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
