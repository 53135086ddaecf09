"""FlexPrefill (Lai et al., ICLR 2025, arXiv 2502.20766): per-head choice between query-aware block
selection and a vertical-slash block pattern, both sized by a cumulative attention mass γ.

Follows the port in microsoft/MInference ``minference/modules/flexprefill.py`` (``get_active_blocks``)
with its two quirks fixed: token counts are turned into blocks with the pattern's ``block`` (the
port hard-codes 128) and zero probabilities do not produce NaN in the divergence.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..layout import Layout
from ..registry import register
from .base import Pattern, check_float, check_int, check_qk
from .minference import (
    _validate_causal, block_layout, diagonal_sums, expand_kv, last_query_probs, pool_mean,
    query_block_bounds, rank_select,
)

__all__ = ["FlexPrefill", "sqrt_js_divergence", "flexprefill_estimate"]


def sqrt_js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """``sqrt(JSD(p, q))`` along the last dim (natural log; ``0 log 0 = 0``)."""
    m = (p + q) / 2
    kl = lambda a: (torch.xlogy(a, a) - torch.xlogy(a, m)).sum(-1)
    return torch.sqrt((0.5 * kl(p) + 0.5 * kl(q)).clamp(min=0))


def _cover_count(x: Tensor, mass: float) -> Tensor:
    """``score_cover_topk``: 1 + how many of the largest entries have cumulative sum <= ``mass``."""
    csum = torch.cumsum(torch.sort(x, dim=-1, descending=True).values, dim=-1)
    return (csum <= mass).sum(-1) + 1


def flexprefill_estimate(q: Tensor, k: Tensor, gamma: float, tau: float, block: int,
                         min_blocks: int, max_blocks: Optional[int]) -> dict[str, Tensor]:
    """Everything FlexPrefill decides, per (batch, query head).

    Returns a dict with ``vertical [B,H,Nk]`` (mean attention of the last block's queries per key),
    ``slash [B,H,Nk]`` (mean per diagonal offset), ``vertical_blocks``/``slash_blocks [B,H,NKB]``
    (their block sums), ``pooled [B,H,NKB]`` (softmax of the mean last query against mean-pooled
    keys), ``divergence [B,H]`` (sqrt JSD of ``pooled`` and ``vertical_blocks``), ``query_aware
    [B,H]`` (divergence < τ), ``n_vertical``/``n_slash [B,H]`` (block budgets) and ``blocks
    [B,H,NQB,NKB]`` (the selected tiles before causal clipping).
    """
    bsz, hq, nq, dim = q.shape
    nk = k.shape[2]
    probs, pos = last_query_probs(q, k, block)
    rows = probs.shape[-2]
    vertical = probs.mean(-2)
    slash = diagonal_sums(probs, pos) / rows
    nkb = -(-nk // block)
    n_v = _cover_count(vertical, gamma) // block + 1
    n_s = _cover_count(slash, gamma) // block + 1
    hi = nkb if max_blocks is None else min(max_blocks, nkb)
    lo = min(min_blocks, hi)
    n_v, n_s = n_v.clamp(lo, hi), n_s.clamp(lo, hi)
    pad = lambda x: torch.nn.functional.pad(x, (0, nkb * block - nk)).view(bsz, hq, nkb, block).sum(-1)
    v_blocks, s_blocks = pad(vertical), pad(slash)  # s_blocks[δ] sums offsets [δb, δb + b)

    scale = 1.0 / math.sqrt(dim)
    k_pool = pool_mean(expand_kv(k, hq).float(), block)  # [B,H,NKB,D]
    q_mean = q[:, :, nq - rows:].float().mean(2, keepdim=True) * scale
    pooled = torch.softmax(torch.matmul(q_mean, k_pool.transpose(-1, -2)).squeeze(2), dim=-1)
    divergence = sqrt_js_divergence(pooled, v_blocks)
    query_aware = divergence < tau
    n_v = torch.where(query_aware, lo, n_v)
    n_s = torch.where(query_aware, lo, n_s)

    # vertical-slash blocks: block 0 and the main block diagonal are forced (rank first)
    inf = torch.tensor(float("inf"), device=q.device)
    v_rank = v_blocks.clone()
    v_rank[..., 0] = inf
    s_rank = s_blocks.clone()
    s_rank[..., 0] = inf
    v_sel = rank_select(v_rank, n_v)  # [B,H,NKB] key blocks
    s_sel = rank_select(s_rank, n_s)  # [B,H,NKB] block offsets δ
    p0, p1, k0, k1 = query_block_bounds(nq, nk, block, q.device)
    nqb = p0.shape[0]
    delta = torch.div(p1, block, rounding_mode="floor") - torch.div(k0, block, rounding_mode="floor")  # [NQB,NKB]
    in_range = delta >= 0
    blocks = v_sel[:, :, None, :] | (torch.gather(s_sel, -1, delta.clamp(min=0).view(1, 1, -1).expand(bsz, hq, -1))
                                      .view(bsz, hq, nqb, nkb) & in_range)
    blocks = blocks | ((k0 <= p1) & (k1 >= p0))  # the query block's own (diagonal) key blocks

    # query-aware heads add the fewest pooled blocks covering γ·NQB of the block-causal softmax
    if bool(query_aware.any()):
        q_pool = pool_mean(q.float(), block) * scale
        scores = torch.matmul(q_pool, k_pool.transpose(-1, -2)).masked_fill(k0 > p1, float("-inf"))
        flat = torch.softmax(scores, dim=-1).reshape(bsz, hq, -1)
        vals, order = torch.sort(flat, dim=-1, descending=True, stable=True)
        take = torch.cumsum(vals, -1) <= gamma * nqb
        aware = torch.zeros_like(take).scatter_(-1, order, take).view(bsz, hq, nqb, nkb)
        blocks = blocks | (aware & query_aware[..., None, None])
    return dict(vertical=vertical, slash=slash, vertical_blocks=v_blocks, slash_blocks=s_blocks, pooled=pooled,
                divergence=divergence, query_aware=query_aware, n_vertical=n_v, n_slash=n_s, blocks=blocks)


@register("flexprefill", kind="dynamic",
          description="FlexPrefill: per-head JSD test between query-aware blocks and vertical-slash, mass gamma",
          paper="Lai et al. 2025, FlexPrefill (ICLR 2025)")
class FlexPrefill(Pattern):
    """FlexPrefill (Lai et al. 2025), per (batch, query head):

    1. ``P = softmax(q̂ kᵀ/√D)`` for the last ``block`` queries ``q̂`` (causal); ``a_v`` = mean of
       ``P`` per key, ``a_s`` = mean per diagonal offset.
    2. Query-aware test: ``â = softmax(mean(q̂)·avgpool(K)ᵀ/√D)`` vs ``ā`` = block sums of ``a_v``; if
       ``sqrt(JSD(â, ā)) < tau`` the head is query-aware: the fewest blocks of the block-causal pooled
       map ``softmax(avgpool(Q) avgpool(K)ᵀ/√D)`` whose cumulative score stays within
       ``gamma·#query blocks`` (whole map, as in the port), plus the minimum vertical/slash budget.
    3. Otherwise vertical-slash: the number of tokens covering ``gamma`` of ``a_v`` (resp. ``a_s``)
       gives ``tokens // block + 1`` blocks, clamped to ``[min_budget, max_budget]`` (tokens, rounded
       up to blocks); the top vertical key blocks (block 0 forced) and top block diagonals
       (offset 0 forced) of the block-summed scores are kept for every query block.
    Selected tiles are computed whole, causal inside; each query block also keeps its own diagonal
    key blocks. Sequences with ``Nk <= 2·block`` are computed densely (as the port does). Causal only.
    """

    name = "flexprefill"
    content_based = True

    def __init__(self, gamma: float = 0.9, tau: float = 0.1, block: int = 128, min_budget: Optional[int] = None,
                 max_budget: Optional[int] = None):
        check_float("flexprefill", "gamma", gamma, 0.0, 1.0, low_open=True)
        check_float("flexprefill", "tau", tau, 0.0, math.inf)
        check_int("flexprefill", "block", block, 1)
        check_int("flexprefill", "min_budget", min_budget, 1, allow_none=True)
        check_int("flexprefill", "max_budget", max_budget, 1, allow_none=True)
        if min_budget is not None and max_budget is not None and min_budget > max_budget:
            raise ValueError(f"flexprefill: min_budget ({min_budget}) must not exceed max_budget ({max_budget})")
        self.gamma, self.tau, self.block = gamma, tau, block
        self.min_budget, self.max_budget = min_budget, max_budget

    def estimate(self, q: Tensor, k: Tensor) -> dict[str, Tensor]:
        """The per-head statistics and decisions (see :func:`flexprefill_estimate`)."""
        check_qk(q, k)
        b = self.block
        lo = 1 if self.min_budget is None else -(-self.min_budget // b)
        hi = None if self.max_budget is None else -(-self.max_budget // b)
        with torch.no_grad():
            return flexprefill_estimate(q, k, self.gamma, self.tau, b, lo, hi)

    def layout(self, q: Tensor, k: Tensor, causal: bool = False) -> Layout:
        bsz, hq, _, nq, nk = check_qk(q, k)
        _validate_causal("flexprefill", causal)
        nqb, nkb = -(-nq // self.block), -(-nk // self.block)
        if nk <= 2 * self.block:
            every = torch.ones(bsz, hq, nqb, nkb, dtype=torch.bool, device=q.device)
            return block_layout(every, nq, nk, self.block, True)
        return block_layout(self.estimate(q, k)["blocks"], nq, nk, self.block, True)
