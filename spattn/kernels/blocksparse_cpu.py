"""Compiled CPU inference forward for block Layouts (``csrc/blocksparse_cpu.cpp``).

The eager block-sparse kernel copies every gathered key block into a per-tile buffer and pays an
SDPA call and a log-sum-exp merge per key set; with per-head content-based layouts (XAttention,
FlexPrefill) that costs several times the selected pairs' share of dense attention. The compiled
loop reads the selected K/V blocks in place and runs FlashAttention's online softmax (Dao et al.
2022) over them, one (batch, head, query block) at a time.

This module turns a Layout into the loop's inputs: the slot tables as they are, plus one mask per
distinct *partial* tile (``mask_id[b, h, qb, s]`` into ``masks [U, block_q, block_k]``, -1 = whole
tile). With a translation-invariant predicate (causal, windows) tiles at the same block offset share
a mask, so U stays tiny.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from .. import _compiled
from ..layout import Layout

__all__ = ["compiled_forward", "partial_tile_masks"]

#: above this many mask elements (distinct partial tiles x block_q x block_k) the eager kernel runs
MAX_MASK_ELEMS = 1 << 25


def partial_tile_masks(layout: Layout, max_elems: Optional[int] = None) -> Optional[tuple[Tensor, Tensor]]:
    """``(mask_id int32 [B', H', NQB, S], masks bool [U, block_q, block_k])`` for ``layout``, or None
    when the distinct partial tiles need more than ``max_elems`` (default :data:`MAX_MASK_ELEMS`)
    mask elements.

    ``masks[u][i, j]`` says whether query ``qb·block_q + i`` computes key ``kb·block_k + j`` of a tile
    using mask ``u``; rows / columns beyond the sequence ends are never read.
    """
    bq, bk = layout.block_q, layout.block_k
    (b, h, qb, s, kb), inverse, rep = layout.partial_tiles()
    mask_id = torch.full(layout.kv_indices.shape, -1, dtype=torch.int32, device=layout.device)
    if rep.numel() * bq * bk > (MAX_MASK_ELEMS if max_elems is None else max_elems):
        return None
    masks = layout.tile_masks(b[rep], h[rep], qb[rep], kb[rep])
    mask_id[b, h, qb, s] = inverse.to(torch.int32)
    return mask_id, masks.contiguous()


def applies(q: Tensor, k: Tensor, v: Tensor, layout: Layout, key_padding_mask: Optional[Tensor]) -> bool:
    """Whether :func:`compiled_forward` can run this call (else the eager kernel does)."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.float64) or not (q.dtype == k.dtype == v.dtype):
        return False
    if key_padding_mask is not None or layout.has_columns or layout.device.type != "cpu":
        return False
    ops = _compiled.ops()
    return ops is not None and _has_blas(ops)


@functools.lru_cache(maxsize=None)
def _has_blas(ops) -> bool:
    """Whether the torch build exports the BLAS the loop calls (see the .cpp)."""
    return bool(ops.block_sparse_blas())


def compiled_forward(q: Tensor, k: Tensor, v: Tensor, layout: Layout, scale: float) -> Optional[tuple[Tensor, Tensor]]:
    """``(out [B, Hq, Nq, Dv], lse [B, Hq, Nq])`` of ``layout`` (lse ``-inf`` and out 0 on rows
    without keys), or None if the layout's partial tiles are too varied (see :func:`partial_tile_masks`).
    Call only where :func:`applies` holds."""
    tables = partial_tile_masks(layout)
    if tables is None:
        return None
    return run_forward(q, k, v, layout, *tables, scale)


def run_forward(
    q: Tensor, k: Tensor, v: Tensor, layout: Layout, mask_id: Tensor, masks: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """The compiled loop on ``layout`` with its partial-tile tables (from :func:`partial_tile_masks`)."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _compiled.ops().block_sparse_forward(
        q,
        k,
        v,
        layout.kv_num_blocks.contiguous(),
        layout.kv_indices.contiguous(),
        mask_id,
        masks,
        layout.block_q,
        layout.block_k,
        float(scale),
    )
