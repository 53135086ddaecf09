"""Brute-force pairs of the position-only patterns of :mod:`spattn.patterns` (``static``, ``neighborhood``).

Each function returns the bool mask ``[Nq, Nk]`` (BigBird: ``[H, Nq, Nk]``) written directly from the
paper's definition with NumPy broadcasting or plain loops over all ``(i, j)``, independent of the
patterns' block arithmetic. Query ``i`` sits at key position ``i' = i + Nk - Nq``.
"""

from __future__ import annotations

import numpy as np

from ._grid import positions


def brute_dense(nq, nk, causal):
    """Every pair (causal: ``j <= i'``)."""
    p, j = positions(nq, nk)
    return (j <= p) if causal else np.ones((nq, nk), bool)


def brute_window(nq, nk, size, causal):
    """Sliding window (Longformer, Beltagy et al. 2020): ``|i' - j| <= size`` (causal: ``0 <= i' - j <= size``)."""
    p, j = positions(nq, nk)
    return ((p - j >= 0) & (p - j <= size)) if causal else (np.abs(p - j) <= size)


def brute_dilated_window(nq, nk, size, dilation, causal):
    """Dilated window (Longformer): keys ``j = i' + t * dilation`` for ``-size <= t <= size`` (causal: ``t <= 0``)."""
    p, j = positions(nq, nk)
    ts = np.arange(-size, 1 if causal else size + 1)
    return (j[None] == p[None] + ts[:, None, None] * dilation).any(0)


def brute_global_tokens(nq, nk, count, causal):
    """Global tokens (Longformer / ETC): the first ``count`` positions see and are seen by all."""
    p, j = positions(nq, nk)
    expected = (p < count) | (j < count)
    if causal:
        expected = expected & (j <= p)
    return expected


def brute_strided(nq, nk, stride, causal):
    """Sparse Transformer strided (Child et al. 2019): ``|i' - j| < stride`` or ``(i' - j) % stride == 0``."""
    p, j = positions(nq, nk)
    d = p - j
    if causal:
        return ((d >= 0) & (d < stride)) | ((d >= 0) & (d % stride == 0))
    return (np.abs(d) < stride) | (d % stride == 0)


def brute_fixed(nq, nk, block, summary, causal):
    """Sparse Transformer fixed (Child et al. 2019): the same block of length ``l``, or a key among the
    last ``summary`` of its block."""
    p, j = positions(nq, nk)
    expected = (j // block == p // block) | np.isin(j % block, np.arange(block - summary, block))
    if causal:
        expected = expected & (j <= p)
    return expected


def brute_axial(nq, nk, cols, causal):
    """Axial attention (Ho et al. 2019) on a row-major grid of width ``cols``: same row or same column."""
    p, j = positions(nq, nk)
    prow, pcol = p // cols, p % cols
    jrow, jcol = j // cols, j % cols
    expected = (prow == jrow) | (pcol == jcol)
    if causal:
        expected = expected & (j <= p)
    return expected


def brute_a_shape(nq, nk, sinks, local, causal):
    """A-shape / StreamingLLM (Xiao et al. 2023; MInference, Jiang et al. 2024): the first ``sinks`` keys and the last ``local`` positions."""
    p, j = positions(nq, nk)
    if causal:
        return (j <= p) & ((j < sinks) | (p - j < local))
    return (j < sinks) | (np.abs(p - j) < local)


def brute_bigbird(nq, nk, block, window, globals_, rnd, causal):
    """BigBird (Zaheer et al. 2020). Brute force over (h, i, j) from the definition, given the drawn
    random blocks ``rnd [H, NQB, r]`` (-1 = unused): ``[H, Nq, Nk]``."""
    heads = rnd.shape[0]
    off = nk - nq
    out = np.zeros((heads, nq, nk), bool)
    for qb in range(-(-nq // block)):
        last = min(qb * block + block - 1, nq - 1)
        a = (last + off) // block  # key block of the tile's last query
        for h in range(heads):
            chosen = set(int(x) for x in rnd[h, qb] if x >= 0)
            for i in range(qb * block, last + 1):
                for j in range(nk):
                    kb = j // block
                    ok = abs(a - kb) <= window // 2 or kb < globals_ or a < globals_ or kb in chosen
                    if causal:
                        ok = ok and j <= i + off
                    out[h, i, j] = ok
    return out


def axis_neighbours(x: int, n: int, k: int, d: int, causal: bool) -> set[int]:
    """Neighbourhood attention (Hassani et al. 2023, dilated: DiNAT 2022) along one axis of length ``n``:
    the ``k`` members of ``x``'s dilation group nearest to it."""
    group = list(range(x % d, n, d))  # positions of x's dilation group, in order
    at = group.index(x)
    if causal:
        picks = [t for t in range(at - k + 1, at + 1) if t >= 0]
    else:
        # the k consecutive group members "centred" on x (k//2 before, the rest after), slid
        # back inside the group at the borders
        start = at - k // 2
        start = max(0, min(start, len(group) - k))
        picks = list(range(start, start + k))
    return {group[t] for t in picks}


def nat_1d(nq, nk, k, d, causal):
    """1-D neighbourhood attention with kernel ``k`` and dilation ``d``: ``[Nq, Nk]``."""
    out = np.zeros((nq, nk), bool)
    for i in range(nq):
        for j in axis_neighbours(i + nk - nq, nk, k, d, causal):
            out[i, j] = True
    return out


def nat_2d(nq, H, W, k, d, causal):
    """2-D neighbourhood attention on an ``H x W`` row-major grid, kernel ``k = (kr, kc)``, dilation
    ``d = (dr, dc)``: the product of the two axes' neighbourhoods, ``[Nq, H * W]``."""
    (kr, kc), (dr, dc) = k, d
    nk = H * W
    out = np.zeros((nq, nk), bool)
    for i in range(nq):
        r, c = divmod(i + nk - nq, W)
        for rr in axis_neighbours(r, H, kr, dr, causal):
            for cc in axis_neighbours(c, W, kc, dc, causal):
                out[i, rr * W + cc] = True
    return out
