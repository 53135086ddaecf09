"""XAttention (Xu et al. 2025, arXiv 2503.16428): antidiagonal block scoring with a cumulative threshold.

Official code: mit-han-lab/x-attention ``xattn/src/Xattention.py`` (``xattn_estimate``, torch path,
``select_mode="inverse"``) and ``xattn/src/utils.py`` (``find_blocks_chunked``).

Selection rules (``rule=``):

* ``"fewest"`` (default, the evident intent of the paper): per query block keep the sink block
  (key block 0) and the diagonal block(s), then the fewest highest-scoring blocks whose cumulative
  score with them reaches ``τ`` of the row's total.
* ``"official"``: what ``find_blocks_chunked`` computes, which produced the paper's numbers. In
  the first chunk of queries when queries and keys start together (``current_index == 0``: the
  chunk's diagonal columns start at key block 0), the forced diagonal overwrites the forced sink
  column, so only the diagonal is counted as forced, and the cumulative sum is shifted so that one
  more block per row is kept than the rule above; every row then gets block 0 anyway (unselected
  entries of the index list point at block 0). Later chunks keep sink and diagonal and follow the
  rule above. Non-causal: nothing is forced, the fewest-blocks rule, plus block 0. The chunk is
  ``Xattention_prefill``'s default (all of ``Nk`` up to 16384 tokens, then 8192, 4096, ...).
  The diagonal of query block ``r`` is key block ``r + NKB - NQB`` (the official alignment by
  block counts).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..layout import Layout
from ..registry import register
from ._padding import query_tokens, real_tokens, zero_padded
from .base import PaddedPattern, check_float, check_int, check_qk
from ._tiles import block_layout, tile_bounds

__all__ = [
    "XAttention",
    "antidiagonal_block_scores",
    "threshold_select",
    "official_threshold_select",
    "official_chunk_size",
    "RULES",
]

#: selection rules of :class:`XAttention`
RULES = ("fewest", "official")


def antidiagonal_block_scores(
    q: Tensor,
    k: Tensor,
    stride: int,
    block: int,
    causal: bool,
    chunk_elems: int = 1 << 24,
    chunk_blocks: int = 8,
    key_padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """XAttention block scores ``[B, Hq, NQB, NKB]`` (fp32).

    Both sequences are zero-padded to whole blocks and cut into ``stride x stride`` tiles. The
    reshaping ``Q_r[i] = concat_t q[iS + t]``, ``K_r[j] = concat_t k[jS + S-1-t]`` makes
    ``Q_r[i]·K_r[j]`` the sum of tile (i, j)'s antidiagonal (the official "inverse" mode reverses
    the queries instead: the same sums; reversing the keys copies fewer heads under GQA).
    ``A_r = softmax(Q_r K_rᵀ / (√D·S))`` per strided row over the strided keys; with ``causal`` a
    strided key is visible when its first key is not after the row's last (aligned) query, i.e. the
    diagonal tile's whole antidiagonal counts, as in the official code. Rows/columns whose first
    token is padding are dropped. The score of block (I, J) is the sum of ``A_r`` over its
    ``(block/S)²`` strided entries, so every real strided row contributes 1 to its block row. Query
    rows are processed in chunks of at most ``chunk_blocks`` query blocks and ``chunk_elems``
    scores; with ``causal`` a chunk only looks at the keys it can see.

    ``key_padding_mask [B, Nk]`` (True = real; also marks the queries when ``Nq == Nk``): padded
    tokens add nothing to an antidiagonal, strided columns without a real key are hidden and
    strided rows without a real query are dropped.
    """
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    real = real_tokens("xattention", key_padding_mask, bsz, nk, k.device)
    real_q = query_tokens(real, nq, nk)
    if real is not None:
        q, k = zero_padded(q, real_q), zero_padded(k, real)
    g, s, off = hq // hkv, stride, nk - nq
    p0, _, k0, _ = tile_bounds(nq, nk, block, q.device)
    nqb, nkb = p0.shape[0], k0.shape[1]
    per = block // s  # strided rows/cols per block
    nrows, ncols_all = nqb * per, nkb * per
    # K_rᵀ of every strided column, reversed inside the column and scaled, once: [B, Hkv, S·D, cols],
    # so each chunk's GEMM reads a column slice of it and the queries are used as they are
    key_cols = -(-nk // s)  # strided columns holding a key; the ones after them are empty
    k_pad = torch.nn.functional.pad(k, (0, 0, 0, key_cols * s - nk)) if nk % s else k
    k_rev = k_pad.reshape(bsz, hkv, key_cols, s, dim).flip(3).reshape(bsz, hkv, key_cols, s * dim)
    k_t = torch.empty(bsz, hkv, s * dim, key_cols, dtype=torch.float32, device=k.device)
    k_t.copy_(k_rev.transpose(-1, -2)).mul_(1.0 / (math.sqrt(dim) * s))
    q_g = q.unflatten(1, (hkv, g))  # [B, Hkv, G, Nq, D]
    if real is not None:
        pad_to = lambda m, n: torch.nn.functional.pad(m, (0, n * s - m.shape[1])).view(bsz, n, s).any(-1)
        col_real = pad_to(real, key_cols)[:, None, None, None, :]  # [B, 1, 1, 1, cols]
        row_real = None if real_q is None else pad_to(real_q, nrows)[:, None, None, :, None]  # [B, 1, 1, rows, 1]
    out = torch.zeros(bsz, hkv, g, nqb, nkb, dtype=torch.float32, device=q.device)
    # chunks of whole query blocks; with causal, a chunk reads only the keys it can see, so small
    # chunks skip most of the masked upper triangle
    per_row = bsz * hq * nkb * per * per  # scores per query block
    blocks_per_chunk = max(1, min(chunk_blocks, chunk_elems // max(1, per_row)))
    for c0 in range(0, nqb, blocks_per_chunk):
        c1 = min(c0 + blocks_per_chunk, nqb)
        r0, r1 = c0 * per, c1 * per
        rows = torch.arange(r0, r1, device=q.device)
        ncols = ncols_all
        if causal:
            last = (rows * s + s - 1).clamp(max=nq - 1) + off  # last aligned query of each strided row
            ncols = max(0, min(nkb, int(last.max()) // block + 1)) * per  # 0: more queries than keys, none visible yet
        cols = min(ncols, key_cols)
        # Q_r of the chunk: [B, Hkv, G·rows, S·D]
        lhs = q_g[:, :, :, r0 * s : r1 * s]
        if lhs.shape[3] < (r1 - r0) * s:  # the queries end inside the chunk's last strided row
            lhs = torch.nn.functional.pad(lhs, (0, 0, 0, (r1 - r0) * s - lhs.shape[3]))
        lhs = lhs.float().reshape(bsz, hkv, g * (r1 - r0), s * dim)
        logits = torch.matmul(lhs, k_t[..., :cols]).view(bsz, hkv, g, r1 - r0, cols)
        if causal:  # only the trailing columns can be hidden: mask that slice alone
            first_hidden = max(0, min(cols, int(last.min()) // s + 1))
            if first_hidden < cols:
                hidden = torch.arange(first_hidden, cols, device=q.device)[None, :] * s > last[:, None]
                logits[..., first_hidden:].masked_fill_(hidden, float("-inf"))
        if real is not None:
            logits.masked_fill_(~col_real[..., :cols], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if (causal and off < 0) or real is not None:  # rows that see no (real) key at all
            probs = torch.nan_to_num_(probs, nan=0.0)
        if real is not None and row_real is not None:
            probs.masked_fill_(~row_real[..., r0:r1, :], 0.0)
        pad_rows = rows * s >= nq
        if bool(pad_rows.any()):
            probs[..., pad_rows, :] = 0.0  # strided rows made of padding only
        if cols < ncols:  # empty strided columns after the last key: probability 0
            probs = torch.nn.functional.pad(probs, (0, ncols - cols))
        sums = probs.view(bsz, hkv, g, c1 - c0, per, ncols // per, per).sum(dim=(4, 6))  # [B, Hkv, G, c, cb]
        out[..., c0:c1, : ncols // per] = sums
    return out.view(bsz, hq, nqb, nkb)


def threshold_select(scores: Tensor, threshold: float, forced: Tensor, valid: Tensor) -> Tensor:
    """``find_blocks_chunked``: per row keep the ``forced`` blocks, then the other valid blocks in
    descending score order while the kept mass is below ``threshold·(row total)``.

    ``scores [..., M]`` (non-negative), ``forced``/``valid`` bool broadcastable to it. Ties keep the
    lower index first. Returns bool ``[..., M]``.
    """
    scores = scores.double() * valid
    forced = (forced & valid).expand_as(scores)
    need = threshold * scores.sum(-1, keepdim=True)
    others = torch.where(forced | ~valid, -1.0, scores)
    vals, order = torch.sort(others, dim=-1, descending=True, stable=True)
    before = (scores * forced).sum(-1, keepdim=True) + torch.cumsum(vals.clamp(min=0), -1) - vals.clamp(min=0)
    take = (before < need) & (vals >= 0)
    return forced | torch.zeros_like(forced).scatter_(-1, order, take)


def official_chunk_size(kv_len: int) -> int:
    """``Xattention_prefill``'s default ``chunk_size`` (tokens of queries estimated together)."""
    p = 1 << (kv_len - 1).bit_length()
    return int(max(min(max(2048, p), 128 * 1024 * 2048 // p), 2048))


def official_threshold_select(
    scores: Tensor, threshold: float, causal: bool, nq: int, nk: int, block: int, valid: Tensor
) -> Tensor:
    """The block choice of the official ``find_blocks_chunked`` (threshold mode), see the module
    docstring. ``scores [B, H, NQB, NKB]`` (non-negative), ``valid`` bool broadcastable to it.
    Ties keep the lower index first. Returns bool ``[B, H, NQB, NKB]``.
    """
    nqb, nkb = scores.shape[-2:]
    dev = scores.device
    scores = scores.double() * valid
    need = threshold * scores.sum(-1, keepdim=True)
    cols = torch.arange(nkb, device=dev)
    sink = (cols == 0).expand(nqb, nkb)
    if causal:
        diag_col = torch.arange(nqb, device=dev) + (nkb - nqb)  # official alignment by block counts
        diag = cols[None, :] == diag_col[:, None]  # [NQB, NKB]
        # rows whose chunk starts at key block 0: the diagonal overwrites the sink column
        first_chunk = torch.arange(nqb, device=dev) < official_chunk_size(nk) // block
        quirk = (first_chunk & (nkb == nqb))[:, None]
        forced = (diag | (sink & ~quirk)) & valid
    else:
        forced = torch.zeros_like(scores, dtype=torch.bool)
    forced = forced.expand_as(scores)
    others = torch.where(forced | ~valid, -1.0, scores)
    vals, order = torch.sort(others, dim=-1, descending=True, stable=True)
    mass = vals.clamp(min=0)
    ahead = torch.cumsum(mass, -1) - mass  # mass of the other blocks ranked ahead
    if causal:
        forced_mass = (scores * forced).sum(-1, keepdim=True)
        # official: entry t of [forced..., others...] is kept while c[t] < need, with c[0] = c[1] = 0 and
        # c[t] = forced mass + the first t - 2 others: with two forced blocks that is the usual rule,
        # with one (the overwritten sink) every other block moves up by one
        one_forced = torch.cat([torch.zeros_like(ahead[..., :1]), forced_mass + ahead[..., :-1]], -1)
        before = torch.where(forced.sum(-1, keepdim=True) >= 2, forced_mass + ahead, one_forced)
    else:
        before = ahead
    take = (before < need) & (vals >= 0)
    chosen = forced | torch.zeros_like(forced).scatter_(-1, order, take)
    return (chosen | sink) & valid


@register(
    "xattention",
    kind="dynamic",
    description="XAttention: strided antidiagonal block scores, cumulative threshold selection",
    paper="Xu et al. 2025, XAttention: Block Sparse Attention with Antidiagonal Scoring",
)
class XAttention(PaddedPattern):
    """XAttention (Xu et al. 2025): score blocks of ``block`` tokens by the strided antidiagonal
    sums of :func:`antidiagonal_block_scores`, then per query block keep the sink block (key block
    0) and the diagonal block(s) (key blocks holding the query block's own positions) plus the
    fewest highest-scoring blocks whose cumulative score with them reaches ``threshold`` (τ) of the
    row's total. Tiles are computed whole; with ``causal`` blocks after the diagonal are never
    kept and the diagonal tiles are causal inside. ``rule="official"`` reproduces the official
    code's choice instead (forced sink overwritten by the diagonal in the first chunk, one more
    block per row there; see the module docstring). With ``key_padding_mask`` padded positions add
    nothing to the scores and key blocks without a real key are never chosen.
    """

    name = "xattention"
    content_based = True

    def __init__(self, threshold: float = 0.9, stride: int = 8, block: int = 128, rule: str = "fewest"):
        check_float("xattention", "threshold", threshold, 0.0, 1.0, low_open=True)
        check_int("xattention", "stride", stride, 1)
        check_int("xattention", "block", block, 1)
        if block % stride:
            raise ValueError(f"xattention: stride must divide block, got stride={stride}, block={block}")
        if rule not in RULES:
            raise ValueError(f"xattention: rule must be one of {RULES}, got {rule!r}")
        self.threshold, self.stride, self.block, self.rule = threshold, stride, block, rule

    def block_scores(
        self, q: Tensor, k: Tensor, causal: bool = False, key_padding_mask: Optional[Tensor] = None
    ) -> Tensor:
        """``[B, Hq, NQB, NKB]`` antidiagonal block scores (see :func:`antidiagonal_block_scores`)."""
        check_qk(q, k)
        with torch.no_grad():
            return antidiagonal_block_scores(q, k, self.stride, self.block, causal, key_padding_mask=key_padding_mask)

    def layout(self, q: Tensor, k: Tensor, causal: bool = False, key_padding_mask: Optional[Tensor] = None) -> Layout:
        bsz, _, _, nq, nk = check_qk(q, k)
        with torch.no_grad():
            real = real_tokens("xattention", key_padding_mask, bsz, nk, k.device)
            scores = antidiagonal_block_scores(q, k, self.stride, self.block, causal, key_padding_mask=real)
            p0, p1, k0, k1 = tile_bounds(nq, nk, self.block, q.device)
            valid = (k0 <= p1) if causal else torch.ones_like(k0 <= p1)
            if real is not None:  # key blocks without a real key are never chosen
                nkb = k0.shape[1]
                has_key = torch.nn.functional.pad(real, (0, nkb * self.block - nk)).view(bsz, nkb, self.block).any(-1)
                valid = valid & has_key[:, None, None, :]
            if self.rule == "official":
                chosen = official_threshold_select(scores, self.threshold, causal, nq, nk, self.block, valid)
            else:
                forced = (k0 == 0) | ((k0 <= p1) & (k1 >= p0))
                chosen = threshold_select(scores, self.threshold, forced, valid)
            return block_layout(chosen, nq, nk, self.block, causal)
