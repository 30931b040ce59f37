"""NumPy float64 brute-force references, written from the papers' equations.

Never imports tfdml. Each function loops over anchors and applies the formula
literally. Helpers list each anchor's positive and negative references,
excluding the anchor itself *by example id*.
"""

import numpy as np


def normalize(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cosine(emb, ref=None):
    a = normalize(emb)
    b = a if ref is None else normalize(ref)
    return a @ b.T


def euclidean(emb, ref=None, squared=False):
    a = np.asarray(emb, np.float64)
    b = a if ref is None else np.asarray(ref, np.float64)
    d2 = np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1), 0.0)
    return d2 if squared else np.sqrt(d2)


def default_ids(n_anchor, n_ref, ids=None, ref_ids=None, same_set=True):
    if ids is None:
        ids = np.arange(n_anchor)
    if ref_ids is None:
        ref_ids = ids if same_set else -1 - np.arange(n_ref)
    return np.asarray(ids), np.asarray(ref_ids)


def relevant(a, b):
    """Same class (int labels) or intersecting label sets (multi-hot)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim == 0:
        return bool(a == b)
    return bool(np.any((a != 0) & (b != 0)))


def pos_neg_lists(
    labels, ref_labels=None, ids=None, ref_ids=None, ref_valid=None
):
    """For each anchor i: (list of positive ref indices, list of negatives);
    a reference with the anchor's id (itself) is in neither.

    Labels are int class ids ``[B]`` or multi-hot ``[B, C]`` (see
    :func:`relevant`)."""
    labels = np.asarray(labels)
    same_set = ref_labels is None
    ref_labels = labels if same_set else np.asarray(ref_labels)
    ids, ref_ids = default_ids(
        len(labels), len(ref_labels), ids, ref_ids, same_set
    )
    out = []
    for i in range(len(labels)):
        pos, neg = [], []
        for j in range(len(ref_labels)):
            if ref_valid is not None and not ref_valid[j]:
                continue
            if ref_ids[j] == ids[i]:
                continue  # itself (also a label-less multi-hot row)
            if relevant(labels[i], ref_labels[j]):
                pos.append(j)
            else:
                neg.append(j)
        out.append((pos, neg))
    return out


# --- Multi-similarity (msight code form) -----------------------------------


def ms_mine(sim_row, pos, neg, epsilon):
    """MS relative mining for one anchor; returns (pos, neg) index lists."""
    pos = [j for j in pos if sim_row[j] < 1 - 1e-5]
    if not pos or not neg:
        return [], []
    min_pos = min(sim_row[j] for j in pos)
    max_neg = max(sim_row[j] for j in neg)
    neg_k = [k for k in neg if sim_row[k] > min_pos - epsilon]
    pos_k = [j for j in pos if sim_row[j] < max_neg + epsilon]
    return pos_k, neg_k


def multi_similarity(
    emb,
    labels,
    ref=None,
    ref_labels=None,
    ids=None,
    ref_ids=None,
    alpha=2.0,
    beta=40.0,
    base=0.5,
    epsilon=0.1,
    coefficient=1.0,
    mine=True,
):
    """Per-anchor MS loss (msight per-anchor loop)."""
    sim = cosine(emb, ref)
    lists = pos_neg_lists(labels, ref_labels, ids, ref_ids)
    out = np.zeros(len(labels))
    for i, (pos, neg) in enumerate(lists):
        if mine:
            pos, neg = ms_mine(sim[i], pos, neg, epsilon)
        else:
            pos = [j for j in pos if sim[i, j] < 1 - 1e-5]
        if not pos or not neg:
            continue
        p = sum(np.exp(-alpha * (sim[i, j] - base)) for j in pos)
        n = sum(np.exp(beta * (sim[i, k] - base)) for k in neg)
        out[i] = coefficient * (np.log1p(p) / alpha + np.log1p(n) / beta)
    return out


# --- Pair losses (H1): contrastive, triplet, lifted, N-pair -----------------


# tfdml.ops.UNIT_DISTANCE_SQ_FLOOR: squared unit distances at or below it
# are float32 rounding noise and count as exactly 0 (duplicates).
UNIT_DISTANCE_SQ_FLOOR = 1e-6


def unit_distance_from_sim(sim):
    """sqrt(2 - 2 S), 0 at or below the float32 noise floor."""
    sq = 2.0 - 2.0 * np.asarray(sim, np.float64)
    return np.sqrt(np.where(sq > UNIT_DISTANCE_SQ_FLOOR, sq, 0.0))


def unit_distance(emb, ref=None):
    """Euclidean distance of L2-normalised embeddings (sqrt(2 - 2 S))."""
    return unit_distance_from_sim(cosine(emb, ref))


def _reduce_anchor(values_per_anchor, mode):
    """values_per_anchor: list (per anchor) of lists of pair losses."""
    n = len(values_per_anchor)
    out = np.zeros(n)
    if mode == "pml":
        nonzero = sum(
            sum(1 for v in vals if v > 0) for vals in values_per_anchor
        )
        if nonzero == 0:
            return out
        return np.array([n * sum(vals) / nonzero for vals in values_per_anchor])
    for i, vals in enumerate(values_per_anchor):
        if not vals:
            continue
        if mode == "sum":
            out[i] = sum(vals)
        elif mode == "mean":
            out[i] = sum(vals) / len(vals)
        else:  # avg_nonzero
            nz = [v for v in vals if v > 0]
            out[i] = sum(nz) / len(nz) if nz else 0.0
    return out


def contrastive(
    emb,
    labels,
    ref=None,
    ref_labels=None,
    ids=None,
    ref_ids=None,
    ref_valid=None,
    pos_margin=0.0,
    neg_margin=1.0,
    form="distance",
    power=1.0,
    pair_reduction="avg_nonzero",
):
    """Per-anchor contrastive loss; positives and negatives reduced apart."""
    sim = cosine(emb, ref)
    dist = unit_distance(emb, ref)
    lists = pos_neg_lists(labels, ref_labels, ids, ref_ids, ref_valid)
    pos_vals, neg_vals = [], []
    for i, (pos, neg) in enumerate(lists):
        if form == "distance":
            pv = [max(0.0, dist[i, j] - pos_margin) ** power for j in pos]
            nv = [max(0.0, neg_margin - dist[i, k]) ** power for k in neg]
        else:
            pv = [max(0.0, pos_margin - sim[i, j]) ** power for j in pos]
            nv = [max(0.0, sim[i, k] - neg_margin) ** power for k in neg]
        pos_vals.append(pv)
        neg_vals.append(nv)
    return _reduce_anchor(pos_vals, pair_reduction) + _reduce_anchor(
        neg_vals, pair_reduction
    )


def triplet_margin(
    emb,
    labels,
    ref=None,
    ref_labels=None,
    ids=None,
    ref_ids=None,
    ref_valid=None,
    margin=0.05,
    mining="all",
    distance="euclidean",
    pair_reduction="avg_nonzero",
):
    """Per-anchor triplet margin loss with all / semi-hard / hard triplets."""
    if distance == "euclidean":
        d = unit_distance(emb, ref)
    else:
        d = 1.0 - cosine(emb, ref)
    lists = pos_neg_lists(labels, ref_labels, ids, ref_ids, ref_valid)
    vals = []
    for i, (pos, neg) in enumerate(lists):
        v = []
        if pos and neg:
            if mining == "all":
                v = [
                    max(0.0, d[i, j] - d[i, k] + margin)
                    for j in pos
                    for k in neg
                ]
            elif mining == "semi-hard":
                for j in pos:
                    farther = [d[i, k] for k in neg if d[i, k] > d[i, j]]
                    if farther:
                        v.append(max(0.0, d[i, j] - min(farther) + margin))
            else:
                hp = max(d[i, j] for j in pos)
                hn = min(d[i, k] for k in neg)
                v = [max(0.0, hp - hn + margin)]
        vals.append(v)
    return _reduce_anchor(vals, pair_reduction)


def _logsumexp(values):
    values = np.asarray(values, np.float64)
    m = values.max()
    return m + np.log(np.exp(values - m).sum())


def lifted_structure(
    emb,
    labels,
    ref=None,
    ref_labels=None,
    ids=None,
    ref_ids=None,
    ref_valid=None,
    neg_margin=1.0,
    pos_margin=0.0,
    form="song",
    dist=None,
):
    """Per-anchor lifted structure loss (Song Eq. 4 share, or generalised).

    ``dist`` overrides the distance matrix (default: unit Euclidean). For
    Song's form the negatives of reference j are the anchors l with another
    label (for the batch itself: j's own negatives).
    """
    labels = np.asarray(labels)
    r_labels = labels if ref_labels is None else np.asarray(ref_labels)
    if dist is None:
        dist = unit_distance(emb, ref)
    lists = pos_neg_lists(labels, ref_labels, ids, ref_ids, ref_valid)
    n = len(labels)
    out = np.zeros(n)
    if form == "generalized":
        for i, (pos, neg) in enumerate(lists):
            if pos and neg:
                a = _logsumexp([dist[i, j] - pos_margin for j in pos])
                b = _logsumexp([neg_margin - dist[i, k] for k in neg])
                out[i] = max(0.0, a + b)
        return out
    num_pos = sum(len(pos) for pos, _ in lists)
    if num_pos == 0:
        return out
    for i, (pos, neg) in enumerate(lists):
        total = 0.0
        for j in pos:
            terms = [neg_margin - dist[i, k] for k in neg]
            terms += [
                neg_margin - dist[m, j]
                for m in range(n)
                if labels[m] != r_labels[j]
            ]
            if not terms:
                continue  # log of an empty sum: hinge 0
            j_ij = _logsumexp(terms) + dist[i, j] - pos_margin
            total += 0.5 * max(0.0, j_ij) ** 2
        out[i] = n * total / num_pos
    return out


def npairs(
    emb,
    labels,
    ref=None,
    ref_labels=None,
    ids=None,
    ref_ids=None,
    ref_valid=None,
    normalize=True,
):
    """Per-anchor N-pair loss: first positive vs the first ref of each class."""
    a = np.asarray(emb, np.float64)
    b = a if ref is None else np.asarray(ref, np.float64)
    if normalize:
        a, b = normalize_rows(a), normalize_rows(b)
    sim = a @ b.T
    r_labels = np.asarray(labels if ref_labels is None else ref_labels)
    first = {}
    for j, c in enumerate(r_labels):
        if ref_valid is not None and not ref_valid[j]:
            continue
        first.setdefault(c, j)
    lists = pos_neg_lists(labels, ref_labels, ids, ref_ids, ref_valid)
    out = np.zeros(len(labels))
    for i, (pos, neg) in enumerate(lists):
        if not pos:
            continue
        p = min(pos)
        reps = [k for k in neg if first.get(r_labels[k]) == k]
        out[i] = np.log1p(sum(np.exp(sim[i, k] - sim[i, p]) for k in reps))
    return out


def normalize_rows(x):
    return normalize(x)


# --- tfa-compatible losses, from tfa's NumPy test formulas --------------------


def tfa_pdist(emb, ref=None, metric="L2"):
    """tfa 0.23 names: L2 Euclidean, squared-L2, angular (1 - cos)."""
    if metric == "squared-L2":
        return euclidean(emb, ref, squared=True)
    if metric == "L2":
        return euclidean(emb, ref)
    return 1.0 - cosine(emb, ref)


def tfa_triplet_semihard_scalar(labels, emb, margin=1.0, metric="L2"):
    """tfa tests' triplet_semihard_loss_np (a batch with negatives)."""
    labels = np.asarray(labels)
    pdist = tfa_pdist(emb, metric=metric)
    loss, num_pos = 0.0, 0.0
    n = len(labels)
    for i in range(n):
        for j in range(n):
            if labels[i] == labels[j] and i != j:
                num_pos += 1.0
                negs = sorted(
                    pdist[i, k] for k in range(n) if labels[k] != labels[i]
                )
                chosen = negs[0]
                for value in negs:
                    chosen = value
                    if chosen > pdist[i, j]:
                        break
                loss += max(0.0, margin - chosen + pdist[i, j])
    return loss / num_pos


def tfa_triplet_hard_scalar(labels, emb, margin=1.0, soft=False, metric="L2"):
    """tfa tests' triplet_hard_loss_np (a batch with negatives)."""
    labels = np.asarray(labels)
    pdist = tfa_pdist(emb, metric=metric)
    n = len(labels)
    loss = 0.0
    for i in range(n):
        pos = [
            pdist[i, j] for j in range(n) if labels[j] == labels[i] and j != i
        ]
        neg = [pdist[i, j] for j in range(n) if labels[j] != labels[i]]
        hp = max(pos) if pos else 0.0
        hn = min(neg)
        if soft:
            loss += np.log1p(np.exp(hp - hn))
        else:
            loss += max(0.0, hp - hn + margin)
    return loss / n


def tfa_lifted_struct_scalar(labels, emb, margin=1.0):
    """tfa tests' lifted_struct_loss_np (Euclidean, raw embeddings)."""
    labels = np.asarray(labels)
    pdist = euclidean(emb)
    n = len(labels)
    loss, count = 0.0, 0.0
    for i in range(n):
        for j in range(n):
            if labels[i] == labels[j] and i != j:
                negs = [
                    margin - pdist[i, k]
                    for k in range(n)
                    if labels[k] != labels[i]
                ]
                negs += [
                    margin - pdist[j, m]
                    for m in range(n)
                    if labels[m] != labels[j]
                ]
                count += 1.0
                this = max(_logsumexp(negs) + pdist[i, j], 0.0)
                loss += this * this
    return loss / count / 2.0


def tfa_triplet_semihard(
    emb,
    labels,
    ref=None,
    ref_labels=None,
    ids=None,
    ref_ids=None,
    ref_valid=None,
    margin=1.0,
    metric="L2",
):
    """Per-anchor share (B * sum / |P|) of tfa's semi-hard triplet loss."""
    pdist = tfa_pdist(emb, ref, metric)
    lists = pos_neg_lists(labels, ref_labels, ids, ref_ids, ref_valid)
    n = len(labels)
    sums = np.zeros(n)
    num_pos = 0
    for i, (pos, neg) in enumerate(lists):
        negs = sorted(pdist[i, k] for k in neg)
        for j in pos:
            num_pos += 1
            farther = [v for v in negs if v > pdist[i, j]]
            chosen = farther[0] if farther else (negs[-1] if negs else 0.0)
            sums[i] += max(0.0, margin - chosen + pdist[i, j])
    return sums * n / num_pos if num_pos else sums


def tfa_triplet_hard(
    emb,
    labels,
    ref=None,
    ref_labels=None,
    ids=None,
    ref_ids=None,
    ref_valid=None,
    margin=1.0,
    soft=False,
    metric="L2",
):
    """Per-anchor tfa batch-hard loss (no negatives: d_an = d_ap)."""
    pdist = tfa_pdist(emb, ref, metric)
    lists = pos_neg_lists(labels, ref_labels, ids, ref_ids, ref_valid)
    out = np.zeros(len(labels))
    for i, (pos, neg) in enumerate(lists):
        hp = max(pdist[i, j] for j in pos) if pos else 0.0
        hn = min(pdist[i, k] for k in neg) if neg else hp
        out[i] = (
            np.log1p(np.exp(hp - hn)) if soft else max(0.0, hp - hn + margin)
        )
    return out


def tfa_npairs_rows(labels, sim):
    """Per-row softmax cross-entropy of tfa's npairs_loss."""
    labels = np.asarray(labels)
    sim = np.asarray(sim, np.float64)
    out = np.zeros(len(labels))
    for i in range(len(labels)):
        target = (labels == labels[i]).astype(np.float64)
        target /= target.sum()
        log_p = sim[i] - _logsumexp(sim[i])
        out[i] = -(target * log_p).sum()
    return out


def tfa_contrastive(y_true, dist, margin=1.0):
    y = np.asarray(y_true, np.float64)
    d = np.asarray(dist, np.float64)
    return y * d**2 + (1 - y) * np.maximum(margin - d, 0.0) ** 2


# --- Miners: sets of (anchor, reference) pairs


def mine_threshold(
    sim, lists, pos_threshold=None, neg_threshold=None, form="similarity"
):
    pos_set, neg_set = set(), set()
    d = unit_distance_from_sim(sim)
    for i, (pos, neg) in enumerate(lists):
        for j in pos:
            if pos_threshold is None or (
                sim[i, j] < pos_threshold
                if form == "similarity"
                else d[i, j] > pos_threshold
            ):
                pos_set.add((i, j))
        for k in neg:
            if neg_threshold is None or (
                sim[i, k] > neg_threshold
                if form == "similarity"
                else d[i, k] < neg_threshold
            ):
                neg_set.add((i, k))
    return pos_set, neg_set


def mine_semi_hard(sim, lists, margin=0.2, form="distance"):
    """Brute force over triplets: pairs in at least one semi-hard triplet."""
    d = unit_distance_from_sim(sim) if form == "distance" else -sim
    pos_set, neg_set = set(), set()
    for i, (pos, neg) in enumerate(lists):
        for j in pos:
            for k in neg:
                if d[i, j] < d[i, k] < d[i, j] + margin:
                    pos_set.add((i, j))
                    neg_set.add((i, k))
    return pos_set, neg_set


def mine_hardest(sim, lists):
    """Least similar positive, most similar negative; ties -> lowest index."""
    pos_set, neg_set = set(), set()
    for i, (pos, neg) in enumerate(lists):
        if pos:
            low = min(sim[i, j] for j in pos)
            pos_set.add((i, min(j for j in pos if sim[i, j] == low)))
        if neg:
            high = max(sim[i, k] for k in neg)
            neg_set.add((i, min(k for k in neg if sim[i, k] == high)))
    return pos_set, neg_set
