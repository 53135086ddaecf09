"""Compiled CPU training path for block Layouts: the compiled forward (which also returns the
log-sum-exp) and a FlashAttention-2-style backward (Dao 2023) in ``csrc/blocksparse_backward_cpu.cpp``.

The backward recomputes each tile's probabilities from the forward's ``out`` and ``lse``. Its work is
cut by key block: for every key block the *transposed* Layout lists the query blocks that select it,
so each task owns its dK / dV rows (summed over the query heads of a GQA group); dQ goes to one
accumulator per worker. The transposed tables are built once per Layout and cached with the forward's
partial-tile mask tables (see :mod:`~spattn.kernels.blocksparse_cpu`).

Applies to CPU float32 / float64 (bfloat16 / float16 inputs are computed in float32); key padding and
extra key columns reach the compiled loops through :func:`blocks_only` (they become partial tiles).
Everything else runs the eager kernel.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import _compiled
from ..layout import Layout
from . import blocksparse_cpu

__all__ = ["applies", "blocks_only", "training_attention", "transposed_tables"]


class TrainTables(NamedTuple):
    mask_id: Tensor  # int32 [B', H', NQB, S]: partial-tile mask of each slot (-1 = whole tile)
    masks: Tensor  # bool [U, block_q, block_k]
    q_ptr: Tensor  # int64 [B', H', NKB + 1]: key block kb of (b, h) is selected by
    #                q_blocks[q_ptr[b, h, kb] : q_ptr[b, h, kb + 1]]
    q_blocks: Tensor  # int64 [E]: query blocks, ascending per key block
    q_mask_id: Tensor  # int32 [E]: the mask of that tile (-1 = whole tile)


_tables: "weakref.WeakKeyDictionary[Layout, Optional[TrainTables]]" = weakref.WeakKeyDictionary()
_without_columns: "weakref.WeakKeyDictionary[Layout, Layout]" = weakref.WeakKeyDictionary()


def blocks_only(layout: Layout, key_padding_mask: Optional[Tensor] = None) -> Layout:
    """A Layout without extra columns that computes exactly the pairs ``layout`` computes for keys that
    ``key_padding_mask [B, Nk]`` (True = real key) keeps.

    A key block holding a column of a query block is selected as a partial tile; a tile holding a padded
    key is partial (per batch, so the result has ``B' = B``). Partial tiles keep the pairs of
    ``layout.contains`` (and the padding mask), so the compiled loops, which read block tables and
    per-tile masks only, run such calls exactly. Cached per layout when there is no padding.
    """
    if key_padding_mask is None and layout in _without_columns:
        return _without_columns[layout]
    bk, nk, nkb = layout.block_k, layout.kv_len, layout.num_kv_blocks
    block_map, full_map = layout.block_map(), layout.full_map()
    if layout.has_columns:
        cols = torch.nn.functional.pad(layout.column_map(), (0, nkb * bk - nk))
        block_map = block_map | cols.view(*cols.shape[:3], nkb, bk).any(-1)
    kpm = key_padding_mask
    if kpm is not None:
        keys = torch.nn.functional.pad(kpm, (0, nkb * bk - nk), value=True).view(kpm.shape[0], 1, 1, nkb, bk)
        shape = (kpm.shape[0], *block_map.shape[1:])
        block_map = block_map.expand(shape) & keys.any(-1)  # tiles of padded keys only are dropped
        full_map = full_map.expand(shape) & keys.all(-1)

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = layout.contains(b, h, q_idx, kv_idx)
        return allowed if kpm is None else allowed & kpm[b, kv_idx]

    result = Layout.from_block_map(
        block_map,
        q_len=layout.q_len,
        kv_len=nk,
        block_q=layout.block_q,
        block_k=bk,
        full_map=full_map,
        mask_mod=mask_mod,
    )
    if kpm is None:
        _without_columns[layout] = result
    return result


def transposed_tables(layout: Layout, mask_id: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(q_ptr, q_blocks, q_mask_id)``: for every (batch, head, key block) of ``layout`` the query blocks
    that compute it, ascending, with their partial-tile mask ids (CSR, offsets into the flat lists)."""
    lb, lh, nqb, _ = layout.kv_indices.shape
    nkb = layout.num_kv_blocks
    b, h, qb, s = layout.valid_slots().nonzero(as_tuple=True)  # row-major: qb ascending within (b, h)
    kb = layout.kv_indices[b, h, qb, s]
    row = (b * lh + h) * nkb + kb
    order = torch.sort(row * nqb + qb).indices
    counts = torch.bincount(row, minlength=lb * lh * nkb).view(lb, lh, nkb)
    ends = counts.flatten().cumsum(0).view(lb, lh, nkb)
    q_ptr = torch.cat([ends[..., :1] - counts[..., :1], ends], dim=-1)
    return q_ptr.contiguous(), qb[order].contiguous(), mask_id[b, h, qb, s][order].contiguous()


def _train_tables(layout: Layout) -> Optional[TrainTables]:
    """The cached tables of ``layout`` (None when its partial tiles need too many masks)."""
    if layout in _tables:
        return _tables[layout]
    masks = blocksparse_cpu.partial_tile_masks(layout)
    tables = None
    if masks is not None:
        mask_id, mask_table = masks
        tables = TrainTables(mask_id, mask_table, *transposed_tables(layout, mask_id))
    _tables[layout] = tables
    return tables


def applies(q: Tensor, k: Tensor, v: Tensor, layout: Layout, key_padding_mask: Optional[Tensor]) -> bool:
    """Whether :func:`training_attention` can run this call (else the eager kernel does)."""
    floats = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    if q.device.type != "cpu" or q.dtype not in floats or not (q.dtype == k.dtype == v.dtype):
        return False
    if key_padding_mask is not None or layout.has_columns or layout.device.type != "cpu":
        return False
    ops = _compiled.ops()
    return (
        ops is not None
        and blocksparse_cpu._has_blas(ops)
        and hasattr(ops, "block_sparse_backward")
        and _train_tables(layout) is not None
    )


class _CompiledBlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, tables, scale):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))  # kept for the backward
        out, lse = blocksparse_cpu.run_forward(q, k, v, layout, tables.mask_id, tables.masks, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.tables, ctx.scale = layout, tables, scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None and dlse is None:
            return None, None, None, None, None, None
        dout = torch.zeros_like(out) if dout is None else dout.to(out.dtype).contiguous()
        # d lse_i / d s_ij = p_ij: the lse cotangent enters dS = P (dP - delta) as delta -= dlse (the op
        # computes delta = rowsum(dout * out) - dlse itself; NaN in dlse counts as 0)
        dlse = out.new_empty(0) if dlse is None else dlse.to(out.dtype).contiguous()
        t, lay = ctx.tables, ctx.layout
        dq, dk, dv = _compiled.ops().block_sparse_backward(
            q,
            k,
            v,
            dout,
            out,
            lse,
            dlse,
            t.q_ptr,
            t.q_blocks,
            t.q_mask_id,
            t.masks,
            lay.block_q,
            lay.block_k,
            float(ctx.scale),
        )
        return dq, dk, dv, None, None, None


def training_attention(q: Tensor, k: Tensor, v: Tensor, layout: Layout, scale: float) -> tuple[Tensor, Tensor]:
    """``(out [B, Hq, Nq, Dv], lse [B, Hq, Nq])`` of ``layout`` with the compiled forward and backward
    (lse ``-inf`` and out 0 on rows without keys; half inputs computed in float32, lse float32).
    Call only where :func:`applies` holds."""
    tables = _train_tables(layout)
    dtype = q.dtype
    if dtype in (torch.bfloat16, torch.float16):
        out, lse = _CompiledBlockSparse.apply(q.float(), k.float(), v.float(), layout, tables, scale)
        return out.to(dtype), lse
    return _CompiledBlockSparse.apply(q, k, v, layout, tables, scale)
