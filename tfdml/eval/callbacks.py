"""Keras callback: retrieval metrics on held-out classes every N epochs."""

import numpy as np
import tensorflow as tf
from keras import callbacks

from tfdml.eval.embed import embed
from tfdml.eval.metrics import retrieval_metrics


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
    """

    def __init__(
        self,
        dataset_or_arrays,
        labels=None,
        encoder=None,
        every_n_epochs=1,
        prefix="val_",
        ks=(1, 2, 4, 8),
        batch_size=128,
        log_dir=None,
        metric_options=None,
        recalibrate_data=None,
        recalibrate_batches=None,
    ):
        super().__init__()
        if int(every_n_epochs) < 1:
            raise ValueError(
                f"`every_n_epochs` must be >= 1; received {every_n_epochs}."
            )
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

    def _net(self):
        return self.encoder if self.encoder is not None else self.model

    def embed(self):
        """``(embeddings float32 [N, d], labels int64 [N])`` of the
        evaluation data (:func:`tfdml.eval.embed`, inference mode)."""
        net = self._net()
        if self._ds is not None:
            emb, y = embed(net, self._ds, batched=True, return_labels=True)
        else:
            emb, y = embed(net, self._x, self.batch_size), self._y
        return emb, np.asarray(y).reshape(-1).astype(np.int64)

    def recalibrate(self):
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

    def evaluate(self):
        self.recalibrate()
        emb, y = self.embed()
        return retrieval_metrics(emb, y, ks=self.ks, **self.metric_options)

    def on_epoch_end(self, epoch, logs=None):
        last = self.params and epoch + 1 == self.params.get("epochs")
        if (epoch + 1) % self.every_n_epochs and not last:
            return
        metrics = self.evaluate()
        named = {self.prefix + k: v for k, v in metrics.items()}
        self.history.append((epoch, named))
        if logs is not None:
            logs.update(named)
        if self.log_dir:
            if self._writer is None:
                self._writer = tf.summary.create_file_writer(self.log_dir)
            with self._writer.as_default():
                for k, v in named.items():
                    tf.summary.scalar(k, float(v), step=epoch)
            self._writer.flush()
