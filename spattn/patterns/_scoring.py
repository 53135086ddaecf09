"""Scoring helpers shared by the content-based prefill selectors (MInference, XAttention,
FlexPrefill, block top-k): grouped-query key expansion, mean pooling over blocks, budgeted ranking,
and the last queries' causal attention with its diagonal sums.

Estimation runs in fp32 (fp64 stays fp64) and never builds an ``Nq x Nk`` tensor.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .._heads import expand_kv  # noqa: F401  (re-exported for the prefill selectors)
from ..layout import ceil_div

__all__ = ["expand_kv", "pool_mean", "rank_select", "last_query_probs", "diagonal_sums"]


def pool_mean(x: Tensor, block: int) -> Tensor:
    """Mean over consecutive blocks of ``block`` tokens (the last block averages its real tokens).

    ``x [B, H, N, D]`` -> ``[B, H, ceil(N/block), D]``.
    """
    n = x.shape[2]
    nb = ceil_div(n, block)
    padded = torch.nn.functional.pad(x, (0, 0, 0, nb * block - n))
    sums = padded.view(*x.shape[:2], nb, block, x.shape[3]).sum(3)
    counts = (n - torch.arange(nb, device=x.device) * block).clamp(max=block).to(sums.dtype)
    return sums / counts[:, None]


def rank_select(scores: Tensor, count: Tensor) -> Tensor:
    """bool mask of the ``count`` highest ``scores`` along the last dim (ties: lower index first).

    ``scores [..., M]``; ``count`` broadcastable to ``scores.shape[:-1]`` (per-head budgets).
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank = torch.arange(scores.shape[-1], device=scores.device)
    take = (rank < torch.as_tensor(count, device=scores.device)[..., None]).expand(scores.shape)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, take)


def last_query_probs(q: Tensor, k: Tensor, last: int, scale: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """Causal softmax attention of the last ``last`` queries over all keys, fp32.

    Returns ``(P [B, Hq, L, Nk], pos [L])`` with ``L = min(last, Nq)`` and ``pos`` the rows'
    aligned key positions.
    """
    _, hq, nq, dim = q.shape
    nk = k.shape[2]
    rows = min(last, nq)
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    q_last = q[:, :, nq - rows :].float()
    logits = torch.matmul(q_last * scale, expand_kv(k, hq).float().transpose(-1, -2))
    pos = torch.arange(nk - rows, nk, device=q.device)
    logits.masked_fill_(torch.arange(nk, device=q.device)[None, :] > pos[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if nk - rows < 0:  # more queries than keys: the first rows see no key at all
        probs = torch.nan_to_num_(probs, nan=0.0)
    return probs, pos


def diagonal_sums(probs: Tensor, pos: Tensor) -> Tensor:
    """``out[..., d] = sum_r probs[..., r, pos[r] - d]`` for ``d`` in ``[0, Nk)`` (``[B, H, Nk]``).

    ``pos [L]`` shared by the batch, or ``[B, L]`` per sequence."""
    rows, nk = probs.shape[-2:]
    d = pos[..., :, None] - torch.arange(nk, device=probs.device)  # [(B,) L, Nk]
    d = torch.where(d >= 0, d, nk)  # future keys go to a spill bin (their probability is 0)
    out = torch.zeros(*probs.shape[:-2], nk + 1, dtype=probs.dtype, device=probs.device)
    flat = probs.reshape(*probs.shape[:-2], rows * nk)
    index = d.reshape(-1) if pos.dim() == 1 else d.reshape(d.shape[0], 1, -1)
    out.scatter_add_(-1, index.expand_as(flat), flat)
    return out[..., :nk]
