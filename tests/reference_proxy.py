"""NumPy float64 references for the proxy / classification losses, written
from the papers' equations (never imports tfdml). Loops over anchors and
classes; ``proxies`` are the raw ``[C * K, d]`` weights (normalised here).
"""

import math

import numpy as np


def normalize(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _cos(emb, proxies):
    return normalize(emb) @ normalize(proxies).T


def _ce(logits, y):
    """-log softmax(logits)[y] for one anchor."""
    m = np.max(logits)
    return -(logits[y] - m - np.log(np.sum(np.exp(logits - m))))


def proxy_anchor_terms(emb, labels, proxies, alpha=32.0, delta=0.1):
    """Kim et al. CVPR 2020, Eq. 4: per proxy ``p`` (pos_p, has_pos, neg_p)
    with pos_p = log(1 + sum_{x in X_p+} exp(-alpha (s(x,p) - delta))) and
    neg_p = log(1 + sum_{x in X_p-} exp(alpha (s(x,p) + delta)))."""
    s = _cos(emb, proxies)
    n_cls = s.shape[1]
    pos, has, neg = np.zeros(n_cls), np.zeros(n_cls, bool), np.zeros(n_cls)
    for p in range(n_cls):
        sp, sn = 0.0, 0.0
        for i, y in enumerate(labels):
            if y == p:
                has[p] = True
                sp += math.exp(-alpha * (s[i, p] - delta))
            else:
                sn += math.exp(alpha * (s[i, p] + delta))
        pos[p], neg[p] = math.log(1.0 + sp), math.log(1.0 + sn)
    return pos, has, neg


def proxy_anchor(emb, labels, proxies, alpha=32.0, delta=0.1):
    pos, has, neg = proxy_anchor_terms(emb, labels, proxies, alpha, delta)
    pos_term = pos[has].sum() / has.sum() if has.any() else 0.0
    return pos_term + neg.sum() / len(neg)


def proxy_nca(emb, labels, proxies, temperature=1.0, include_positive=False):
    """Movshovitz-Attias et al. 2017: -log(exp(-d(x,p_y)) / sum_{z != y}
    exp(-d(x,p_z))), d = |x_hat - p_hat|^2; ProxyNCA++ (Teh et al. 2020):
    distances / T and the sum over every class."""
    x, p = normalize(emb), normalize(proxies)
    out = np.zeros(len(labels))
    for i, y in enumerate(labels):
        d = np.array([np.sum((x[i] - p[c]) ** 2) for c in range(len(p))])
        logit = -d / temperature
        others = [c for c in range(len(p)) if include_positive or c != y]
        out[i] = -logit[y] + math.log(sum(math.exp(logit[c]) for c in others))
    return out


def normalized_softmax(emb, labels, proxies, temperature=0.05):
    """Zhai and Wu 2019: CE(cos(x, w_c) / T)."""
    s = _cos(emb, proxies)
    return np.array([_ce(s[i] / temperature, y) for i, y in enumerate(labels)])


def cosface(emb, labels, proxies, margin=0.35, scale=64.0):
    """Wang et al. 2018, Eq. 4: CE(s (cos_c - m [c = y]))."""
    s = _cos(emb, proxies)
    out = []
    for i, y in enumerate(labels):
        z = s[i].copy()
        z[y] -= margin
        out.append(_ce(scale * z, y))
    return np.array(out)


def _arcface_from_cos(s, labels, margin, scale):
    out = []
    for i, y in enumerate(labels):
        z = s[i].copy()
        theta = math.acos(min(1.0, max(-1.0, z[y])))
        if theta <= math.pi - margin:
            z[y] = math.cos(theta + margin)
        else:  # the authors' code beyond pi - m
            z[y] = z[y] - margin * math.sin(margin)
        out.append(_ce(scale * z, y))
    return np.array(out)


def arcface(emb, labels, proxies, margin=0.5, scale=64.0):
    """Deng et al. 2019, Eq. 3: CE(s cos(theta_c + m [c = y]))."""
    return _arcface_from_cos(_cos(emb, proxies), labels, margin, scale)


def sub_center_arcface(emb, labels, proxies, k=3, margin=0.5, scale=64.0):
    """Deng et al. 2020: class cosine = max over the K sub-centres (rows
    c*K .. c*K+K-1), then ArcFace."""
    s = _cos(emb, proxies)
    n_cls = s.shape[1] // k
    best = np.array(
        [
            [max(s[i, c * k + j] for j in range(k)) for c in range(n_cls)]
            for i in range(len(s))
        ]
    )
    return _arcface_from_cos(best, labels, margin, scale)


def soft_triple(
    emb, labels, proxies, k=10, la=20.0, gamma=0.1, margin=0.01, tau=0.2
):
    """Qian et al. 2019: S_c = sum_k softmax(s_k / gamma) s_k (Eq. 8);
    -log(e^{la (S_y - delta)} / (e^{la (S_y - delta)} + sum_{c != y}
    e^{la S_c})) (Eq. 10); + tau sum_c sum_{t<s} sqrt(2 + 1e-5 - 2 w_t.w_s)
    / (C K (K - 1)) (Eq. 12, with the authors' 1e-5)."""
    s = _cos(emb, proxies)
    w = normalize(proxies)
    n_cls = s.shape[1] // k
    reg = 0.0
    if k > 1:
        for c in range(n_cls):
            for t in range(k):
                for u in range(t + 1, k):
                    dot = float(w[c * k + t] @ w[c * k + u])
                    reg += math.sqrt(2.0 + 1e-5 - 2.0 * dot)
        reg /= n_cls * k * (k - 1)
    out = []
    for i, y in enumerate(labels):
        big = np.zeros(n_cls)
        for c in range(n_cls):
            sk = s[i, c * k : (c + 1) * k]
            e = np.exp((sk - sk.max()) / gamma)
            big[c] = np.sum(e / e.sum() * sk)
        z = la * big
        z[y] -= la * margin
        out.append(_ce(z, y) + tau * reg)
    return np.array(out)
