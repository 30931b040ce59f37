"""Tensor helpers behind the pair contract.

Every pair-based piece of tfdml works on three dense tensors:

* ``sim``  ``[B, M]`` float32 cosine similarity between B anchors and M
  references (the batch itself, or batch + memory bank, or batch + synthetic
  copies),
* ``pos_mask`` ``[B, M]`` bool: same label, not the same example,
* ``neg_mask`` ``[B, M]`` bool: different label.

Self-pairs are excluded **by example identity** (``ids`` vs ``ref_ids``), never
by the diagonal, so a reference set of another size (a memory bank) is handled
correctly. Shapes are static: no ``boolean_mask`` and no data-dependent index
lists, so everything runs in eager, ``tf.function`` and XLA alike.
"""

import tensorflow as tf

# A finite stand-in for -inf: exp() of it is exactly 0 in float32 and it never
# produces NaN in gradients (0 * inf) the way a real -inf can.
NEG_INF = -1e9


def check_labels_embeddings(labels, embeddings, name="labels"):
    """Validates ranks and dtypes; returns (int32 labels [B], embeddings).

    Raises ``ValueError`` naming the argument and the value received.
    """
    labels = tf.convert_to_tensor(labels)
    embeddings = tf.convert_to_tensor(embeddings)
    if embeddings.shape.rank is not None and embeddings.shape.rank != 2:
        raise ValueError(
            "`embeddings` must have rank 2 [batch, dim]; received shape "
            f"{embeddings.shape}."
        )
    if not embeddings.dtype.is_floating:
        raise ValueError(
            "`embeddings` must be a floating tensor; received dtype "
            f"{embeddings.dtype.name}."
        )
    if labels.shape.rank == 2 and labels.shape[-1] == 1:
        labels = tf.squeeze(labels, axis=-1)
    if is_multi_hot(labels, name):
        if not (
            labels.dtype.is_integer
            or labels.dtype.is_floating
            or labels.dtype == tf.bool
        ):
            raise ValueError(
                f"`{name}` must be multi-hot 0/1 values; received dtype "
                f"{labels.dtype.name}."
            )
        if labels.dtype != tf.bool:
            labels = tf.not_equal(labels, tf.zeros([], labels.dtype))
        return tf.cast(labels, tf.int32), embeddings
    if labels.shape.rank is not None and labels.shape.rank != 1:
        raise ValueError(
            f"`{name}` must have rank 1 [batch] (or [batch, 1]) class ids, "
            f"or rank 2 [batch, classes] multi-hot labels; received shape "
            f"{labels.shape}."
        )
    if not (labels.dtype.is_integer or labels.dtype.is_floating):
        raise ValueError(
            f"`{name}` must be integer class ids; received dtype "
            f"{labels.dtype.name}."
        )
    if labels.dtype.is_floating:
        # Keras' Loss.__call__ converts y_true to the loss dtype; class ids
        # stored in float32 are exact up to 2**24.
        labels = tf.cast(tf.round(labels), tf.int32)
    return tf.cast(labels, tf.int32), embeddings


def is_multi_hot(labels, name="labels"):
    """True for multi-hot labels ``[B, C]`` (``C > 1``; relevance: the label
    sets intersect), False for class ids ``[B]`` (``[B, 1]`` is read as
    class ids). Raises ``ValueError`` for rank 2 with an unknown ``C``."""
    shape = labels.shape
    if shape.rank != 2 or shape[-1] == 1:
        return False
    if shape[-1] is None:
        raise ValueError(
            f"`{name}` has rank 2 with an unknown number of classes "
            f"{shape}: give multi-hot labels a static last dimension "
            "(or class ids [batch])."
        )
    return True


def relevance(labels, ref_labels):
    """``[B, M]`` bool: same class id, or intersecting label sets when the
    labels are multi-hot ``[B, C]`` / ``[M, C]`` (0/1 values)."""
    if labels.shape.rank == 2:
        if ref_labels.shape.rank != 2 or (
            labels.shape[-1] is not None
            and ref_labels.shape[-1] is not None
            and labels.shape[-1] != ref_labels.shape[-1]
        ):
            raise ValueError(
                "`labels` are multi-hot with shape "
                f"{labels.shape}; `ref_labels` must be multi-hot with the "
                f"same number of classes; received shape {ref_labels.shape}."
            )
        shared = tf.matmul(
            tf.cast(labels, tf.float32),
            tf.cast(ref_labels, tf.float32),
            transpose_b=True,
        )
        return shared > 0.5
    if ref_labels.shape.rank == 2:
        raise ValueError(
            "`ref_labels` are multi-hot with shape "
            f"{ref_labels.shape} but `labels` are class ids "
            f"{labels.shape}; give both in the same form."
        )
    return tf.equal(labels[:, None], ref_labels[None, :])


_label_relevance = relevance


def relevance_matrix(relevance, labels, ref_labels):
    """The bool ``[B, M]`` relevance of ``relevance`` (a matrix, or a
    function of ``(labels, ref_labels)``), checked: bool dtype, rank 2,
    ``B`` rows and ``M`` columns (``ValueError`` when static, else an
    ``InvalidArgumentError``; XLA drops the assert)."""
    if callable(relevance):
        rel = tf.convert_to_tensor(relevance(labels, ref_labels))
        what = "the relevance function's result"
    else:
        rel = tf.convert_to_tensor(relevance)
        what = "`relevance`"
    if rel.dtype != tf.bool:
        raise ValueError(
            f"{what} must be a bool [batch, references] matrix (True: "
            f"relevant); received dtype {rel.dtype.name}."
        )
    if rel.shape.rank is not None and rel.shape.rank != 2:
        raise ValueError(
            f"{what} must have rank 2 [batch, references]; received shape "
            f"{rel.shape}."
        )
    b, m = labels.shape[0], ref_labels.shape[0]
    if rel.shape.rank == 2:
        for got, want, axis in (
            (rel.shape[0], b, "rows"),
            (rel.shape[1], m, "columns"),
        ):
            if got is not None and want is not None and got != want:
                raise ValueError(
                    f"{what} has {got} {axis}; the pair set has {want} "
                    f"({'anchors' if axis == 'rows' else 'references'}); "
                    f"received shape {rel.shape}."
                )
    check = tf.debugging.assert_equal(
        tf.shape(rel),
        tf.stack([tf.shape(labels)[0], tf.shape(ref_labels)[0]]),
        message=f"{what} must be [batch, references]",
    )
    with tf.control_dependencies([check] if check is not None else []):
        return tf.identity(rel)


def l2_normalize(x, axis=-1):
    """L2 normalisation computed in float32 (for float16/bfloat16 inputs)."""
    x = tf.cast(x, tf.float32)
    return tf.math.l2_normalize(x, axis=axis, epsilon=1e-12)


def cosine_similarity(embeddings, ref_embeddings=None, normalize=True):
    """``[B, M]`` cosine similarity in float32."""
    a = (
        l2_normalize(embeddings)
        if normalize
        else tf.cast(embeddings, "float32")
    )
    if ref_embeddings is None:
        b = a
    else:
        b = (
            l2_normalize(ref_embeddings)
            if normalize
            else tf.cast(ref_embeddings, tf.float32)
        )
    return tf.matmul(a, b, transpose_b=True)


def pairwise_distance(embeddings, ref_embeddings=None, squared=False):
    """``[B, M]`` Euclidean distance in float32 (as tfa's pairwise_distance).

    The gradient at zero distance is defined (0), not NaN.
    """
    a = tf.cast(embeddings, tf.float32)
    b = a if ref_embeddings is None else tf.cast(ref_embeddings, tf.float32)
    sq = (
        tf.reduce_sum(tf.square(a), axis=1, keepdims=True)
        - 2.0 * tf.matmul(a, b, transpose_b=True)
        + tf.reduce_sum(tf.square(b), axis=1)[None, :]
    )
    sq = tf.maximum(sq, 0.0)
    if squared:
        return sq
    return safe_sqrt(sq)


def safe_sqrt(x):
    """sqrt with a zero (not infinite) gradient at 0."""
    positive = x > 0.0
    safe = tf.where(positive, x, tf.ones_like(x))
    return tf.where(positive, tf.sqrt(safe), tf.zeros_like(x))


# Squared unit-vector distances below this are float32 rounding noise of
# 2 - 2 S (the ulp of S near 1 is 6e-8; a float32 dot product of unit
# vectors carries a few of them) and are set to exactly 0: two identical
# embeddings are at distance 0 on every CPU, with or without oneDNN, so a
# duplicate pair never counts as a "non-zero" pair by accident.
UNIT_DISTANCE_SQ_FLOOR = 1e-6


def distance_from_similarity(sim):
    """Euclidean distance between unit vectors: sqrt(2 - 2 S).

    Squared distances at or below :data:`UNIT_DISTANCE_SQ_FLOOR` (rounding
    noise; distance 1e-3) are 0, with a zero gradient.
    """
    sq = 2.0 - 2.0 * sim
    return safe_sqrt(
        tf.where(sq > UNIT_DISTANCE_SQ_FLOOR, sq, tf.zeros_like(sq))
    )


def pair_masks(
    labels,
    ref_labels=None,
    ids=None,
    ref_ids=None,
    ref_valid=None,
    relevance=None,
    dtype=tf.bool,
):
    """Positive and negative masks ``[B, M]``, self-pairs (same id)
    excluded from both (they matter for a multi-hot row with no label,
    which is a negative of every *other* row).

    Args:
      labels: ``[B]`` int class ids of the anchors, or ``[B, C]`` multi-hot
        0/1 labels (relevant iff the label sets intersect, see
        :func:`relevance`).
      ref_labels: ``[M]`` int class ids of the references (``[M, C]`` for
        multi-hot; default: labels).
      ids: ``[B]`` int example ids of the anchors (default: ``range(B)``).
      ref_ids: ``[M]`` int example ids of the references (default: ``ids``
        when the reference set is the batch itself; otherwise ``-1 - range(M)``
        so that no reference matches an anchor by accident).
      ref_valid: optional ``[M]`` bool; invalid references (empty memory
        slots) are in neither mask.
      relevance: optional, instead of the labels' own relevance: a bool
        ``[B, M]`` matrix (True: the pair is relevant, a positive) or a
        function ``(labels int32, ref_labels int32) -> bool [B, M]`` (see
        :func:`relevance_matrix`). Self pairs and invalid references are
        still excluded from both masks.

      dtype: ``tf.bool`` (default), or ``tf.float32`` for 0/1 float masks
        (XLA's CPU code runs float products several times faster than the
        same logic on bools: the masks of a 512 x 512 batch 0.17 ms as
        floats, 0.73 ms as bools; the fused contrastive forward uses them).

    Returns:
      ``(pos_mask, neg_mask)``, ``[B, M]`` of ``dtype``.
    """
    labels = tf.cast(labels, tf.int32)
    batch = tf.shape(labels)[0]
    if ids is None:
        ids = tf.range(batch, dtype=tf.int32)
    ids = tf.cast(ids, tf.int32)
    if ref_labels is None:
        ref_labels = labels
        if ref_ids is None:
            ref_ids = ids
    ref_labels = tf.cast(ref_labels, tf.int32)
    if ref_ids is None:
        ref_ids = -1 - tf.range(tf.shape(ref_labels)[0], dtype=tf.int32)
    ref_ids = tf.cast(ref_ids, tf.int32)
    if relevance is None:
        same = _label_relevance(labels, ref_labels)
    else:
        same = relevance_matrix(relevance, labels, ref_labels)
    not_self = tf.not_equal(ids[:, None], ref_ids[None, :])
    if dtype != tf.bool:
        keep = tf.cast(not_self, dtype)
        if ref_valid is not None:
            keep *= tf.cast(tf.cast(ref_valid, tf.bool), dtype)[None, :]
        pos = tf.cast(same, dtype) * keep
        return pos, keep - pos
    pos = tf.logical_and(same, not_self)
    # A multi-hot row with no label is not relevant to itself: its self pair
    # must not become a negative (of similarity 1) either.
    neg = tf.logical_and(tf.logical_not(same), not_self)
    if ref_valid is not None:
        valid = tf.cast(ref_valid, tf.bool)[None, :]
        pos = tf.logical_and(pos, valid)
        neg = tf.logical_and(neg, valid)
    return pos, neg


def masked_logsumexp(x, mask, axis=-1, add_one=False):
    """log(sum over masked entries of exp(x)), optionally log(1 + sum(...)).

    Rows with no masked entry give ``NEG_INF``-like large negatives for the
    plain form and exactly 0 for the ``add_one`` form; gradients are finite.
    """
    mask = tf.cast(mask, tf.bool)
    x = tf.where(mask, x, tf.fill(tf.shape(x), NEG_INF))
    if add_one:
        zeros = tf.zeros_like(tf.reduce_sum(x, axis=axis, keepdims=True))
        x = tf.concat([x, zeros], axis=axis)
    m = tf.stop_gradient(tf.reduce_max(x, axis=axis, keepdims=True))
    out = tf.math.log(tf.reduce_sum(tf.exp(x - m), axis=axis, keepdims=True))
    return tf.squeeze(out + m, axis=axis)


def masked_max(x, mask, axis=-1):
    """Max over masked entries; ``NEG_INF`` where the row is empty."""
    return tf.reduce_max(tf.where(mask, x, tf.fill(tf.shape(x), NEG_INF)), axis)


def masked_min(x, mask, axis=-1):
    """Min over masked entries; ``-NEG_INF`` where the row is empty."""
    return tf.reduce_min(
        tf.where(mask, x, tf.fill(tf.shape(x), -NEG_INF)), axis
    )


def masked_mean(x, mask, axis=-1):
    """Mean over masked entries; 0 where the row is empty."""
    m = tf.cast(mask, x.dtype)
    return tf.math.divide_no_nan(
        tf.reduce_sum(x * m, axis), tf.reduce_sum(m, axis)
    )


def similarity_loss(a, b, forward):
    """Per-anchor loss of ``sim = a b^T`` with a matmul-only gradient.

    For losses whose gradient w.r.t. ``sim`` is cheap to form in the forward
    pass (the fused contrastive path): ``forward(sim)`` returns
    ``(loss [B], coef [B, M])`` with ``d loss_i / d sim_ij = coef_ij`` (and
    no dependence of ``loss_i`` on other rows). With ``g`` the upstream
    gradient ``[B]`` the backward pass is ``d a = g * (coef b) +
    coef^T (g * a)`` (the second term only when ``b`` is None, the batch
    against itself) and ``d b = coef^T (g * a)``: two matmuls and no
    ``[B, M]`` elementwise work (the row scaling by ``g`` commutes with the
    matmul).

    First-order only: the returned gradient treats ``coef`` as a constant,
    so a second derivative through this function is not the true one.

    Args:
      a: ``[B, d]`` float32 anchors.
      b: ``[M, d]`` float32 references, or None for ``a`` itself.
      forward: ``sim [B, M] -> (loss [B], coef [B, M])``.
    """
    if b is None:

        @tf.custom_gradient
        def self_fn(a):
            loss, coef = forward(tf.matmul(a, a, transpose_b=True))

            def grad(upstream):
                g = upstream[:, None]
                return g * tf.matmul(coef, a) + tf.matmul(
                    coef, g * a, transpose_a=True
                )

            return loss, grad

        return self_fn(a)

    @tf.custom_gradient
    def ref_fn(a, b):
        loss, coef = forward(tf.matmul(a, b, transpose_b=True))

        def grad(upstream):
            g = upstream[:, None]
            return g * tf.matmul(coef, b), tf.matmul(
                coef, g * a, transpose_a=True
            )

        return loss, grad

    return ref_fn(a, b)


def default_ids(
    labels, ref_labels=None, ids=None, ref_ids=None, ref_valid=None
):
    """The explicit ``(ref_labels, ids, ref_ids, ref_valid)`` that
    :func:`pair_masks` assumes when they are None (``ref_valid``: all True)."""
    labels = tf.cast(labels, tf.int32)
    if ids is None:
        ids = tf.range(tf.shape(labels)[0], dtype=tf.int32)
    ids = tf.cast(ids, tf.int32)
    if ref_labels is None:
        ref_labels = labels
        if ref_ids is None:
            ref_ids = ids
    ref_labels = tf.cast(ref_labels, tf.int32)
    m = tf.shape(ref_labels)[0]
    if ref_ids is None:
        ref_ids = -1 - tf.range(m, dtype=tf.int32)
    ref_ids = tf.cast(ref_ids, tf.int32)
    if ref_valid is None:
        ref_valid = tf.ones([m], tf.bool)
    return ref_labels, ids, ref_ids, tf.cast(ref_valid, tf.bool)
