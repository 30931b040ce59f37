"""Nearest-neighbour indexes over a gallery of embeddings with string ids.

* :class:`BruteForceIndex`: exact, pure TensorFlow (``matmul`` + ``top_k``),
  the reference and the fallback.
* :class:`ScaNNIndex`: approximate, ScaNN's TensorFlow ops (Guo et al.,
  "Accelerating Large-Scale Inference with Anisotropic Vector Quantization",
  ICML 2020), dot-product similarity.

Both share ``search(queries, k) -> (ids [Nq, k] str, scores [Nq, k] float32)``
and ``save(path)`` / ``load(path)``. Scores are dot products; pass
L2-normalised embeddings for cosine similarity. Ties are broken by the lower
gallery index (``tf.math.top_k``).
"""

from __future__ import annotations

import json
import os

import numpy as np
import numpy.typing as npt
import tensorflow as tf


def _check_gallery(embeddings, ids):
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or not np.issubdtype(emb.dtype, np.floating):
        raise ValueError(
            "`embeddings` must be a float [N, d] array; received shape "
            f"{emb.shape} and dtype {emb.dtype}."
        )
    if len(emb) == 0:
        raise ValueError("`embeddings` must hold at least one row; got 0.")
    if ids is None:
        ids = np.arange(len(emb)).astype(str)
    ids = np.asarray(ids).astype(str)
    if ids.shape != (len(emb),):
        raise ValueError(
            f"`ids` must have shape [{len(emb)}]; received {ids.shape}."
        )
    return emb.astype(np.float32), ids


def _check_query(queries, dim, k, size):
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(
            f"`queries` must have shape [n, {dim}]; received {q.shape}."
        )
    k = int(k)
    if k < 1 or k > size:
        raise ValueError(f"`k` must be in [1, {size}]; received {k}.")
    return q, k


@tf.function(reduce_retracing=True, autograph=False)
def _topk(q, db, k):
    return tf.math.top_k(tf.matmul(q, db, transpose_b=True), k=k)


class BruteForceIndex:
    """Exact dot-product search in TensorFlow.

    Args:
      embeddings: ``[N, d]`` float gallery.
      ids: ``[N]`` string ids (default ``"0" .. "N-1"``).
      block_size: queries per matmul block.
    """

    def __init__(
        self,
        embeddings: npt.ArrayLike,
        ids: npt.ArrayLike | None = None,
        block_size: int = 1024,
    ):
        self.embeddings, self.ids = _check_gallery(embeddings, ids)
        self.block_size = int(block_size)
        self._db = tf.constant(self.embeddings)

    def __len__(self):
        return len(self.ids)

    @property
    def dim(self):
        return self.embeddings.shape[1]

    def search_indices(
        self, queries: npt.ArrayLike, k: int = 10
    ) -> tuple[np.ndarray, np.ndarray]:
        """(gallery indices int [Nq, k], scores float32 [Nq, k])."""
        q, k = _check_query(queries, self.dim, k, len(self))
        idx, sc = [], []
        for b in range(0, len(q), self.block_size):
            v, i = _topk(tf.constant(q[b : b + self.block_size]), self._db, k)
            idx.append(i.numpy())
            sc.append(v.numpy())
        if not idx:
            return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
        return np.concatenate(idx), np.concatenate(sc)

    def search(
        self, queries: npt.ArrayLike, k: int = 10
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids str [Nq, k], scores float32 [Nq, k]), best first."""
        i, s = self.search_indices(queries, k)
        return self.ids[i], s

    def save(self, path: str | os.PathLike[str]) -> None:
        os.makedirs(path, exist_ok=True)
        np.save(os.path.join(path, "embeddings.npy"), self.embeddings)
        np.save(os.path.join(path, "ids.npy"), self.ids)
        with open(os.path.join(path, "index.json"), "w") as f:
            json.dump({"type": "BruteForceIndex"}, f)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BruteForceIndex:
        return cls(
            np.load(os.path.join(path, "embeddings.npy")),
            np.load(os.path.join(path, "ids.npy")),
        )


def import_scann_ops():
    """``scann.scann_ops.py.scann_ops`` or an ImportError that says why."""
    try:
        from scann.scann_ops.py import scann_ops
    except Exception as e:  # ImportError, or NotFoundError on an ABI clash
        raise ImportError(
            "ScaNN is needed for ScaNNIndex / index='scann' but could not be "
            "imported: pip install scann==1.4.2 (its TF ops need "
            f"tensorflow 2.20.x). Original error: {e!r}"
        ) from e
    return scann_ops


# Order of scann_to_tensors' outputs.
_STATE = (
    "scann_config",
    "serialized_partitioner",
    "datapoint_to_token",
    "ah_codebook",
    "hashed_dataset",
    "int8_dataset",
    "int8_multipliers",
    "dp_norms",
    "dataset",
)


def scann_builder(
    embeddings,
    k=10,
    num_leaves=None,
    num_leaves_to_search=None,
    reorder=None,
    brute_force_below=20000,
    training_sample_size=50000,
    ah_training_sample_size=25000,
):
    """A configured ``scann_ops.builder`` (dot product).

    Galleries smaller than ``brute_force_below`` use ScaNN's exact brute
    force scorer; larger ones a partitioning tree (``num_leaves`` default
    ``~sqrt(N)``, trained on ``training_sample_size`` rows) with anisotropic
    hashing (codebooks trained on ``ah_training_sample_size`` rows) and
    exact re-ordering of ``reorder`` candidates (default ``max(100, 10 k)``).
    """
    scann_ops = import_scann_ops()
    n = len(embeddings)
    b = scann_ops.builder(embeddings, k, "dot_product")
    if n < brute_force_below:
        return b.score_brute_force()
    leaves = num_leaves or int(max(16, round(np.sqrt(n))))
    search = num_leaves_to_search or max(1, leaves // 20)
    return (
        b.tree(
            num_leaves=leaves,
            num_leaves_to_search=search,
            training_sample_size=min(n, training_sample_size),
        )
        .score_ah(
            2,
            anisotropic_quantization_threshold=0.2,
            training_sample_size=min(n, ah_training_sample_size),
        )
        .reorder(reorder or max(100, 10 * k))
    )


class ScaNNIndex:
    """Approximate dot-product search with ScaNN's TensorFlow ops.

    Args:
      embeddings: ``[N, d]`` float gallery.
      ids: ``[N]`` string ids.
      k: default number of neighbours (the builder's ``num_neighbors``).
      **builder_options: see :func:`scann_builder`.
    """

    def __init__(
        self,
        embeddings: npt.ArrayLike,
        ids: npt.ArrayLike | None = None,
        k: int = 10,
        **builder_options,
    ):
        self.embeddings, self.ids = _check_gallery(embeddings, ids)
        self.k = int(k)
        self.builder_options = dict(builder_options)
        self._ops = import_scann_ops()
        if embeddings is not None:
            self.searcher = scann_builder(
                self.embeddings, self.k, **builder_options
            ).build()

    def __len__(self):
        return len(self.ids)

    @property
    def dim(self):
        return self.embeddings.shape[1]

    def search_indices(
        self, queries: npt.ArrayLike, k: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        k = self.k if k is None else k
        q, k = _check_query(queries, self.dim, k, len(self))
        if len(q) == 0:
            return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
        i, s = self.searcher.search_batched(q, final_num_neighbors=k)
        i, s = i.numpy(), s.numpy()
        if i.shape[1] < k:  # a partition search can return fewer
            pad = k - i.shape[1]
            i = np.pad(i, ((0, 0), (0, pad)), constant_values=-1)
            s = np.pad(s, ((0, 0), (0, pad)), constant_values=-np.inf)
        return i, s

    def search(
        self, queries: npt.ArrayLike, k: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids str [Nq, k], scores float32 [Nq, k]); missing slots ``""``."""
        i, s = self.search_indices(queries, k)
        ids = np.where(i >= 0, self.ids[np.maximum(i, 0)], "")
        return ids, s

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the searcher state (``scann_to_tensors``) and the ids."""
        os.makedirs(path, exist_ok=True)
        tensors = self._ops.scann_to_tensors(self.searcher.searcher_handle)
        arrays = {n: t.numpy() for n, t in zip(_STATE, tensors)}
        np.savez(os.path.join(path, "scann_state.npz"), **arrays)
        np.save(os.path.join(path, "embeddings.npy"), self.embeddings)
        np.save(os.path.join(path, "ids.npy"), self.ids)
        with open(os.path.join(path, "index.json"), "w") as f:
            json.dump({"type": "ScaNNIndex", "k": self.k}, f)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ScaNNIndex:
        ops = import_scann_ops()
        with open(os.path.join(path, "index.json")) as f:
            meta = json.load(f)
        self = cls.__new__(cls)
        self.embeddings, self.ids = _check_gallery(
            np.load(os.path.join(path, "embeddings.npy")),
            np.load(os.path.join(path, "ids.npy")),
        )
        self.k = int(meta["k"])
        self.builder_options = {}
        self._ops = ops
        st = np.load(os.path.join(path, "scann_state.npz"), allow_pickle=True)
        t = {n: tf.constant(st[n]) for n in _STATE}
        handle = ops.tensors_to_scann(
            t["dataset"],
            t["scann_config"],
            t["serialized_partitioner"],
            t["datapoint_to_token"],
            t["ah_codebook"],
            t["hashed_dataset"],
            t["int8_dataset"],
            t["int8_multipliers"],
            t["dp_norms"],
        )
        self.searcher = ops.ScannSearcher(handle)
        return self
