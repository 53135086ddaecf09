"""Position and block-grid helpers shared by the brute-force references (plain loops and NumPy).

Query ``i`` of ``Nq`` sits at key position ``i' = i + Nk - Nq`` (aligned to the end of the keys).
"""

from __future__ import annotations

import math

import numpy as np


def visible(i: int, j: int, nq: int, nk: int, causal: bool) -> bool:
    """Whether query ``i`` may see key ``j`` (causal: ``j <= i + Nk - Nq``)."""
    return not causal or j <= i + nk - nq


def positions(nq: int, nk: int):
    """``(i', j)`` as broadcastable NumPy columns ``[Nq, 1]`` and rows ``[1, Nk]``."""
    i = np.arange(nq)[:, None]
    j = np.arange(nk)[None, :]
    return i + (nk - nq), j


def np_heads(q, k):
    """float64 numpy q [B,Hq,Nq,D] and k expanded to the query heads."""
    group = q.shape[1] // k.shape[1]
    return q.double().numpy(), k.double().repeat_interleave(group, 1).numpy()


def causal_dense(nq, nk):
    """bool ``[Nq, Nk]``: key ``j`` at or before the query's position."""
    i = np.arange(nq)[:, None] + nk - nq
    return np.arange(nk)[None, :] <= i


def expand_blocks(block_map, nq, nk, block, causal):
    """[..., NQB, NKB] -> token mask [..., Nq, Nk] (causal inside tiles)."""
    m = np.repeat(np.repeat(block_map, block, -2), block, -1)[..., :nq, :nk]
    return m & causal_dense(nq, nk) if causal else m


def block_geometry(nq, nk, block):
    """Per query block its first / last key position ``p0, p1``; per key block its first / last key."""
    off = nk - nq
    nqb, nkb = -(-nq // block), -(-nk // block)
    p0 = [qb * block + off for qb in range(nqb)]
    p1 = [min(qb * block + block - 1, nq - 1) + off for qb in range(nqb)]
    k0 = [kb * block for kb in range(nkb)]
    k1 = [min(kb * block + block - 1, nk - 1) for kb in range(nkb)]
    return p0, p1, k0, k1


def pick(scores, count, forced):
    """indices of the top ``count`` with the ``forced`` ones first (nearest/first first), ties -> lower index."""
    order = list(range(forced)) + sorted(range(forced, len(scores)), key=lambda x: (-scores[x], x))
    return set(order[: min(count, len(scores))])


def full_probs(q, k, causal=True):
    """Full softmax attention probabilities in float64 NumPy: ``[B, Hq, Nq, Nk]``."""
    qn, kn = np_heads(q, k)
    nq, nk = qn.shape[2], kn.shape[2]
    logits = qn @ kn.transpose(0, 1, 3, 2) / math.sqrt(qn.shape[3])
    if causal:
        logits = np.where(causal_dense(nq, nk), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)
