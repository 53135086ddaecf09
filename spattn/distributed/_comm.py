"""Differentiable point-to-point exchanges and per-call communication statistics.

Two autograd Functions move token rows between ranks; their backward sends the gradients of
the rows back to the ranks that own them (so dK/dV of a fetched key reach its owner):

* :class:`_Exchange`: every rank sends a chosen set of its rows to every other rank in one
  ``all_to_all_single`` with per-rank sizes; backward is the transposed exchange plus an
  ``index_add`` into the owner's rows.
* :class:`_RingShift`: rank ``r`` sends a tensor to ``r + 1`` and receives one from ``r - 1``
  (ring attention's step); backward shifts the gradient the other way.

Rows travel tokens-first (``[n, ...]`` contiguous), the layout ``all_to_all_single`` splits.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["CommStats", "record_comm"]


@dataclass
class CommStats:
    """Bytes this rank sent and received (to/from other ranks; a rank's own rows are not counted)
    and wall time, summed over the calls recorded. Bytes include the backward's exchanges (dK/dV
    returned to their owners) and the small collectives (shard shapes, block summaries); ``seconds``
    is the forward wall time (the backward's is part of the caller's ``backward()``). ``calls``
    lists one dict per call: mode ("ring" or "sparse"), bytes_sent, bytes_received, seconds."""

    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    calls: list = field(default_factory=list)

    def add(self, sent: int, received: int) -> None:
        self.bytes_sent += sent
        self.bytes_received += received
        if self.calls:
            self.calls[-1]["bytes_sent"] += sent
            self.calls[-1]["bytes_received"] += received


_RECORDERS: list[CommStats] = []


@contextlib.contextmanager
def record_comm() -> Iterator[CommStats]:
    """Record the communication of sequence-parallel calls (forward and backward) made inside.

    >>> with record_comm() as stats:
    ...     out = sequence_parallel_attention(q, k, v, "window(size=256)")
    ...     out.sum().backward()
    >>> stats.bytes_sent, stats.bytes_received, stats.seconds
    """
    stats = CommStats()
    _RECORDERS.append(stats)
    try:
        yield stats
    finally:
        _RECORDERS.remove(stats)


def _count(sent: int, received: int) -> None:
    for stats in _RECORDERS:
        stats.add(sent, received)


@contextlib.contextmanager
def timed_call(mode: str) -> Iterator[None]:
    """Open one call record in every active recorder and add its forward wall time."""
    for stats in _RECORDERS:
        stats.calls.append({"mode": mode, "bytes_sent": 0, "bytes_received": 0, "seconds": 0.0})
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        for stats in _RECORDERS:
            stats.seconds += elapsed
            stats.calls[-1]["seconds"] += elapsed


def _row_bytes(x: Tensor) -> int:
    return x[0].numel() * x.element_size() if x.shape[0] else 0


def _all_to_all(rows: Tensor, send_splits: list[int], recv_splits: list[int], rank: int, group) -> Tensor:
    out = rows.new_empty((sum(recv_splits), *rows.shape[1:]))
    dist.all_to_all_single(out, rows, recv_splits, send_splits, group=group)
    per_row = _row_bytes(rows) or _row_bytes(out)
    _count((sum(send_splits) - send_splits[rank]) * per_row, (sum(recv_splits) - recv_splits[rank]) * per_row)
    return out


class _Exchange(torch.autograd.Function):
    """``rows [n_local, ...]`` -> the rows other ranks chose for this one, concatenated by source rank."""

    @staticmethod
    def forward(ctx, rows, send_index, send_splits, recv_splits, rank, group):
        ctx.save_for_backward(send_index)
        ctx.meta = (rows.shape[0], send_splits, recv_splits, rank, group)
        return _all_to_all(rows.index_select(0, send_index).contiguous(), send_splits, recv_splits, rank, group)

    @staticmethod
    def backward(ctx, grad):
        (send_index,) = ctx.saved_tensors
        n_local, send_splits, recv_splits, rank, group = ctx.meta
        back = _all_to_all(grad.contiguous(), recv_splits, send_splits, rank, group)
        out = grad.new_zeros((n_local, *grad.shape[1:]))
        return out.index_add_(0, send_index, back), None, None, None, None, None


def exchange_rows(
    rows: Tensor, send_index: Tensor, send_splits: list[int], recv_splits: list[int], rank: int, group=None
) -> Tensor:
    """Send ``rows[send_index]`` (grouped by destination, ``send_splits`` rows each) to every rank and
    return the ``sum(recv_splits)`` rows received, ordered by source rank. Differentiable."""
    return _Exchange.apply(rows, send_index, list(send_splits), list(recv_splits), rank, group)


def _shift(x: Tensor, to: int, frm: int, recv_shape, group) -> Tensor:
    out = x.new_empty(recv_shape)
    ops = [dist.P2POp(dist.isend, x.contiguous(), to, group), dist.P2POp(dist.irecv, out, frm, group)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    _count(x.numel() * x.element_size(), out.numel() * out.element_size())
    return out


class _RingShift(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, recv_shape, nxt, prev, group):
        ctx.meta = (tuple(x.shape), nxt, prev, group)
        return _shift(x, nxt, prev, recv_shape, group)

    @staticmethod
    def backward(ctx, grad):
        shape, nxt, prev, group = ctx.meta
        return _shift(grad, prev, nxt, shape, group), None, None, None, None


def ring_shift(x: Tensor, recv_shape, nxt: int, prev: int, group=None) -> Tensor:
    """Send ``x`` to global rank ``nxt``, receive a ``recv_shape`` tensor from ``prev``. Differentiable."""
    return _RingShift.apply(x, tuple(recv_shape), nxt, prev, group)


def global_rank(group, group_rank: int) -> int:
    """The global rank of ``group_rank`` in ``group`` (P2P ops take global ranks)."""
    if group is None or group is dist.group.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def all_gather_ints(values: list[int], group, world: int, device) -> Tensor:
    """All-gather a short int64 vector from every rank: ``[world, len(values)]`` (on CPU)."""
    mine = torch.tensor(values, dtype=torch.long, device=device)
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine, group=group)
    _count(mine.numel() * 8 * (world - 1), mine.numel() * 8 * (world - 1))
    return torch.stack(out).cpu()
