"""NumPy float64 references for MS (weighted), binomial, circle, the GPW
weightings and OSM + CAA, written from the equations. Never imports tfdml."""

import math

import numpy as np

from tests.reference import cosine
from tests.reference import ms_mine
from tests.reference import pos_neg_lists


def sp(x):
    """softplus in float64."""
    return np.logaddexp(0.0, x)


# --- MS with external pair weights ------------------------------------------


def multi_similarity_weighted(
    emb,
    labels,
    pair_weights,
    alpha=2.0,
    beta=40.0,
    base=0.5,
    epsilon=0.1,
    coefficient=1.0,
    on_similarity=False,
    mine=True,
):
    """MS with weights on the terms (log(1 + Σ w e^x)) or, with
    ``on_similarity``, MMSI's W-form (S -> w S inside the exponent)."""
    sim = cosine(emb)
    w = np.asarray(pair_weights, np.float64)
    out = np.zeros(len(labels))
    for i, (pos, neg) in enumerate(pos_neg_lists(labels)):
        if mine:
            pos, neg = ms_mine(sim[i], pos, neg, epsilon)
        else:
            pos = [j for j in pos if sim[i, j] < 1 - 1e-5]
        if not on_similarity:
            pos = [j for j in pos if w[i, j] > 0]
            neg = [k for k in neg if w[i, k] > 0]
        if not pos or not neg:
            continue
        if on_similarity:
            p = sum(np.exp(-alpha * (w[i, j] * sim[i, j] - base)) for j in pos)
            n = sum(np.exp(beta * (w[i, k] * sim[i, k] - base)) for k in neg)
        else:
            p = sum(w[i, j] * np.exp(-alpha * (sim[i, j] - base)) for j in pos)
            n = sum(w[i, k] * np.exp(beta * (sim[i, k] - base)) for k in neg)
        out[i] = coefficient * (np.log1p(p) / alpha + np.log1p(n) / beta)
    return out


def ms_weights(sim, lists, alpha=2.0, beta=40.0, base=0.5, coefficient=1.0):
    """w± of the MS loss (Wang et al., CVPR 2019; docs/losses.md,
    "Weightings"; sums include k = j) on given (pos, neg) lists."""
    wp = np.zeros_like(sim)
    wn = np.zeros_like(sim)
    for i, (pos, neg) in enumerate(lists):
        if not pos or not neg:
            continue
        for j in pos:
            den = np.exp(-alpha * (base - sim[i, j])) + sum(
                np.exp(-alpha * (sim[i, k] - sim[i, j])) for k in pos
            )
            wp[i, j] = coefficient / den
        for j in neg:
            den = np.exp(beta * (base - sim[i, j])) + sum(
                np.exp(beta * (sim[i, k] - sim[i, j])) for k in neg
            )
            wn[i, j] = coefficient / den
    return wp, wn


# --- binomial deviance and circle ---------------------------------------------


def binomial_deviance(
    emb,
    labels,
    ref=None,
    ref_labels=None,
    alpha=2.0,
    beta=0.5,
    cost=25.0,
    reduction="mean",
):
    sim = cosine(emb, ref)
    out = np.zeros(len(labels))
    for i, (pos, neg) in enumerate(pos_neg_lists(labels, ref_labels)):
        lp = [sp(-alpha * (sim[i, j] - beta)) for j in pos]
        ln = [sp(alpha * cost * (sim[i, k] - beta)) for k in neg]
        agg = np.mean if reduction == "mean" else np.sum
        out[i] = (agg(lp) if lp else 0.0) + (agg(ln) if ln else 0.0)
    return out


def binomial_weights(sim, lists, alpha=2.0, beta=0.5, cost=25.0, mean=True):
    wp = np.zeros_like(sim)
    wn = np.zeros_like(sim)
    for i, (pos, neg) in enumerate(lists):
        for j in pos:
            s = 1 / (1 + np.exp(alpha * (sim[i, j] - beta)))
            wp[i, j] = alpha * s / (len(pos) if mean else 1)
        for k in neg:
            s = 1 / (1 + np.exp(-alpha * cost * (sim[i, k] - beta)))
            wn[i, k] = alpha * cost * s / (len(neg) if mean else 1)
    return wp, wn


def circle(emb, labels, ref=None, ref_labels=None, m=0.25, gamma=256.0):
    sim = cosine(emb, ref)
    out = np.zeros(len(labels))
    for i, (pos, neg) in enumerate(pos_neg_lists(labels, ref_labels)):
        if not pos or not neg:
            continue
        lp = [
            -gamma * max(0, 1 + m - sim[i, j]) * (sim[i, j] - (1 - m))
            for j in pos
        ]
        ln = [gamma * max(0, sim[i, k] + m) * (sim[i, k] - m) for k in neg]
        z = np.logaddexp.reduce(lp) + np.logaddexp.reduce(ln)
        out[i] = sp(z)
    return out


# --- weightings in distance space --------------------------------------------


def lifted_weights(sim, lists, neg_margin=1.0, pos_margin=0.0):
    d = np.sqrt(np.maximum(2 - 2 * sim, 0))
    wp = np.zeros_like(sim)
    wn = np.zeros_like(sim)
    for i, (pos, neg) in enumerate(lists):
        if not pos or not neg:
            continue
        ep = np.array([np.exp(d[i, j] - pos_margin) for j in pos])
        en = np.array([np.exp(neg_margin - d[i, k]) for k in neg])
        if np.log(ep.sum()) + np.log(en.sum()) <= 0:
            continue
        wp[i, pos] = ep / ep.sum()
        wn[i, neg] = en / en.sum()
    return wp, wn


def gpw_value(sim, wp, wn, distance="cosine"):
    d = 1 - sim if distance == "cosine" else np.sqrt(np.maximum(2 - 2 * sim, 0))
    return (wp * d).sum(1) - (wn * d).sum(1)


def gaussian_pdf(x, mu, sigma):
    return np.exp(-((x - mu) ** 2) / (2 * sigma**2)) / (
        sigma * math.sqrt(2 * math.pi)
    )


# --- OSM + CAA ---


def weighted_contrastive(
    f,
    labels,
    probs=None,
    margin=1.2,
    sigma=0.8,
    lambda_=0.5,
    official_code=False,
    caa_sigma=0.68,
    use_caa=True,
):
    """Unordered pairs i < j, literally; f are the embeddings used as is.

    Returns (loss, pairs, w_hat) with w_hat the normalised weights of the
    code form (0.5 * w / Σ_polarity w) per pair.
    """
    f = np.asarray(f, np.float64)
    n = len(labels)
    a = (
        gaussian_pdf(np.asarray(probs, np.float64), 1.0, caa_sigma)
        if use_caa
        else np.ones(n)
    )
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    rows = []
    for i, j in pairs:
        d = np.linalg.norm(f[i] - f[j])
        y = labels[i] == labels[j]
        att = min(a[i], a[j])
        s = np.exp(-(d**2) / (2 * sigma**2)) if y else max(0.0, margin - d)
        rows.append((i, j, d, y, s * att))
    zp = max(sum(r[4] for r in rows if r[3]), 1e-12)
    zn = max(sum(r[4] for r in rows if not r[3]), 1e-12)
    pos = sum(r[4] * r[2] ** 2 for r in rows if r[3]) / zp
    neg = sum(r[4] * max(0, margin - r[2]) ** 2 for r in rows if not r[3]) / zn
    loss = (1 - lambda_) * 0.5 * pos + lambda_ * 0.5 * neg
    if official_code:
        loss /= len(pairs)
    w_hat = [0.5 * r[4] / (zp if r[3] else zn) for r in rows]
    return loss, rows, w_hat


def weighted_contrastive_grad(f, labels, probs=None, margin=1.2, **kw):
    """Caffe backward: Σ_k ŵ_k / P · ∂(½[y d² + (1-y)(m-d)₊²])/∂f."""
    f = np.asarray(f, np.float64)
    _, rows, w_hat = weighted_contrastive(f, labels, probs, margin=margin, **kw)
    g = np.zeros_like(f)
    for (i, j, d, y, _), w in zip(rows, w_hat):
        diff = f[i] - f[j]
        if y:
            gi = diff
        elif d < margin and d > 0:
            gi = -(margin - d) * diff / d
        else:
            gi = 0 * diff
        g[i] += w / len(rows) * gi
        g[j] -= w / len(rows) * gi
    return g


def numeric_grad(fn, x, h=1e-6):
    """Central finite differences of a scalar float64 function."""
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        xp = x.copy()
        xm = x.copy()
        xp[idx] += h
        xm[idx] -= h
        g[idx] = (fn(xp) - fn(xm)) / (2 * h)
    return g
