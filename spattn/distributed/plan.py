"""From a global block Layout to one rank's share: the key blocks it needs, who sends what, and
the Layout of its queries over the fetched keys.

Rank ``r`` owns tokens ``[starts[r], starts[r] + sizes[r])`` of the sequence. Its queries cover the
global query blocks ``qb0 .. qb1-1`` (the first and last may be shared with a neighbour). The key
blocks any of those rows selects (over every batch and head, columns included by their block) are
what it needs; every rank derives every other rank's needs from the same global Layout, so the
sizes of all transfers are known without asking. All of this is O(blocks) plus O(N) index lists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..layout import Layout, ceil_div, translation_invariant

__all__ = ["ShardPlan", "plan_shards"]


def _query_rows(layout: Layout, start: int, stop: int) -> slice:
    return slice(start // layout.block_q, ceil_div(stop, layout.block_q))


def needed_blocks(layout: Layout, rows: slice) -> Tensor:
    """bool ``[NKB]``: key blocks selected by any query block in ``rows`` (any batch, head, column)."""
    nkb = layout.num_kv_blocks
    need = torch.zeros(nkb + 1, dtype=torch.bool, device=layout.device)
    idx = torch.where(layout.valid_slots()[:, :, rows], layout.kv_indices[:, :, rows], nkb)
    need[idx.flatten()] = True
    if layout.has_columns:
        cols = torch.where(layout.valid_columns()[:, :, rows], layout.col_indices[:, :, rows] // layout.block_k, nkb)
        need[cols.flatten()] = True
    return need[:nkb]


@dataclass
class ShardPlan:
    """What one rank sends, receives and computes. Splits are in tokens, ordered by rank."""

    send_index: Tensor  # local token indices sent, grouped by destination rank
    send_splits: list[int]
    recv_splits: list[int]
    local_layout: Layout  # padded local queries x fetched keys
    q_front: int  # padding rows before this rank's first query
    q_back: int  # padding rows after its last query

    @property
    def keys_fetched(self) -> int:
        return sum(self.recv_splits)


def _token_mask(need: Tensor, block: int, n: int) -> Tensor:
    return need.repeat_interleave(block)[:n]


def plan_shards(layout: Layout, sizes: list[int], rank: int) -> ShardPlan:
    """Plan rank ``rank``'s exchange and local Layout from the global ``layout`` (q_len = kv_len = N)."""
    n = layout.kv_len
    starts = [0]
    for s in sizes[:-1]:
        starts.append(starts[-1] + s)
    bk = layout.block_k
    token_need = [
        _token_mask(needed_blocks(layout, _query_rows(layout, st, st + sz)), bk, n)
        if sz
        else torch.zeros(n, dtype=torch.bool, device=layout.device)
        for st, sz in zip(starts, sizes)
    ]
    me0, me1 = starts[rank], starts[rank] + sizes[rank]
    send = [torch.nonzero(token_need[p][me0:me1]).flatten() for p in range(len(sizes))]
    send_index = torch.cat(send)
    send_splits = [int(t.numel()) for t in send]
    recv_splits = [int(token_need[rank][st : st + sz].sum()) for st, sz in zip(starts, sizes)]
    rows = _query_rows(layout, me0, me1)
    local = restrict_layout(layout, rows, needed_blocks(layout, rows))
    q_front = me0 - rows.start * layout.block_q
    q_back = local.q_len - q_front - sizes[rank]
    return ShardPlan(send_index, send_splits, recv_splits, local, q_front, q_back)


def restrict_layout(layout: Layout, rows: slice, need: Tensor) -> Layout:
    """The Layout of query blocks ``rows`` over the concatenation of the key blocks ``need`` (bool [NKB]).

    Block ``c`` of the new key axis is global key block ``kept[c]``; the predicate and columns are
    translated back to global positions. When the kept blocks are consecutive the translation is a
    shift, and a translation-invariant predicate stays marked as such (kernels reuse tile masks).
    """
    bq, bk, n = layout.block_q, layout.block_k, layout.kv_len
    kept = torch.nonzero(need).flatten()
    to_compact = torch.full((layout.num_kv_blocks,), 0, dtype=torch.long, device=layout.device)
    to_compact[kept] = torch.arange(kept.numel(), device=layout.device)
    kv_len = sum(min(bk, n - int(b) * bk) for b in kept.tolist()) if kept.numel() else 1
    q0 = rows.start * bq
    q_len = min(rows.stop * bq, layout.q_len) - q0
    valid = layout.valid_slots()[:, :, rows]
    kv_indices = torch.where(valid, to_compact[layout.kv_indices[:, :, rows]], 0)
    columns = {}
    if layout.has_columns:
        cols = layout.col_indices[:, :, rows]
        compact_cols = to_compact[cols // bk] * bk + cols % bk
        cvalid = layout.valid_columns()[:, :, rows]
        columns = dict(col_num=layout.col_num[:, :, rows], col_indices=torch.where(cvalid, compact_cols, 0))
    mask_mod = _translated(layout.mask_mod, q0, kept, bk)
    return Layout(
        layout.kv_num_blocks[:, :, rows],
        kv_indices,
        q_len=q_len,
        kv_len=kv_len,
        block_q=bq,
        block_k=bk,
        mask_mod=mask_mod,
        full=layout.full[:, :, rows],
        **columns,
    )


def _translated(mask_mod, q0: int, kept: Tensor, bk: int):
    if mask_mod is None:
        return None
    if kept.numel() and int(kept[-1] - kept[0]) + 1 == kept.numel():
        k0 = int(kept[0]) * bk

        def shifted(b, h, q_idx, kv_idx):
            return mask_mod(b, h, q_idx + q0, kv_idx + k0)

        if getattr(mask_mod, "translation_invariant", False):
            translation_invariant(shifted)
        return shifted

    def remapped(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx + q0, kept[kv_idx // bk] * bk + kv_idx % bk)

    return remapped
