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


def pos_neg_lists(
    labels, ref_labels=None, ids=None, ref_ids=None, ref_valid=None
):
    """For each anchor i: (list of positive ref indices, list of negatives)."""
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
            if ref_labels[j] == labels[i]:
                if ref_ids[j] != ids[i]:
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
