"""FlexPrefill (Lai et al., ICLR 2025, arXiv 2502.20766): per-head choice between query-aware block
selection and a vertical-slash block pattern, both sized by a cumulative attention mass γ.

Follows the official code (bytedance/FlexPrefill ``flex_prefill/ops/flex_prefill_attention.py``,
``get_active_blocks``; the same function is ported in microsoft/MInference
``minference/modules/flexprefill.py``) with two quirks fixed: token counts are turned into blocks
with the pattern's ``block`` (the official code hard-codes 128) and zero probabilities do not
produce NaN in the divergence. Slash (diagonal) scores are grouped into block diagonals as the
official code does: pooled from the *end* of the sequence (see :func:`slash_block_sums`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..layout import Layout
from ..registry import register
from ._padding import last_real_query_probs, masked_block_mean, query_tokens, real_tokens, zero_padded
from ._scoring import diagonal_sums, expand_kv, last_query_probs, pool_mean, rank_select
from ._tiles import block_layout, tile_bounds
from .base import PaddedPattern, check_float, check_int, check_qk, require_causal

__all__ = ["FlexPrefill", "sqrt_js_divergence", "flexprefill_estimate", "slash_block_sums", "SLASH_ALIGNS"]

#: how diagonal offsets are grouped into block diagonals (see :func:`slash_block_sums`)
SLASH_ALIGNS = ("end", "start")


def sqrt_js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """``sqrt(JSD(p, q))`` along the last dim (natural log; ``0 log 0 = 0``)."""
    m = (p + q) / 2
    kl = lambda a: (torch.xlogy(a, a) - torch.xlogy(a, m)).sum(-1)
    return torch.sqrt((0.5 * kl(p) + 0.5 * kl(q)).clamp(min=0))


def _cover_count(x: Tensor, mass: float) -> Tensor:
    """``score_cover_topk``: 1 + how many of the largest entries have cumulative sum <= ``mass``."""
    csum = torch.cumsum(torch.sort(x, dim=-1, descending=True).values, dim=-1)
    return (csum <= mass).sum(-1) + 1


def slash_block_sums(slash: Tensor, block: int, align: str = "end") -> Tensor:
    """Group the per-offset slash scores ``slash [..., Nk]`` (index ``d = i' - j``) into block
    diagonals ``[..., NKB]``; block diagonal ``δ`` selects the tiles ``(I, J)`` with ``I - J = δ``.

    ``align="end"`` (the official code): offset ``d`` is counted where its diagonal meets the last
    query row, at key ``Nk - 1 - d``; groups are the key blocks of that row, so ``δ`` sums the
    offsets ``d`` with ``(Nk - 1 - d) // block == NKB - 1 - δ``, i.e. ``[δb - r, δb + b - r)`` with
    ``r = NKB·b - Nk``: the main-diagonal group is partial when ``Nk`` is not a multiple of the
    block. ``align="start"`` (spattn before issue 15): ``δ`` sums ``[δb, δb + b)``. The two agree
    when ``Nk`` is a multiple of the block.
    """
    nk = slash.shape[-1]
    nkb = -(-nk // block)
    if align == "start":
        padded = torch.nn.functional.pad(slash, (0, nkb * block - nk))
        return padded.view(*slash.shape[:-1], nkb, block).sum(-1)
    by_key = torch.nn.functional.pad(slash.flip(-1), (0, nkb * block - nk))  # index Nk-1-d, pooled from key 0
    return by_key.view(*slash.shape[:-1], nkb, block).sum(-1).flip(-1)


def flexprefill_estimate(
    q: Tensor,
    k: Tensor,
    gamma: float,
    tau: float,
    block: int,
    min_blocks: int,
    max_blocks: Optional[int],
    slash_align: str = "end",
    key_padding_mask: Optional[Tensor] = None,
) -> dict[str, Tensor]:
    """Everything FlexPrefill decides, per (batch, query head).

    Returns a dict with ``vertical [B,H,Nk]`` (mean attention of the last block's queries per key),
    ``slash [B,H,Nk]`` (mean per diagonal offset), ``vertical_blocks``/``slash_blocks [B,H,NKB]``
    (their block sums), ``pooled [B,H,NKB]`` (softmax of the mean last query against mean-pooled
    keys), ``divergence [B,H]`` (sqrt JSD of ``pooled`` and ``vertical_blocks``), ``query_aware
    [B,H]`` (divergence < τ), ``n_vertical``/``n_slash [B,H]`` (block budgets) and ``blocks
    [B,H,NQB,NKB]`` (the selected tiles before causal clipping).

    ``key_padding_mask [B, Nk]`` (True = real token): the estimate uses the last ``block`` *real*
    queries, the real keys only, and blocks pool their real tokens; key blocks without a real key
    are never selected by the pooled scores.
    """
    bsz, hq, nq, dim = q.shape
    nk = k.shape[2]
    scale = 1.0 / math.sqrt(dim)
    real = real_tokens("flexprefill", key_padding_mask, bsz, nk, k.device)
    if real is None:
        probs, pos = last_query_probs(q, k, block)
        rows = probs.shape[-2]
        vertical = probs.mean(-2)
        slash = diagonal_sums(probs, pos) / rows
        k_pool = pool_mean(expand_kv(k, hq).float(), block)  # [B,H,NKB,D]
        q_mean = q[:, :, nq - rows :].float().mean(2, keepdim=True) * scale
    else:
        real_q = query_tokens(real, nq, nk)
        probs, pos, valid, idx = last_real_query_probs(q, k, block, real)
        rows = valid.sum(-1).clamp(min=1).to(probs.dtype)[:, None, None]  # [B, 1, 1]
        vertical = probs.sum(-2) / rows
        slash = diagonal_sums(probs, pos) / rows
        k_pool, k_real = masked_block_mean(expand_kv(k, hq).float(), block, real)
        q_rows = torch.gather(zero_padded(q, real_q).float(), 2, idx[:, None, :, None].expand(bsz, hq, -1, dim))
        q_mean = (q_rows * valid[:, None, :, None]).sum(2, keepdim=True) / rows[..., None] * scale
    nkb = -(-nk // block)
    n_v = _cover_count(vertical, gamma) // block + 1
    n_s = _cover_count(slash, gamma) // block + 1
    hi = nkb if max_blocks is None else min(max_blocks, nkb)
    lo = min(min_blocks, hi)
    n_v, n_s = n_v.clamp(lo, hi), n_s.clamp(lo, hi)
    v_blocks = torch.nn.functional.pad(vertical, (0, nkb * block - nk)).view(bsz, hq, nkb, block).sum(-1)
    s_blocks = slash_block_sums(slash, block, slash_align)  # s_blocks[δ]: block diagonal δ

    pooled_logits = torch.matmul(q_mean, k_pool.transpose(-1, -2)).squeeze(2)
    if real is not None:
        pooled_logits = pooled_logits.masked_fill(~k_real, float("-inf"))
    pooled = torch.softmax(pooled_logits, dim=-1)
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
    p0, p1, k0, k1 = tile_bounds(nq, nk, block, q.device)
    nqb = p0.shape[0]
    delta = torch.div(p1, block, rounding_mode="floor") - torch.div(k0, block, rounding_mode="floor")  # [NQB,NKB]
    in_range = delta >= 0
    blocks = v_sel[:, :, None, :] | (
        torch.gather(s_sel, -1, delta.clamp(min=0).view(1, 1, -1).expand(bsz, hq, -1)).view(bsz, hq, nqb, nkb)
        & in_range
    )
    blocks = blocks | ((k0 <= p1) & (k1 >= p0))  # the query block's own (diagonal) key blocks

    # query-aware heads add the fewest pooled blocks covering γ·NQB of the block-causal softmax
    if bool(query_aware.any()):
        if real is None:
            q_pool = pool_mean(q.float(), block) * scale
        else:
            q_pool = masked_block_mean(q.float(), block, query_tokens(real, nq, nk))[0] * scale
        scores = torch.matmul(q_pool, k_pool.transpose(-1, -2)).masked_fill(k0 > p1, float("-inf"))
        if real is not None:
            scores = scores.masked_fill(~k_real[:, :, None, :], float("-inf"))
        flat = torch.softmax(scores, dim=-1).nan_to_num_(nan=0.0).reshape(bsz, hq, -1)  # rows with no real key
        vals, order = torch.sort(flat, dim=-1, descending=True, stable=True)
        take = torch.cumsum(vals, -1) <= gamma * nqb
        aware = torch.zeros_like(take).scatter_(-1, order, take).view(bsz, hq, nqb, nkb)
        blocks = blocks | (aware & query_aware[..., None, None])
    return dict(
        vertical=vertical,
        slash=slash,
        vertical_blocks=v_blocks,
        slash_blocks=s_blocks,
        pooled=pooled,
        divergence=divergence,
        query_aware=query_aware,
        n_vertical=n_v,
        n_slash=n_s,
        blocks=blocks,
    )


@register(
    "flexprefill",
    kind="dynamic",
    description="FlexPrefill: per-head JSD test between query-aware blocks and vertical-slash, mass gamma",
    paper="Lai et al. 2025, FlexPrefill (ICLR 2025)",
)
class FlexPrefill(PaddedPattern):
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
       (offset 0 forced) of the block-summed scores are kept for every query block. Diagonal offsets
       are grouped into block diagonals from the end of the sequence, as the official code does
       (``slash_align="end"``, exact for any N; ``"start"`` groups them from offset 0, the
       behaviour of spattn before issue 15, which selects a different set when ``Nk`` is not a
       multiple of the block; see :func:`slash_block_sums`).
    Selected tiles are computed whole, causal inside; each query block also keeps its own diagonal
    key blocks. Sequences with ``Nk <= 2·block`` are computed densely (as the port does). Causal only.
    """

    name = "flexprefill"
    content_based = True

    def __init__(
        self,
        gamma: float = 0.9,
        tau: float = 0.1,
        block: int = 128,
        min_budget: Optional[int] = None,
        max_budget: Optional[int] = None,
        slash_align: str = "end",
    ):
        check_float("flexprefill", "gamma", gamma, 0.0, 1.0, low_open=True)
        check_float("flexprefill", "tau", tau, 0.0, math.inf)
        check_int("flexprefill", "block", block, 1)
        check_int("flexprefill", "min_budget", min_budget, 1, allow_none=True)
        check_int("flexprefill", "max_budget", max_budget, 1, allow_none=True)
        if min_budget is not None and max_budget is not None and min_budget > max_budget:
            raise ValueError(f"flexprefill: min_budget ({min_budget}) must not exceed max_budget ({max_budget})")
        if slash_align not in SLASH_ALIGNS:
            raise ValueError(f"flexprefill: slash_align must be one of {SLASH_ALIGNS}, got {slash_align!r}")
        self.gamma, self.tau, self.block = gamma, tau, block
        self.min_budget, self.max_budget, self.slash_align = min_budget, max_budget, slash_align

    def estimate(self, q: Tensor, k: Tensor, key_padding_mask: Optional[Tensor] = None) -> dict[str, Tensor]:
        """The per-head statistics and decisions (see :func:`flexprefill_estimate`)."""
        check_qk(q, k)
        b = self.block
        lo = 1 if self.min_budget is None else -(-self.min_budget // b)
        hi = None if self.max_budget is None else -(-self.max_budget // b)
        with torch.no_grad():
            return flexprefill_estimate(q, k, self.gamma, self.tau, b, lo, hi, self.slash_align, key_padding_mask)

    def layout(self, q: Tensor, k: Tensor, causal: bool = False, key_padding_mask: Optional[Tensor] = None) -> Layout:
        bsz, hq, _, nq, nk = check_qk(q, k)
        require_causal("flexprefill", causal)
        nqb, nkb = -(-nq // self.block), -(-nk // self.block)
        if nk <= 2 * self.block:
            every = torch.ones(bsz, hq, nqb, nkb, dtype=torch.bool, device=q.device)
            return block_layout(every, nq, nk, self.block, True)
        return block_layout(self.estimate(q, k, key_padding_mask)["blocks"], nq, nk, self.block, True)
