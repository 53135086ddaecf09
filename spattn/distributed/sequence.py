"""Sequence-parallel attention: every rank holds a contiguous shard of the sequence.

``sequence_parallel_attention(q, k, v, pattern)`` on shards ``[B, H, N_r, D]`` returns this rank's
rows of ``spattn.attention`` on the whole sequence, with gradients flowing back to the shards of
every rank. Three ways, chosen by the pattern:

* dense (``pattern=None`` / ``"dense"``): ring attention (Liu et al. 2023, *Ring Attention with
  Blockwise Transformers*; Li et al. 2023, *LightSeq*): K/V shards travel once around the ring, each
  step's partial attention is merged by log-sum-exp; causal skips the shards ahead of a rank.
* a static pattern (window, BigBird, ...) or a global Layout: every rank builds the global block
  Layout from the shapes alone, derives which key blocks each rank's queries select, and only
  those rows move (one ``all_to_all_single`` with per-rank sizes); the rank then runs the kernel on
  its queries over the fetched keys (the global Layout restricted to them).
* a content-based block selector (``block_topk``, ``block_mass``): ranks all-reduce per-block sums
  of q and k (the block means the selector scores), every rank selects from the same summaries,
  then it proceeds as for a static pattern.

Per-token selectors (top-k keys per query, routing, ...) are not supported: they would need the
keys of every rank to select.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..functional import _check_inputs, attention, is_selection
from ..layout import Layout
from ..patterns import Dense, Pattern
from ..patterns import pattern as make_pattern
from ..patterns.base import causal_mask_mod
from ..patterns.topk import BlockMass, BlockTopK, _descending_order, causal_block_maps
from . import _comm
from .plan import ShardPlan, plan_shards

__all__ = ["sequence_parallel_attention", "SUPPORTED_SELECTORS"]

#: content-based patterns whose selection runs from all-reduced block summaries
SUPPORTED_SELECTORS = (BlockTopK, BlockMass)


def _group_info(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "sequence_parallel_attention needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group, e.g. under torchrun)"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def _check_shards(q: Tensor, k: Tensor, v: Tensor, causal, group, world: int) -> list[int]:
    """Validate locally, then all-gather every rank's verdict and shard shape once, so that every rank
    raises the same clear error (a rank failing alone would leave its peers waiting in a collective)."""
    problem = ""
    try:
        _check_inputs(q, k, v)
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        if q.shape[2] != k.shape[2]:
            raise ValueError(
                f"q and k must hold the same tokens of the sequence (self-attention): "
                f"got N_local {q.shape[2]} and {k.shape[2]}"
            )
    except (TypeError, ValueError) as exc:
        problem = str(exc)
    shapes = [q.shape[2], q.shape[0], q.shape[1], k.shape[1], q.shape[3]] if not problem else [0] * 5
    device = q.device if isinstance(q, Tensor) else "cpu"
    meta = _comm.all_gather_ints([int(bool(problem))] + shapes + [int(bool(causal))], group, world, device)
    if problem:
        raise ValueError(f"sequence_parallel_attention: {problem}")
    bad = [r for r in range(world) if meta[r, 0]]
    if bad:
        raise ValueError(f"sequence_parallel_attention: rank(s) {bad} passed invalid shards (see their error)")
    names = ("batch", "query heads", "kv heads", "head dim", "causal")
    for col, name in enumerate(names, start=2):
        values = meta[:, col].tolist()
        if len(set(values)) > 1:
            raise ValueError(
                f"sequence_parallel_attention: shards of inconsistent shapes: ranks disagree on "
                f"{name}: {values} (rank order)"
            )
    return meta[:, 1].tolist()


def _fake(shape, like: Tensor) -> Tensor:
    """A zero-storage tensor of ``shape``: static patterns read only shapes, dtype and device."""
    return torch.zeros((), dtype=like.dtype, device=like.device).expand(shape)


def _is_block_layout(selection) -> bool:
    """Whether a selection is a block Layout (the Selection protocol's ``kind``): the shard plan cuts
    key *blocks* across the ranks, so per-token kinds (tokens, pages, routing windows) cannot be sharded."""
    return selection.kind == Layout.kind


def _resolve(pattern) -> Union[Pattern, Layout, None]:
    if pattern is None:
        return None
    if is_selection(pattern):
        if not _is_block_layout(pattern):
            raise TypeError(
                f"sequence_parallel_attention: pattern must be None, a spec string, a Pattern or a block Layout; "
                f"got a {type(pattern).__name__} (per-token selection is not supported)"
            )
        return pattern
    pat = make_pattern(pattern)
    return None if isinstance(pat, Dense) else pat


def sequence_parallel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Union[None, str, Pattern, Layout] = None,
    *,
    causal: bool = False,
    group: Optional[dist.ProcessGroup] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> Tensor:
    """Attention over a sequence sharded by contiguous ranges over the ranks of ``group``.

    Args:
        q: ``[B, Hq, N_r, D]``, k, v: ``[B, Hkv, N_r, D]``: rank ``r``'s tokens, in rank order
            (rank 0 holds the first ``N_0`` tokens). Shards may differ in size (not in B, H, D).
        pattern: None / "dense" (ring attention), a static pattern or spec string, a content-based
            block selector (``block_topk``, ``block_mass``), or a Layout of the global sequence.
        causal, scale, backend: as in :func:`spattn.attention` for the gathered sequence.
        group: the process group (default: the world).

    Returns this rank's ``[B, Hq, N_r, D]`` rows of ``spattn.attention(gather(q), gather(k),
    gather(v), pattern, causal=causal)``. Communication is recorded by
    :func:`spattn.distributed.record_comm`.
    """
    rank, world = _group_info(group)
    pat = _resolve(pattern)
    if isinstance(pat, Pattern) and pat.content_based and not isinstance(pat, SUPPORTED_SELECTORS):
        names = ", ".join(c.name for c in SUPPORTED_SELECTORS)
        raise ValueError(
            f"sequence_parallel_attention does not support the content-based pattern {pat.name!r}: "
            f"its selection needs every rank's keys. Supported content-based selectors: {names}; "
            "static patterns and dense are supported"
        )
    sizes = _check_shards(q, k, v, causal, group, world)
    if is_selection(pat) and causal:
        raise ValueError("causal=True cannot be combined with a precomputed Layout: causality is part of the Layout")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if pat is None:
        with _comm.timed_call("ring"):
            return _ring_attention(q, k, v, sizes, rank, world, group, causal, scale)
    with _comm.timed_call("sparse"):
        plan = _static_plan(pat, q, k, sizes, rank, causal)
        if plan is None:
            plan = plan_shards(_global_layout(pat, q, k, sizes, rank, world, group, causal), sizes, rank)
        return _sparse_attention(q, k, v, plan, rank, group, scale, backend)


#: plans of static patterns, which depend only on shapes (a model calls every layer with the same ones)
_PLANS: dict[tuple, ShardPlan] = {}


def _static_plan(pat, q, k, sizes, rank, causal) -> Optional[ShardPlan]:
    """The cached plan of a static pattern for these shapes (built on first use), or None."""
    if not isinstance(pat, Pattern) or pat.content_based:
        return None
    key = (pat.spec(), tuple(sizes), rank, causal, q.shape[0], q.shape[1], k.shape[1], q.shape[3], q.dtype, q.device)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= 32:
            _PLANS.clear()
        layout = _global_layout(pat, q, k, sizes, rank, len(sizes), None, causal)
        plan = _PLANS[key] = plan_shards(layout, sizes, rank)
    return plan


# ---------------------------------------------------------------------------------------- layouts
def _global_layout(pat, q, k, sizes, rank, world, group, causal) -> Layout:
    n = sum(sizes)
    if is_selection(pat):  # a precomputed Layout (_resolve let no other kind through)
        if (pat.q_len, pat.kv_len) != (n, n):
            raise ValueError(f"pattern: a Layout must cover the whole sequence (N={n}), got {(pat.q_len, pat.kv_len)}")
        return pat
    if pat.content_based:
        return _selector_layout(pat, q, k, sizes, rank, group, causal)
    qf = _fake((q.shape[0], q.shape[1], n, q.shape[3]), q)
    kf = _fake((k.shape[0], k.shape[1], n, k.shape[3]), k)
    selection = pat.select(qf, kf, causal=causal)
    if not _is_block_layout(selection):
        raise ValueError(
            f"sequence_parallel_attention supports block Layouts; {pat.name} selects "
            f"a {type(selection).__name__} (per-token selection is not supported)"
        )
    return selection


def _block_sums(x: Tensor, start: int, n: int, block: int) -> Tensor:
    """Sums over the global blocks of ``block`` tokens of this shard's rows ``[start, start + N_r)``;
    ``[B, H, NB, D]`` with zeros for blocks outside the shard."""
    nb = -(-n // block)
    padded = F.pad(x, (0, 0, start, nb * block - start - x.shape[2]))
    return padded.view(x.shape[0], x.shape[1], nb, block, x.shape[3]).sum(3)


def _selector_layout(pat, q, k, sizes, rank, group, causal) -> Layout:
    """The selector's global Layout from block means all-reduced over the ranks (BlockTopK, BlockMass)."""
    n, block = sum(sizes), pat.block
    if isinstance(pat, BlockTopK) and pat.k > -(-n // block):
        raise ValueError(
            f"block_topk: k={pat.k} exceeds the number of key blocks {-(-n // block)} (N={n}, block={block})"
        )
    start = sum(sizes[:rank])
    sdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qs = _block_sums(q.detach().to(sdt), start, n, block)
    ks = _block_sums(k.detach().to(sdt), start, n, block)
    both = torch.cat([qs.flatten(), ks.flatten()])
    dist.all_reduce(both, group=group)
    world = len(sizes)
    ring_bytes = both.numel() * both.element_size() * 2 * (world - 1) // world  # ring all-reduce
    _comm._count(ring_bytes, ring_bytes)
    qs, ks = both[: qs.numel()].view_as(qs), both[qs.numel() :].view_as(ks)
    counts = (n - torch.arange(qs.shape[2], device=q.device) * block).clamp(max=block).to(sdt)[:, None]
    qp, kp = qs / counts, ks / counts
    batch, hq, hkv = q.shape[0], q.shape[1], k.shape[1]
    scores = torch.matmul(qp.view(batch, hkv, hq // hkv, qp.shape[2], -1), kp.transpose(-1, -2).unsqueeze(2))
    scores = scores.view(batch, hq, qp.shape[2], kp.shape[2])
    kwargs = dict(q_len=n, kv_len=n, block_q=block)
    allowed = torch.ones_like(scores, dtype=torch.bool)
    forced = torch.zeros_like(allowed)
    if causal:
        allowed_map, diagonal, full = causal_block_maps(n, n, block, q.device)
        scores = scores.masked_fill(~allowed_map, float("-inf"))
        allowed, forced = allowed_map.expand_as(scores), diagonal.expand_as(scores)
        kwargs.update(mask_mod=causal_mask_mod(n, n), full_map=full.expand_as(scores))
    order = _descending_order(scores, forced)
    if isinstance(pat, BlockTopK):
        keep = torch.zeros_like(allowed).scatter_(-1, order[..., : pat.k], True) | forced
    else:
        probs = torch.nan_to_num(torch.softmax(scores / math.sqrt(q.shape[-1]), dim=-1), nan=0.0)
        sorted_mass = torch.gather(probs, -1, order)
        take = (sorted_mass.cumsum(-1) - sorted_mass < pat.threshold) | torch.gather(forced, -1, order)
        keep = torch.zeros_like(allowed).scatter_(-1, order, take)
    return Layout.from_block_map(keep & allowed, **kwargs)


# ---------------------------------------------------------------------------------------- sparse
def _sparse_attention(q, k, v, plan: ShardPlan, rank, group, scale, backend) -> Tensor:
    b, hkv, n_local, d = k.shape
    rows = torch.stack([k, v]).permute(3, 0, 1, 2, 4).reshape(n_local, 2, b, hkv, d)
    fetched = _comm.exchange_rows(rows, plan.send_index, plan.send_splits, plan.recv_splits, rank, group)
    if plan.keys_fetched == 0:
        return q.new_zeros(q.shape[:3] + (v.shape[-1],)) + 0 * (q.sum() + fetched.sum())
    kv = fetched.view(-1, 2, b, hkv, d).permute(1, 2, 3, 0, 4)
    q_pad = F.pad(q, (0, 0, plan.q_front, plan.q_back))
    out = attention(q_pad, kv[0], kv[1], plan.local_layout, scale=scale, backend=backend)
    return out[:, :, plan.q_front : plan.q_front + n_local]


# ---------------------------------------------------------------------------------------- ring
def _ring_attention(q, k, v, sizes, rank, world, group, causal, scale) -> Tensor:
    """Dense attention by ring: step ``t`` attends the K/V shard of rank ``rank - t``; merge by lse."""
    nxt = _comm.global_rank(group, (rank + 1) % world)
    prev = _comm.global_rank(group, (rank - 1) % world)
    b, hkv, _, d = k.shape
    kv = torch.stack([k, v])
    outs, lses = [], []
    for step in range(world):
        owner = (rank - step) % world
        if step:
            kv = _comm.ring_shift(kv, (2, b, hkv, sizes[owner], d), nxt, prev, group)
        if causal and owner > rank:
            continue  # keys after every local query
        o, lse = attention(q, kv[0], kv[1], causal=causal and owner == rank, scale=scale, return_lse=True)
        outs.append(o)
        lses.append(lse)
    # every rank must run every shift's backward (its peers wait for it), so the last shifted
    # shard stays in the graph even where causality skipped it
    keep_graph = kv.sum() * 0
    if len(outs) == 1:
        return outs[0] + keep_graph
    lse = torch.logsumexp(torch.stack(lses), dim=0)
    weights = [torch.exp(l - lse).nan_to_num(0.0)[..., None] for l in lses]
    return sum((w * o.to(w.dtype) for w, o in zip(weights, outs))).to(q.dtype) + keep_graph
