"""MInference 1.0 (Jiang et al., NeurIPS 2024, arXiv 2407.02490): vertical-slash and block-sparse
prefill patterns, plus the shared tools the other prefill selectors (XAttention, FlexPrefill) use.

Conventions (shared with ``xattention.py`` and ``flexprefill.py``)
* q ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nk, D]``; query head ``h`` reads key head ``h // (Hq / Hkv)``.
  Every selection is per *query* head, so layouts have ``B`` batch and ``Hq`` head entries.
* Causal alignment: query ``i`` sits at key position ``i' = i + Nk - Nq``; a *slash* (diagonal)
  is an offset ``d = i' - j >= 0``; a *vertical* is a key position ``j``.
* Estimation runs in fp32 under ``torch.no_grad`` (selection carries no gradient, as in the papers)
  and never builds an ``Nq x Nk`` tensor: vertical-slash looks at the last ``last_q`` queries only
  (``last_q x Nk``), block-sparse at mean-pooled blocks (``Nq/b x Nk/b``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..layout import Layout
from ..registry import register
from ._padding import last_real_query_probs, masked_block_mean, query_tokens, real_tokens
from .base import PaddedPattern, causal_mask_mod, check_int, check_qk

__all__ = [
    "VerticalSlash", "MInferenceBlock",
    "vertical_slash_scores", "select_vertical_slash", "last_query_probs", "diagonal_sums", "select_pooled_topk", "prefill_layout",
    "block_layout", "expand_kv", "pool_mean", "query_block_bounds", "rank_select",
]


# ---------------------------------------------------------------------------------------------
# shared geometry and tensor helpers


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def expand_kv(k: Tensor, heads: int) -> Tensor:
    """``[B, Hkv, N, D]`` -> ``[B, Hq, N, D]``: query head ``h`` gets key head ``h // (Hq/Hkv)``."""
    group = heads // k.shape[1]
    return k if group == 1 else k.repeat_interleave(group, dim=1)


def pool_mean(x: Tensor, block: int) -> Tensor:
    """Mean over consecutive blocks of ``block`` tokens (the last block averages its real tokens).

    ``x [B, H, N, D]`` -> ``[B, H, ceil(N/block), D]``.
    """
    n = x.shape[2]
    nb = _cdiv(n, block)
    padded = torch.nn.functional.pad(x, (0, 0, 0, nb * block - n))
    sums = padded.view(*x.shape[:2], nb, block, x.shape[3]).sum(3)
    counts = (n - torch.arange(nb, device=x.device) * block).clamp(max=block).to(sums.dtype)
    return sums / counts[:, None]


def query_block_bounds(q_len: int, kv_len: int, block: int, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(p0, p1, k0, k1)``: first/last aligned position of each query block ``[NQB, 1]`` and
    first/last key of each key block ``[1, NKB]``."""
    off = kv_len - q_len
    qs = torch.arange(0, q_len, block, device=device)
    ks = torch.arange(0, kv_len, block, device=device)
    p0 = (qs + off)[:, None]
    p1 = ((qs + block - 1).clamp(max=q_len - 1) + off)[:, None]
    return p0, p1, ks[None, :], (ks + block - 1).clamp(max=kv_len - 1)[None, :]


def rank_select(scores: Tensor, count: Tensor) -> Tensor:
    """bool mask of the ``count`` highest ``scores`` along the last dim (ties: lower index first).

    ``scores [..., M]``; ``count`` broadcastable to ``scores.shape[:-1]`` (per-head budgets).
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank = torch.arange(scores.shape[-1], device=scores.device)
    take = (rank < torch.as_tensor(count, device=scores.device)[..., None]).expand(scores.shape)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, take)


def _pack_blocks(block_map: Tensor, full_map: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Block map ``[B, H, NQB, NKB]`` -> (count, sorted indices, full flags) for :class:`Layout`."""
    num = block_map.sum(-1)
    width = max(int(num.max()) if num.numel() else 0, 1)
    idx = torch.argsort((~block_map).to(torch.int8), dim=-1, stable=True)[..., :width]
    full = None if full_map is None else torch.gather(full_map, -1, idx)
    return num, idx, full


def block_layout(block_map: Tensor, q_len: int, kv_len: int, block: int, causal: bool) -> Layout:
    """Layout computing whole selected tiles ``block_map [B, H, NQB, NKB]`` (causal inside tiles).

    With ``causal`` tiles entirely after the query block are dropped and tiles crossing the
    diagonal keep only ``j <= i'``.
    """
    p0, p1, k0, k1 = query_block_bounds(q_len, kv_len, block, block_map.device)
    if not causal:
        num, idx, _ = _pack_blocks(block_map, None)
        return Layout(num, idx, q_len=q_len, kv_len=kv_len, block_q=block)
    block_map = block_map & (k0 <= p1)
    num, idx, full = _pack_blocks(block_map, block_map & (k1 <= p0))
    return Layout(num, idx, q_len=q_len, kv_len=kv_len, block_q=block,
                  mask_mod=causal_mask_mod(q_len, kv_len), full=full)


def prefill_layout(q_len: int, kv_len: int, block: int, *, vertical: Optional[Tensor] = None,
                   slash: Optional[Tensor] = None, blocks: Optional[Tensor] = None,
                   whole_slash_tiles: bool = False) -> Layout:
    """Causal Layout of the union of vertical lines, slash lines and whole tiles.

    ``vertical [B, H, Nk]`` bool (key positions), ``slash [B, H, Nk]`` bool (offsets ``d = i' - j``),
    ``blocks [B, H, NQB, NKB]`` bool (tiles computed whole, causal inside). Query ``i`` attends key
    ``j`` iff ``j <= i'`` and (``vertical[j]`` or ``slash[i' - j]`` or the tile of (i, j) is in ``blocks``).
    Slashes become partial tiles with a table-lookup predicate, verticals become Layout columns.
    With ``whole_slash_tiles`` every tile a selected slash crosses is computed whole instead (causal
    inside), as MInference's kernel computes a block of keys around each slash: more pairs, but the
    only token predicate left is causality, which is far cheaper to run.
    """
    ref = next(t for t in (vertical, slash, blocks) if t is not None)
    dev, (bsz, heads) = ref.device, ref.shape[:2]
    off = kv_len - q_len
    p0, p1, k0, k1 = query_block_bounds(q_len, kv_len, block, dev)
    nqb, nkb = p0.shape[0], k0.shape[1]
    touched = k0 <= p1  # [NQB, NKB] tiles holding at least one causal pair
    dmin, dmax = p0 - k1, p1 - k0  # range of offsets d inside each tile
    block_map = torch.zeros(bsz, heads, nqb, nkb, dtype=torch.bool, device=dev)
    full_map = torch.zeros_like(block_map)
    if blocks is not None:
        block_map |= blocks
        full_map |= blocks & (dmin >= 0)
    if slash is not None:
        # how many selected offsets lie in [max(dmin, 0), dmax]: prefix sums, no N x N tensor
        cs = torch.nn.functional.pad(slash.to(torch.int32).cumsum(-1), (1, 0))
        lo = dmin.clamp(min=0, max=kv_len - 1).expand(nqb, nkb)
        hi = dmax.clamp(min=0, max=kv_len - 1).expand(nqb, nkb)
        gather = lambda i: torch.gather(cs, -1, i.reshape(1, 1, -1).expand(bsz, heads, -1)).view(bsz, heads, nqb, nkb)
        hits = gather(hi + 1) - gather(lo)
        block_map |= hits > 0
        full_map |= (dmin >= 0) & ((hits > 0) if whole_slash_tiles else (hits == (dmax - dmin + 1)))
    block_map &= touched
    full_map &= block_map
    num, idx, full = _pack_blocks(block_map, full_map)

    col_num = col_idx = None
    if vertical is not None and bool(vertical.any()):
        count = vertical.sum(-1)  # [B, H]
        width = int(count.max())
        cols = torch.argsort((~vertical).to(torch.int8), dim=-1, stable=True)[..., :width]  # ascending
        valid = torch.arange(width, device=dev) < count[..., None]
        keyed = torch.where(valid, cols, kv_len)
        # a query block sees the verticals up to its last aligned position
        col_num = torch.searchsorted(keyed.contiguous(), p1.view(1, 1, -1).expand(bsz, heads, -1).contiguous(), right=True)
        col_idx = torch.where(valid, cols, 0)[:, :, None, :].expand(bsz, heads, nqb, width)

    # Without exact slash lines, every selected tile is whole (causal inside) and every column a
    # selected vertical: causality is the whole predicate.
    if slash is None or whole_slash_tiles or not bool(slash.any()):
        return Layout(num, idx, q_len=q_len, kv_len=kv_len, block_q=block, mask_mod=causal_mask_mod(q_len, kv_len),
                      full=full, col_num=col_num, col_indices=col_idx)

    vert_t = vertical if vertical is not None else torch.zeros(bsz, heads, kv_len, dtype=torch.bool, device=dev)

    def prefill_mask(b, h, q_idx, kv_idx):
        d = q_idx + off - kv_idx
        hit = slash[b, h, d.clamp(0, kv_len - 1)] | vert_t[b, h, kv_idx]
        if blocks is not None:
            hit = hit | blocks[b, h, q_idx // block, kv_idx // block]
        return (d >= 0) & hit

    return Layout(num, idx, q_len=q_len, kv_len=kv_len, block_q=block, mask_mod=prefill_mask,
                  full=full, col_num=col_num, col_indices=col_idx)


# ---------------------------------------------------------------------------------------------
# estimation


def last_query_probs(q: Tensor, k: Tensor, last: int, scale: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """Causal softmax attention of the last ``last`` queries over all keys, fp32.

    Returns ``(P [B, Hq, L, Nk], pos [L])`` with ``L = min(last, Nq)`` and ``pos`` the rows'
    aligned key positions.
    """
    _, hq, nq, dim = q.shape
    nk = k.shape[2]
    rows = min(last, nq)
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    q_last = q[:, :, nq - rows:].float()
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


def vertical_slash_scores(q: Tensor, k: Tensor, last_q: int = 64,
                          key_padding_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """MInference's estimate: column sums and diagonal sums of the last queries' attention.

    Returns ``(vertical [B, Hq, Nk], slash [B, Hq, Nk])``; ``slash[..., d]`` sums offset ``d``.
    With ``key_padding_mask [B, Nk]`` the last real queries attend the real keys only.
    """
    real = real_tokens("vertical_slash", key_padding_mask, k.shape[0], k.shape[2], k.device)
    if real is not None:
        probs, pos, _, _ = last_real_query_probs(q, k, last_q, real)
        return probs.sum(-2), diagonal_sums(probs, pos)
    probs, pos = last_query_probs(q, k, last_q)
    return probs.sum(-2), diagonal_sums(probs, pos)


def select_vertical_slash(q: Tensor, k: Tensor, vertical, slash, *, last_q: int = 64, sinks: int = 30,
                          local: int = 100, key_padding_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Top ``vertical`` columns and top ``slash`` offsets per head (bool ``[B, Hq, Nk]`` each).

    The first ``sinks`` columns and the ``local`` nearest offsets are forced in (they rank first,
    nearest/first ones first) and count towards the budgets. ``vertical``/``slash`` may be ints or
    per-head ``[Hq]`` tensors.
    """
    v_score, s_score = vertical_slash_scores(q, k, last_q, key_padding_mask)
    nk = k.shape[2]
    inf = torch.tensor(float("inf"), device=q.device)
    v_score[..., : min(sinks, nk)] = inf
    s_score[..., : min(local, nk)] = inf
    vcount = torch.as_tensor(vertical, device=q.device).clamp(max=nk)
    scount = torch.as_tensor(slash, device=q.device).clamp(max=nk)
    if vcount.dim() == 1:
        vcount, scount = vcount[None], scount[None]
    return rank_select(v_score, vcount), rank_select(s_score, scount)


def select_pooled_topk(q: Tensor, k: Tensor, topk, block: int, causal: bool,
                       key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """MInference block-sparse selection: top-``topk`` key blocks per query block by mean-pooled
    ``q̄ k̄ᵀ`` among the causally visible ones. bool ``[B, Hq, NQB, NKB]``; ``topk`` int or ``[Hq]``.
    With ``key_padding_mask [B, Nk]`` blocks pool their real tokens and key blocks without one are never kept."""
    hq, nq, nk = q.shape[1], q.shape[2], k.shape[2]
    real = real_tokens("minference_block", key_padding_mask, k.shape[0], nk, k.device)
    if real is None:
        qp = pool_mean(q.float(), block)
        kp = pool_mean(expand_kv(k, hq).float(), block)
    else:
        qp = masked_block_mean(q.float(), block, query_tokens(real, nq, nk))[0]
        kp, has_key = masked_block_mean(expand_kv(k, hq).float(), block, real)
    scores = torch.matmul(qp, kp.transpose(-1, -2))
    if real is not None:
        scores = scores.masked_fill(~has_key[:, :, None, :], float("-inf"))
    if causal:
        p0, p1, k0, _ = query_block_bounds(nq, nk, block, q.device)
        scores = scores.masked_fill(k0 > p1, float("-inf"))
    count = torch.as_tensor(topk, device=q.device)
    count = count[None, :, None] if count.dim() == 1 else count
    chosen = rank_select(scores, count)
    return chosen & torch.isfinite(scores)


def _validate_causal(owner: str, causal: bool) -> None:
    if not causal:
        raise ValueError(f"{owner} is defined for causal prefill (estimated from the last queries); call it with causal=True")


# ---------------------------------------------------------------------------------------------
# patterns


@register("vertical_slash", kind="dynamic",
          description="MInference vertical-slash: top columns + top diagonals estimated from the last queries",
          paper="Jiang et al. 2024, MInference 1.0 (NeurIPS 2024)")
class VerticalSlash(PaddedPattern):
    """MInference's vertical-slash head pattern (Jiang et al. 2024, §3.2; official
    ``gather_last_q_vertical_slash_topk_v4``).

    The last ``last_q`` queries' causal attention ``P = softmax(q_last kᵀ/√D)`` (fp32) is summed per
    key (vertical score) and per diagonal offset ``d = i' - j`` (slash score). The first ``sinks``
    columns and the ``local`` nearest diagonals are forced in; the budgets are raised to at least
    30 verticals / 50 slashes and capped at ``Nk`` as in the official code. Query ``i`` then attends
    key ``j`` iff ``j <= i'`` and (``j`` is a selected vertical or ``i' - j`` a selected slash):
    the exact lines of the paper. ``whole_tiles=True`` executes it as the official GPU kernel does,
    which widens each slash to a block of keys (``convert_vertical_slash_indexes``): every tile a
    selected slash crosses is computed whole, a superset of the pairs that is much cheaper on CPU
    (no per-token lookup). Causal only.
    """

    name = "vertical_slash"
    content_based = True

    def __init__(self, vertical: int = 1000, slash: int = 6096, last_q: int = 64, sinks: int = 30,
                 local: int = 100, block: int = 64, whole_tiles: bool = False):
        for pname, val, low in (("vertical", vertical, 1), ("slash", slash, 1), ("last_q", last_q, 1),
                                ("sinks", sinks, 0), ("local", local, 0), ("block", block, 1)):
            check_int("vertical_slash", pname, val, low)
        if not isinstance(whole_tiles, bool):
            raise TypeError(f"vertical_slash: whole_tiles must be a bool, got {whole_tiles!r}")
        self.vertical, self.slash, self.last_q = vertical, slash, last_q
        self.sinks, self.local, self.block, self.whole_tiles = sinks, local, block, whole_tiles

    def layout(self, q: Tensor, k: Tensor, causal: bool = False, key_padding_mask: Optional[Tensor] = None) -> Layout:
        _, _, _, nq, nk = check_qk(q, k)
        _validate_causal("vertical_slash", causal)
        with torch.no_grad():
            vert, sl = select_vertical_slash(
                q, k, max(self.vertical, 30), max(self.slash, 50), last_q=self.last_q,
                sinks=self.sinks, local=self.local, key_padding_mask=key_padding_mask,
            )
            return prefill_layout(nq, nk, self.block, vertical=vert, slash=sl, whole_slash_tiles=self.whole_tiles)


@register("minference_block", kind="dynamic",
          description="MInference block-sparse: top-k key blocks per query block by mean-pooled q/k scores",
          paper="Jiang et al. 2024, MInference 1.0 (NeurIPS 2024)")
class MInferenceBlock(PaddedPattern):
    """MInference's block-sparse head pattern (official ``_build_block_index``): q and k are
    mean-pooled in blocks of ``block`` tokens, ``q̄ k̄ᵀ`` is masked block-causally and each query
    block keeps its top-``k`` key blocks (no block is forced, as in the official code; ties go to
    the lower block). Tiles are computed whole, causal inside. Non-causal: no block mask.
    Deviation: the last, partial block averages its real tokens (the official code zero-pads it).
    """

    name = "minference_block"
    content_based = True

    def __init__(self, k: int = 100, block: int = 64):
        check_int("minference_block", "k", k, 1)
        check_int("minference_block", "block", block, 1)
        self.k, self.block = k, block

    def layout(self, q: Tensor, k: Tensor, causal: bool = False, key_padding_mask: Optional[Tensor] = None) -> Layout:
        _, _, _, nq, nk = check_qk(q, k)
        with torch.no_grad():
            chosen = select_pooled_topk(q, k, self.k, self.block, causal, key_padding_mask)
            return block_layout(chosen, nq, nk, self.block, causal)
