"""Tile geometry shared by the patterns of this folder: the first/last positions of each tile, how
many positions of an arithmetic progression fall in a tile, and the Layout builders every pattern
ends with (block maps -> :class:`~spattn.layout.Layout`, a TokenSelection -> Layout).

Positions: query ``i`` of ``Nq`` sits at key position ``i' = i + Nk - Nq`` (queries aligned to the
end of the keys). Nothing here builds an ``Nq x Nk`` tensor.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layout import Layout, true_positions
from ..selection import TokenSelection
from .base import causal_mask_mod, check_int

__all__ = [
    "DEFAULT_BLOCK",
    "floor_div",
    "has_multiple",
    "tile_bounds",
    "count_progression",
    "tile_stats_from_segments",
    "make_layout",
    "causal_block_maps",
    "pack_blocks",
    "block_layout",
    "selection_layout",
]

#: tile size of the static patterns
DEFAULT_BLOCK = 64


def floor_div(x: Tensor, m: int) -> Tensor:
    return torch.div(x, m, rounding_mode="floor")


def tile_bounds(q_len: int, kv_len: int, block: int, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(p0, p1, k0, k1)``: first/last aligned query position of each query tile (``[NQB, 1]``) and
    first/last key of each key tile (``[1, NKB]``). Aligned position: ``i' = i + Nk - Nq``."""
    off = kv_len - q_len
    qs = torch.arange(0, q_len, block, device=device)
    ks = torch.arange(0, kv_len, block, device=device)
    p0 = (qs + off)[:, None]
    p1 = ((qs + block - 1).clamp(max=q_len - 1) + off)[:, None]
    k0 = ks[None, :]
    k1 = (ks + block - 1).clamp(max=kv_len - 1)[None, :]
    return p0, p1, k0, k1


def has_multiple(lo: Tensor, hi: Tensor, m: int) -> Tensor:
    """Whether the integer interval ``[lo, hi]`` contains a multiple of ``m``."""
    return (lo <= hi) & (floor_div(hi, m) * m >= lo)


def count_progression(a: Tensor, b: Tensor, rho: Tensor, m: int) -> Tensor:
    """How many ``x`` in ``[a, b]`` have ``x = rho (mod m)`` (0 for an empty interval)."""
    if m == 1:
        return (b - a + 1).clamp(min=0)
    return (floor_div(b - rho, m) - floor_div(a - 1 - rho, m)).clamp(min=0)


def tile_stats_from_segments(
    segments_fn, q_len: int, kv_len: int, block: int, device, budget: int = 1 << 22
) -> tuple[Tensor, Tensor]:
    """Block/full maps ``[NQB, NKB]`` of a pattern whose keys for aligned query position ``p`` are a
    few *disjoint* arithmetic progressions: ``segments_fn(p [C]) -> (a, b, rho, m)`` with ``a, b,
    rho`` of shape ``[C, S]`` (keys ``x`` in ``[a, b]`` with ``x = rho (mod m)``; ``a > b`` = unused).

    Each segment is visited only in the key tiles it overlaps, so the cost is
    ``O(Nq * S * tiles per segment)`` plus an ``[C, NKB]`` count per chunk of query tiles (never an
    ``Nq x Nk`` tensor): a tile is selected iff some query attends some key of it, full iff every
    query attends all its keys.
    """
    off = kv_len - q_len
    nqb, nkb = -(-q_len // block), -(-kv_len // block)
    _, _, k0_all, k1_all = tile_bounds(q_len, kv_len, block, device)
    size = k1_all - k0_all + 1
    tiles_per_chunk = max(1, budget // max(1, block * (nkb + 1)))
    sel, full = [], []
    for t0 in range(0, nqb, tiles_per_chunk):
        t1 = min(nqb, t0 + tiles_per_chunk)
        # padding queries beyond q_len repeat the last query: any/all are unaffected
        i = torch.arange(t0 * block, t1 * block, device=device).clamp(max=q_len - 1)
        a, b, rho, m = segments_fn(i + off)
        a, b = a.clamp(min=0), b.clamp(max=kv_len - 1)
        first = floor_div(a, block)
        span = (floor_div(b, block) - first + 1).clamp(min=0)
        cnt = torch.zeros(i.shape[0], nkb + 1, dtype=torch.long, device=device)
        for step in range(int(span.max()) if span.numel() else 0):
            kb = first + step
            k0 = kb * block
            k1 = torch.clamp(k0 + block - 1, max=kv_len - 1)
            n = count_progression(torch.maximum(a, k0), torch.minimum(b, k1), rho, m)
            cnt.scatter_add_(1, torch.where(step < span, kb, nkb), n)
        cnt = cnt[:, :nkb].view(t1 - t0, block, nkb)
        sel.append((cnt > 0).any(1))
        full.append((cnt == size).all(1))
    return torch.cat(sel), torch.cat(full)


def make_layout(
    block_map: Tensor,
    full_map: Tensor | None,
    mask_mod,
    q_len: int,
    kv_len: int,
    block: int,
    column_map: Tensor | None = None,
) -> Layout:
    while block_map.dim() < 4:
        block_map = block_map[None]
    if full_map is not None:
        full_map = torch.broadcast_to(full_map, block_map.shape) & block_map
    if column_map is not None:
        while column_map.dim() < 4:
            column_map = column_map[None]
    return Layout.from_block_map(
        block_map,
        full_map=full_map,
        mask_mod=mask_mod,
        column_map=column_map,
        q_len=q_len,
        kv_len=kv_len,
        block_q=block,
    )


def causal_block_maps(q_len: int, kv_len: int, block: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """``(allowed, diagonal, full)`` ``[NQB, NKB]``: tiles with a visible key, tiles overlapping the
    query block's own aligned positions, tiles visible in full (causal, queries aligned to the end)."""
    p0, p1, k0, k1 = tile_bounds(q_len, kv_len, block, device)
    allowed = k0 <= p1
    diagonal = allowed & (k1 >= p0)
    return allowed, diagonal, k1 <= p0


def pack_blocks(block_map: Tensor, full_map: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Block map ``[B, H, NQB, NKB]`` -> (count, sorted indices, full flags) for :class:`Layout`."""
    num, idx = true_positions(block_map)
    full = None if full_map is None else torch.gather(full_map, -1, idx)
    return num, idx, full


def block_layout(block_map: Tensor, q_len: int, kv_len: int, block: int, causal: bool) -> Layout:
    """Layout computing whole selected tiles ``block_map [B, H, NQB, NKB]`` (causal inside tiles).

    With ``causal`` tiles entirely after the query block are dropped and tiles crossing the
    diagonal keep only ``j <= i'``.
    """
    p0, p1, k0, k1 = tile_bounds(q_len, kv_len, block, block_map.device)
    if not causal:
        num, idx, _ = pack_blocks(block_map, None)
        return Layout(num, idx, q_len=q_len, kv_len=kv_len, block_q=block)
    block_map = block_map & (k0 <= p1)
    num, idx, full = pack_blocks(block_map, block_map & (k1 <= p0))
    return Layout(
        num, idx, q_len=q_len, kv_len=kv_len, block_q=block, mask_mod=causal_mask_mod(q_len, kv_len), full=full
    )


def selection_layout(selection: TokenSelection, block: int) -> Layout:
    """An exact :class:`Layout` of a TokenSelection (for inspection, plots, block kernels).

    Tiles holding a selected pair are computed; inside them the predicate looks the key up in the
    query's index list (``O(tile * K)``), so nothing ``Nq x Nk`` is built.
    """
    check_int("selection_layout", "block", block, 1)
    idx = selection.indices
    bsel, hsel, nq, slots = idx.shape
    nk = selection.kv_len
    nqb, nkb = -(-nq // block), -(-nk // block)
    padded = F.pad(idx, (0, 0, 0, nqb * block - nq), value=-1).view(bsel, hsel, nqb, block * slots)
    block_map = torch.zeros(bsel, hsel, nqb, nkb + 1, dtype=torch.bool, device=idx.device)
    block_map.scatter_(-1, torch.where(padded >= 0, padded // block, nkb), True)
    multi_b, multi_h = bsel > 1, hsel > 1

    def member(b, h, q_idx, kv_idx):
        return (idx[b * multi_b, h * multi_h, q_idx] == kv_idx[..., None]).any(-1)

    return Layout.from_block_map(block_map[..., :nkb], q_len=nq, kv_len=nk, block_q=block, mask_mod=member)
