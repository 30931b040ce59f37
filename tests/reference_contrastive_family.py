"""NumPy float64 references for SupCon and NT-Xent, written from the papers.

Never imports tfdml. Labels are int class ids ``[B]`` or multi-hot ``[B, C]``
(relevant iff the label sets intersect). Loops over anchors and pairs and
applies the equations literally:

* SupCon (Khosla et al., NeurIPS 2020, Eq. 2, L_out):
  ``L_i = -1/|P_i| Σ_p log(exp(z_ip) / Σ_{a ∈ A_i} exp(z_ia))``,
  ``A_i = P_i ∪ N_i``, ``z = S / τ``.
* NT-Xent (Chen et al., ICML 2020, Eq. 1, same-label positives as
  pytorch-metric-learning reads it):
  ``l_ip = -log(exp(z_ip) / (exp(z_ip) + Σ_{n ∈ N_i} exp(z_in)))``,
  ``L_i = 1/|P_i| Σ_p l_ip``.

``pair_weights`` multiply each reference's exp term in the denominators and
each positive's term; ``|P_i|`` counts positives with a non-zero weight.
With ``exclude=True`` every value is scaled by ``B / #(anchors with a
positive)``.
"""

import math

import numpy as np

from tests.reference import normalize
from tests.reference import pos_neg_lists


def _loss(
    kind,
    emb,
    labels,
    ref=None,
    ref_labels=None,
    ids=None,
    ref_ids=None,
    ref_valid=None,
    pair_weights=None,
    temperature=0.1,
    exclude=True,
):
    a = normalize(emb)
    b = a if ref is None else normalize(ref)
    sim = a @ b.T
    n = len(a)
    w = (
        np.ones(sim.shape)
        if pair_weights is None
        else np.asarray(pair_weights, np.float64)
    )
    out = np.zeros(n)
    has_pos = np.zeros(n, bool)
    lists = pos_neg_lists(labels, ref_labels, ids, ref_ids, ref_valid)
    for i, (pos, neg) in enumerate(lists):
        pos = [p for p in pos if w[i, p] != 0]
        neg = [k for k in neg if w[i, k] != 0]
        if not pos:
            continue
        has_pos[i] = True
        z = sim[i] / temperature
        total = 0.0
        for p in pos:
            if kind == "supcon":
                denom = sum(w[i, k] * math.exp(z[k]) for k in pos + neg)
                term = -math.log(math.exp(z[p]) / denom)
            else:
                denom = math.exp(z[p]) + sum(
                    w[i, k] * math.exp(z[k]) for k in neg
                )
                term = -math.log(math.exp(z[p]) / denom)
            total += w[i, p] * term
        out[i] = total / len(pos)
    if exclude and has_pos.any():
        out = out * n / has_pos.sum()
    return out


def supcon(emb, labels, ref=None, ref_labels=None, **kwargs):
    kwargs.setdefault("temperature", 0.1)
    return _loss("supcon", emb, labels, ref, ref_labels, **kwargs)


def nt_xent(emb, labels, ref=None, ref_labels=None, **kwargs):
    kwargs.setdefault("temperature", 0.5)
    return _loss("nt_xent", emb, labels, ref, ref_labels, **kwargs)
