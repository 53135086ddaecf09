"""Brute-force routing (Routing Transformer, Roy et al. 2021): the centroid scores of every token and
each centroid's window of its ``w`` best tokens, with plain loops in float64.
"""

from __future__ import annotations

import torch


def brute_routing_scores(x, mu, hq):
    """Brute-force ``LN(x) · mu`` per query head: ``x [B, Hx, N, D]``, centroids ``mu [Hq, C, D]`` ->
    ``[B, Hq, N, C]`` (float64)."""
    b, hx, n, d = x.shape
    out = torch.zeros(b, hq, n, mu.shape[1], dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            for t in range(n):
                xt = x[bi, h // (hq // hx), t].double()
                xt = (xt - xt.mean()) / torch.sqrt(xt.var(unbiased=False) + 1e-5)
                out[bi, h, t] = mu[h].double() @ xt
    return out


def brute_routing_windows(scores, w):
    """Per (batch, head, centroid): the ``w`` positions of largest score, as sorted lists."""
    b, h, n, c = scores.shape
    return [
        [
            [sorted(sorted(range(n), key=lambda t: -scores[bi, hi, t, ci].item())[:w]) for ci in range(c)]
            for hi in range(h)
        ]
        for bi in range(b)
    ]


def brute_routing_causal_safe(scores, w):
    """Causal-safe routing windows as a token mask ``[B, H, N, N]``: each token joins its best centroid
    (``scores [B, H, N, C]``); within a cluster tokens are chunked in order into windows of ``w`` and a
    token sees the members of its own window up to itself."""
    b, h, n, _ = scores.shape
    want = torch.zeros(b, h, n, n, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            cl = scores[bi, hi].argmax(-1).tolist()
            rank = [sum(cl[s] == cl[t] for s in range(t)) for t in range(n)]
            for t in range(n):
                for s in range(t + 1):
                    want[bi, hi, t, s] = cl[s] == cl[t] and rank[s] // w == rank[t] // w
    return want
