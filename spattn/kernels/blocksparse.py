"""Eager block-sparse attention over a Layout, with its own forward and backward.

FlashAttention-style (Dao et al. 2022): the forward keeps only ``out`` and the log-sum-exp; the
backward recomputes each tile's probabilities from them. The work is cut into query tiles and
key sets by :class:`~spattn.kernels._tiling.TilePlan`; inside each tile PyTorch's fused CPU flash
kernel (or plain matmul + softmax on other devices) does the math, and partial results are merged
by log-sum-exp. Because the backward of softmax attention over a union of key sets only needs the
*global* ``out`` and ``lse``, every key set's gradient comes from one fused backward call.

No torch.compile, no N x N tensor; memory grows with the computed tiles. On CPU, calls go to the
compiled loops when they are built: inference (no gradient needed, float32/64) to
:mod:`~spattn.kernels.blocksparse_cpu`, training to :mod:`~spattn.kernels.blocksparse_train` (its
forward plus a FlashAttention-2-style backward); key padding and extra columns become partial tiles
there. This kernel is the portable path (other devices, no compiler) and the second oracle.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _compiled as _extension
from ..layout import Layout
from . import blocksparse_cpu, blocksparse_train
from ._finite import nan_exact
from ._tiling import Chunk, GatherSet, TilePlan, empty_rows

__all__ = ["blocksparse_attention"]


# ---------------------------------------------------------------------- one key set, one call
def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _use_flash(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _capped(scores: Tensor, softcap: Optional[float]) -> Tensor:
    """``softcap * tanh(s / softcap)`` of scaled scores (Gemma 2's logit soft-capping); ``s`` if None."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def _tile_forward(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, softcap: Optional[float] = None
) -> tuple[Tensor, Tensor]:
    """Attention of q ``[X, T, M, D]`` over k/v ``[X, T, R, D]``: (out, lse fp32 ``[X, T, M]``); rows
    the additive mask leaves without a key get zeros and lse ``-inf``.
    A score modification (``softcap``) runs on explicit scores: the fused flash kernel has no hook."""
    if softcap is None and _use_flash(q):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=mask, scale=scale
        )
        empty = empty_rows(mask)
        if empty is not None:  # SDPA returns such rows as zeros with lse 0
            lse = lse.masked_fill(empty.expand(lse.shape), float("-inf"))
        return out, lse
    scores = _capped(torch.matmul(q, k.transpose(-1, -2)).to(_lse_dtype(q.dtype)) * scale, softcap)
    if mask is not None:
        scores = scores + mask
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)  # exp(-inf - 0) = 0 on empty rows
    out = torch.matmul(torch.exp(scores - safe[..., None]).to(v.dtype), v)
    return out, lse


def _tile_backward(dout, q, k, v, out, lse, mask, scale, softcap=None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one key set's share, given the *global* out and lse of the rows."""
    if softcap is None and _use_flash(q):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=scale
        )
    acc = _lse_dtype(q.dtype)
    scores = torch.matmul(q, k.transpose(-1, -2)).to(acc) * scale
    tanh = None
    if softcap is not None:
        tanh = torch.tanh(scores / softcap)
        scores = tanh * softcap
    if mask is not None:
        scores = scores + mask
    probs = torch.exp(scores - lse[..., None])
    dv = torch.matmul(probs.to(dout.dtype).transpose(-1, -2), dout)
    dp = torch.matmul(dout, v.transpose(-1, -2)).to(acc)
    delta = (dout.to(acc) * out.to(acc)).sum(-1, keepdim=True)
    ds = probs * (dp - delta) * scale
    if tanh is not None:  # d/ds of softcap * tanh(s / softcap) = 1 - tanh²
        ds = ds * (1 - tanh * tanh)
    dq = torch.matmul(ds.to(q.dtype), k)
    dk = torch.matmul(ds.to(q.dtype).transpose(-1, -2), q)
    return dq, dk, dv


# ---------------------------------------------------------------------- layout of tensors in tiles
class _Tiler:
    """Moves tensors between ``[B, H, N, D]`` and the tile layout ``[B·Hkv, T, G·bq, D]``."""

    def __init__(self, plan: TilePlan):
        self.plan = plan
        self.padded_q = plan.nqb * plan.bq

    def pad_q(self, x: Tensor, value: float = 0.0) -> Tensor:
        """``[B, Hq, Nq, ...]`` -> ``[B, Hkv, G, NQB, bq, ...]`` (padded with ``value``)."""
        p = self.plan
        extra = self.padded_q - p.nq
        if extra:
            pad = [0, 0] * (x.dim() - 3) + [0, extra]
            x = F.pad(x, pad, value=value)
        return x.view(p.batch, p.heads_kv, p.group, p.nqb, p.bq, *x.shape[3:])

    def tiles(self, xp: Tensor, chunk: Chunk) -> Tensor:
        p = self.plan
        t = xp[:, :, :, chunk.start : chunk.stop]
        t = t.transpose(2, 3)  # [B, Hkv, T, G, bq, ...]
        return t.reshape(p.batch * p.heads_kv, chunk.stop - chunk.start, p.group * p.bq, *xp.shape[5:])

    def untile(self, t: Tensor, dst: Tensor, chunk: Chunk) -> None:
        """Write tiles ``[B·Hkv, T, G·bq, ...]`` into ``dst`` (a padded ``[B, Hkv, G, NQB, bq, ...]``)."""
        p = self.plan
        view = t.view(p.batch, p.heads_kv, chunk.stop - chunk.start, p.group, p.bq, *t.shape[3:])
        dst[:, :, :, chunk.start : chunk.stop].copy_(view.transpose(2, 3))


class _KeySets:
    """K/V prepared for a plan: padded for the band's strided views, extended for gathers."""

    def __init__(self, plan: TilePlan, k: Tensor, v: Tensor):
        self.plan = plan
        p = plan
        bh = p.batch * p.heads_kv
        if p.band_len:
            last = (p.nqb - 1) * p.bq + p.band_lo + p.band_len
            self.left = max(0, -p.band_lo)
            right = max(0, last - p.nk)
            self.padded_len = p.nk + self.left + right
            # band() reads rows with stride D: K/V must be row-major (zero padding returns the input,
            # which may be a transposed view, e.g. a Hugging Face model's [B, N, H, D] keys)
            self.k_band = F.pad(k, (0, 0, self.left, right)).contiguous().reshape(bh, self.padded_len, k.shape[-1])
            self.v_band = F.pad(v, (0, 0, self.left, right)).contiguous().reshape(bh, self.padded_len, v.shape[-1])
        self.k_blocks = self.v_blocks = self.k_cols = self.v_cols = None
        if bool((p.blocks_per_tile > 0).any()):
            # key blocks 0..nkb-1 and one all-zero padding block (index nkb)
            extra = (p.nkb + 1) * p.bk - p.nk
            self.k_blocks, self.v_blocks = F.pad(k, (0, 0, 0, extra)), F.pad(v, (0, 0, 0, extra))
        if bool((p.cols_per_tile > 0).any()):
            self.k_cols, self.v_cols = F.pad(k, (0, 0, 0, 1)), F.pad(v, (0, 0, 0, 1))  # row nk pads

    def band_start(self, chunk: Chunk) -> int:
        return chunk.start * self.plan.bq + self.plan.band_lo + self.left

    def band(self, x: Tensor, chunk: Chunk) -> Tensor:
        """Zero-copy overlapping view ``[B·Hkv, T, L, D]`` of padded keys or values."""
        p = self.plan
        d = x.shape[-1]
        return x.as_strided(
            (x.shape[0], chunk.stop - chunk.start, p.band_len, d),
            (x.stride(0), p.bq * d, d, 1),
            x.storage_offset() + self.band_start(chunk) * d,
        )

    def _rows(self, idx: Tensor, per_head: int) -> Tensor:
        """Flat row numbers for indices ``idx [B'', Hk'', T, R]`` into a ``[B·Hkv·per_head, ...]`` table."""
        p = self.plan
        b, h, t, r = idx.shape
        base = torch.arange(p.batch * p.heads_kv, device=idx.device).view(p.batch, p.heads_kv, 1, 1) * per_head
        return (idx.expand(p.batch, p.heads_kv, t, r) + base).flatten()

    def gather(self, keys: GatherSet, values: bool) -> Tensor:
        """Copy the gathered blocks (then columns) out of K or V -> ``[B·Hkv, T, R, D]``."""
        p = self.plan
        blocks_src, cols_src = (self.v_blocks, self.v_cols) if values else (self.k_blocks, self.k_cols)
        d = blocks_src.shape[-1] if blocks_src is not None else cols_src.shape[-1]
        bh, t = p.batch * p.heads_kv, keys.blocks.shape[2]
        parts = []
        if keys.blocks.shape[-1]:
            table = blocks_src.reshape(-1, p.bk * d)  # one row per key block
            rows = table.index_select(0, self._rows(keys.blocks, p.nkb + 1))
            parts.append(rows.view(bh, t, -1, d))
        if keys.cols is not None:
            rows = cols_src.reshape(-1, d).index_select(0, self._rows(keys.cols, p.nk + 1))
            parts.append(rows.view(bh, t, -1, d))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def scatter_add(self, grads: list, keys: GatherSet, grad: Tensor, values: bool) -> None:
        """Add ``grad [B·Hkv, T, R, D]`` back at the gathered blocks and columns (``grads`` holds the
        lazily created accumulators ``[blocks, cols]`` for K or V)."""
        p = self.plan
        d = grad.shape[-1]
        nb = keys.blocks.shape[-1] * p.bk
        if nb:
            src = self.v_blocks if values else self.k_blocks
            if grads[0] is None:
                grads[0] = torch.zeros_like(src)
            grads[0].view(-1, p.bk * d).index_add_(
                0, self._rows(keys.blocks, p.nkb + 1), grad[:, :, :nb].reshape(-1, p.bk * d)
            )
        if keys.cols is not None:
            src = self.v_cols if values else self.k_cols
            if grads[1] is None:
                grads[1] = torch.zeros_like(src)
            grads[1].view(-1, d).index_add_(0, self._rows(keys.cols, p.nk + 1), grad[:, :, nb:].reshape(-1, d))

    def fold_band(self, dst: Tensor, grad: Tensor, chunk: Chunk) -> None:
        """Add overlapping band tiles ``grad [B·Hkv, T, L, D]`` into ``dst [B·Hkv, padded_len, D]``."""
        p = self.plan
        t = chunk.stop - chunk.start
        base = self.band_start(chunk)
        if p.band_len % p.bq == 0:
            for m in range(p.band_len // p.bq):
                lo = base + m * p.bq
                dst[:, lo : lo + t * p.bq] += grad[:, :, m * p.bq : (m + 1) * p.bq].reshape(dst.shape[0], t * p.bq, -1)
        else:
            pos = (
                base + torch.arange(t, device=dst.device)[:, None] * p.bq + torch.arange(p.band_len, device=dst.device)
            )
            dst.index_add_(1, pos.flatten(), grad.reshape(dst.shape[0], t * p.band_len, -1))


def _merge(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Combine partial (out, lse) over disjoint key sets; rows with no key get 0 and -inf."""
    if len(parts) == 1:
        out, lse = parts[0]
    else:
        lse = torch.logsumexp(torch.stack([l for _, l in parts]), dim=0)
        acc = None
        for o, l in parts:
            term = o.to(lse.dtype) * torch.exp(l - lse)[..., None]
            acc = term if acc is None else acc + term
        out = acc.to(parts[0][0].dtype)
    empty = torch.isneginf(lse)
    if bool(empty.any()):  # out and lse are fresh tensors: edit in place
        out.masked_fill_(empty[..., None], 0.0)
        lse.masked_fill_(empty, float("-inf"))
    return out, lse


# ---------------------------------------------------------------------- the autograd function
def _forward(
    plan: TilePlan, q: Tensor, k: Tensor, v: Tensor, scale: float, softcap: Optional[float] = None
) -> tuple[Tensor, Tensor]:
    tiler = _Tiler(plan)
    keys = _KeySets(plan, k, v)
    qp = tiler.pad_q(q)
    out_p = q.new_empty(plan.batch, plan.heads_kv, plan.group, plan.nqb, plan.bq, q.shape[-1])
    lse_p = q.new_empty(plan.batch, plan.heads_kv, plan.group, plan.nqb, plan.bq, dtype=_lse_dtype(q.dtype))
    for chunk in plan.chunks:
        q_t = tiler.tiles(qp, chunk)
        parts = []
        if plan.band_len:
            mask = plan.band_mask(chunk, q.dtype)
            parts.append(
                _tile_forward(q_t, keys.band(keys.k_band, chunk), keys.band(keys.v_band, chunk), mask, scale, softcap)
            )
        if chunk.gathers:
            gathered = plan.gather_keys(chunk)
            mask = plan.gather_mask(chunk, gathered, q.dtype)
            parts.append(
                _tile_forward(q_t, keys.gather(gathered, False), keys.gather(gathered, True), mask, scale, softcap)
            )
        if not parts:  # no key anywhere in this chunk
            shape = q_t.shape[:-1]
            parts.append((torch.zeros_like(q_t), torch.full(shape, float("-inf"), dtype=lse_p.dtype, device=q.device)))
        out_t, lse_t = _merge(parts)
        tiler.untile(out_t, out_p, chunk)
        tiler.untile(lse_t, lse_p, chunk)
    out = out_p.flatten(3, 4)[..., : plan.nq, :].reshape(plan.batch, plan.heads_q, plan.nq, q.shape[-1])
    lse = lse_p.flatten(3, 4)[..., : plan.nq].reshape(plan.batch, plan.heads_q, plan.nq)
    return out, lse


def _backward(plan, dout, dlse, q, k, v, out, lse, scale, softcap=None):
    tiler = _Tiler(plan)
    if dlse is not None:
        # d lse_i / d s_ij = p_ij: append a ones column to v and dlse to dout (out, q and k get a 0
        # column, so scores are unchanged); the fused backward's dS = P (dP + dlse - rowsum(dout * out))
        # is then exactly right.
        q = torch.cat([q, torch.zeros_like(q[..., :1])], -1)
        k = torch.cat([k, torch.zeros_like(k[..., :1])], -1)
        v = torch.cat([v, torch.ones_like(v[..., :1])], -1)
        dout = torch.cat([dout, dlse.to(dout.dtype)[..., None]], -1)
        out = torch.cat([out, torch.zeros_like(out[..., :1])], -1)
    keys = _KeySets(plan, k, v)
    qp, dop, op = tiler.pad_q(q), tiler.pad_q(dout), tiler.pad_q(out)
    # rows without keys: lse=+inf makes every probability exactly 0 in the recomputation
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    lp = tiler.pad_q(lse[..., None], value=float("inf")).squeeze(-1)
    dq_p = torch.zeros_like(qp)
    dk_band = torch.zeros_like(keys.k_band) if plan.band_len else None
    dv_band = torch.zeros_like(keys.v_band) if plan.band_len else None
    dk_gathered, dv_gathered = [None, None], [None, None]  # [blocks, columns] accumulators
    for chunk in plan.chunks:
        q_t, do_t, o_t = tiler.tiles(qp, chunk), tiler.tiles(dop, chunk), tiler.tiles(op, chunk)
        l_t = tiler.tiles(lp[..., None], chunk).squeeze(-1).contiguous()
        dq_t = None
        if plan.band_len:
            mask = plan.band_mask(chunk, q.dtype)
            g = _tile_backward(
                do_t, q_t, keys.band(keys.k_band, chunk), keys.band(keys.v_band, chunk), o_t, l_t, mask, scale, softcap
            )
            dq_t = g[0]
            keys.fold_band(dk_band, g[1], chunk)
            keys.fold_band(dv_band, g[2], chunk)
        if chunk.gathers:
            gathered = plan.gather_keys(chunk)
            mask = plan.gather_mask(chunk, gathered, q.dtype)
            g = _tile_backward(
                do_t, q_t, keys.gather(gathered, False), keys.gather(gathered, True), o_t, l_t, mask, scale, softcap
            )
            dq_t = g[0] if dq_t is None else dq_t + g[0]
            keys.scatter_add(dk_gathered, gathered, g[1], values=False)
            keys.scatter_add(dv_gathered, gathered, g[2], values=True)
        if dq_t is not None:
            tiler.untile(dq_t, dq_p, chunk)
    dq = dq_p.flatten(3, 4)[..., : plan.nq, :].reshape(q.shape)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    if dk_band is not None:
        sl = slice(keys.left, keys.left + plan.nk)
        dk += dk_band.view(plan.batch, plan.heads_kv, -1, k.shape[-1])[:, :, sl]
        dv += dv_band.view(plan.batch, plan.heads_kv, -1, dv.shape[-1])[:, :, sl]
    for acc_k, acc_v in zip(dk_gathered, dv_gathered):
        if acc_k is not None:
            dk += acc_k[:, :, : plan.nk]
            dv += acc_v[:, :, : plan.nk]
    if dlse is not None:
        dq, dk, dv = dq[..., :-1], dk[..., :-1], dv[..., :-1]
    return dq, dk, dv


#: per-head layouts are split into one call per head above this many (query, key) positions
SPLIT_HEADS_MIN_PAIRS = 1 << 22


def _split_heads_pays(layout: Layout, heads_q: int, pairs: int) -> bool:
    """Whether a per-head layout runs faster one head at a time.

    One call gives every head of a chunk the key set of the widest head (and grouped-query heads the
    union of their group's blocks), so heads with very different sparsity (XAttention, FlexPrefill,
    MInference) compute many masked keys. A call per head pays a tile plan per head instead: worth
    it for long sequences when the widest head's tiles exceed the mean by a margin.
    """
    if layout.heads == 1 or layout.heads != heads_q or pairs < SPLIT_HEADS_MIN_PAIRS:
        return False
    keys = layout.kv_num_blocks * layout.block_k  # [B', H, NQB] keys per tile and head
    if layout.col_num is not None:
        keys = keys + layout.col_num
    widest = keys.amax(dim=(0, 1)).sum() * keys.shape[0] * keys.shape[1]
    return bool(widest > 1.25 * keys.sum())


def _wants_grad(q: Tensor, k: Tensor, v: Tensor) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def _compiled(q, k, v, layout, key_padding_mask, scale) -> Optional[tuple[Tensor, Tensor]]:
    """(out, lse) from the compiled CPU loops: the inference forward when no gradient is needed, the
    training path (forward + backward) otherwise; None when they do not apply (the eager kernel runs).
    Key padding and extra columns are turned into partial tiles first (``blocks_only``)."""
    if q.device.type != "cpu" or _extension.ops() is None:
        return None
    if key_padding_mask is not None or layout.has_columns:
        kpm = key_padding_mask
        if kpm is not None and not (
            kpm.dtype == torch.bool and kpm.device.type == "cpu" and tuple(kpm.shape) == (q.shape[0], k.shape[2])
        ):
            return None
        layout, key_padding_mask = blocksparse_train.blocks_only(layout, kpm), None
    if not _wants_grad(q, k, v):
        if blocksparse_cpu.applies(q, k, v, layout, None):
            return blocksparse_cpu.compiled_forward(q, k, v, layout, scale)
        return None
    if blocksparse_train.applies(q, k, v, layout, None):
        return blocksparse_train.training_attention(q, k, v, layout, scale)
    return None


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, scale, softcap=None):
        out, lse = _forward(plan, q, k, v, scale, softcap)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale, ctx.softcap = plan, scale, softcap
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dlse = None if dlse is None else torch.nan_to_num(dlse, nan=0.0)
        dq, dk, dv = _backward(ctx.plan, dout.contiguous(), dlse, q, k, v, out, lse, ctx.scale, ctx.softcap)
        return dq, dk, dv, None, None, None


def blocksparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: Layout,
    *,
    scale: Optional[float] = None,
    key_padding_mask: Optional[Tensor] = None,
    return_lse: bool = False,
    chunk_elems: int = 1 << 23,
    softcap: Optional[float] = None,
):
    """Softmax attention restricted to ``layout``, exact, with a memory-lean fused backward.

    q ``[B, Hq, Nq, D]``, k/v ``[B, Hkv, Nk, D]`` with ``Hq % Hkv == 0``; ``key_padding_mask [B, Nk]``
    (True = real key). Returns ``out [B, Hq, Nq, D]`` and, if asked, ``lse [B, Hq, Nq]`` (fp32,
    ``-inf`` where a query has no key; such rows output zeros). ``chunk_elems`` bounds the per-chunk
    buffers (scores of one chunk of query tiles), which bounds peak memory at any length. Excluded
    pairs are excluded exactly (``-inf`` in every dtype) and NaN in q, k or v reaches exactly the rows
    the dense reference puts it in (see :mod:`~spattn.kernels._finite`). The layout's tables are
    re-validated (:meth:`Layout.check`), so a layout edited in place raises instead of reading outside K/V.
    ``softcap``: scaled scores ``s`` become ``softcap * tanh(s / softcap)`` (Gemma 2); computed on
    explicit score tiles (not the fused flash kernel, nor the compiled CPU loop), forward and backward.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    softcap = None if softcap is None else float(softcap)
    layout.check()

    def run(q, k, v):
        return _attend(q, k, v, layout, scale, key_padding_mask, chunk_elems, softcap)

    out, lse = nan_exact(run, q, k, v, shows_nan=True)  # masked scores are set to -inf, not added to
    return (out, lse) if return_lse else out


def _attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: Layout,
    scale: float,
    key_padding_mask: Optional[Tensor],
    chunk_elems: int,
    softcap: Optional[float],
) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of :func:`blocksparse_attention` for NaN-free inputs: the compiled loop where it
    applies, else the eager plan (one call per head where that pays)."""
    result = None if softcap is not None else _compiled(q, k, v, layout, key_padding_mask, scale)
    if result is not None:
        return result
    if _split_heads_pays(layout, q.shape[1], q.shape[2] * k.shape[2]):
        group = q.shape[1] // k.shape[1]
        parts = [
            _attend(
                q[:, h : h + 1],
                k[:, h // group : h // group + 1],
                v[:, h // group : h // group + 1],
                layout.head(h),
                scale,
                key_padding_mask,
                chunk_elems,
                softcap,
            )
            for h in range(q.shape[1])
        ]
        return torch.cat([o for o, _ in parts], 1), torch.cat([l for _, l in parts], 1)
    plan = TilePlan(layout, q.shape[0], q.shape[1], k.shape[1], key_padding_mask, chunk_elems)
    return _BlockSparseAttention.apply(q, k, v, plan, scale, softcap)
