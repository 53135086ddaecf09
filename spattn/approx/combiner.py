"""Combiner: full attention at sub-quadratic cost by structured factorisation (Ren et al., NeurIPS 2021).

Combiner writes attention as a conditional expectation over a partition ``{Omega_i^0, Omega_i^1, ...}``
of the support of query ``i`` (every key, or every key ``j <= i`` when causal)::

    A(x_i) = sum_{j in Omega_i^0} p(j|i) v_j  +  sum_r p(Omega_i^r | i) * E_{q(j | Omega_i^r)}[v_j]

Direct keys ``Omega_i^0`` are scored ``q_i . k_j``; a region ``Omega`` is summarised by an
*abstraction* key ``k_Omega`` (max-pool of its keys, per dimension) and an abstraction value
``v_Omega = sum_{j in Omega} softmax_j(q_Omega . k_j) v_j`` (``q_Omega`` the max-pool of its
queries), computed once per region. Direct and abstraction logits share ONE softmax. Every key of
the support keeps a non-zero probability ``p(Omega|i) q(j|Omega)``: full attention, no key dropped.

Modes (``combiner(mode=..., segment=L)``):

* ``"fixed"`` (Combiner-Fixed, sqrt decomposition): segments of ``L`` tokens; direct = own segment
  (``j <= i`` when causal), abstractions = every other segment (only earlier ones when causal).
  The own segment is never also an abstraction (the released TF non-causal code double counts it).
* ``"logsparse"`` (Combiner-Logsparse, O(n log n)): direct = the query itself; at level ``l`` the
  aligned span ``[(floor(i/2^l) - 1) 2^l, floor(i/2^l) 2^l)`` is an abstraction iff bit ``l`` of ``i``
  is set, which tiles ``[0, i)`` exactly (Fenwick decomposition). Non-causal adds the mirror image:
  the same decomposition of the reversed sequence tiles ``(i, n)`` (our extension; the paper's
  logsparse is autoregressive).
* ``"axial"`` (Combiner-Axial, row-major): the sequence is a grid of rows of ``L`` tokens. Direct =
  own row (``j <= i`` when causal); abstraction of row ``t`` as seen from column ``l``: value
  ``row_out[t, l] = sum_j rowprob[t, l, j] v_{t, j}`` with the UNMASKED in-row attention of token
  ``(t, l)`` (the whole earlier row is in the past), key ``sum_j rowprob[t, l, j] k_{t, j}``
  (``row_summary="wsum"``, the parameter-free option of the released code) or the max-pooled row
  keys (``"max"``). Query ``(s, l)`` sees rows ``t < s`` (every ``t != s`` when not causal).
  When ``N`` is not a multiple of ``L`` the last row is short; its summary seen from a column past
  the end uses a zero query (uniform weights over that row's keys).

Shapes: ``q [B, Hq, N, D]``, ``k, v [B, Hkv, N, D]`` (grouped-query: ``Hq % Hkv == 0``), ``key_padding_mask``
bool ``[B, N]`` (True = real). Padded keys are excluded from direct scores, pooling and region
attention; a region without real keys is dropped; a query with no visible key outputs zeros.
Cost: fixed/axial ``O(N sqrt(N) D)`` with ``L ~ sqrt(N)``, logsparse ``O(N log N D)``; nothing is N x N.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._heads import expand_kv
from .._checks import int_at_least
from ..registry import register
from .base import ApproxAttention
from .linear_core import check_qkv, compute_dtype

__all__ = ["Combiner", "combiner_attention", "MODES"]

MODES = ("fixed", "logsparse", "axial")
_NEG = float("-inf")


def _masked_max(x: Tensor, real: Tensor, dim: int) -> Tensor:
    """Max over ``dim`` of ``x [..., M, D]`` counting only ``real [..., M]`` entries (0 where none)."""
    filled = x.masked_fill(~real.unsqueeze(-1), _NEG)
    out = filled.amax(dim=dim)
    return torch.where(torch.isfinite(out), out, torch.zeros_like(out))


def _region_summary(q: Tensor, k: Tensor, v: Tensor, real: Tensor, scale: float):
    """Abstraction key/value of regions laid out as ``[..., R, M, D]`` (R regions of M tokens).

    ``real [..., R, M]``. Returns ``k_Omega [..., R, D]`` (max-pool), ``v_Omega [..., R, D]``
    (``softmax(q_Omega . k_j) v_j`` over the region) and ``valid [..., R]`` (region has a real key).
    """
    k_abs = _masked_max(k, real, dim=-2)
    q_abs = _masked_max(q, real, dim=-2)
    logits = (q_abs.unsqueeze(-2) @ k.transpose(-1, -2)).squeeze(-2) * scale  # [..., R, M]
    valid = real.any(-1)
    logits = logits.masked_fill(~real, _NEG).masked_fill(~valid.unsqueeze(-1), 0.0)
    probs = torch.softmax(logits, dim=-1) * valid.unsqueeze(-1)
    v_abs = (probs.unsqueeze(-2) @ v).squeeze(-2)
    return k_abs, v_abs, valid


def _joint_softmax(logits: Tensor) -> Tensor:
    """Softmax over the last axis; rows where every logit is -inf give zeros (never NaN)."""
    empty = ~torch.isfinite(logits).any(-1, keepdim=True)
    probs = torch.softmax(logits.masked_fill(empty, 0.0), dim=-1)
    return probs.masked_fill(empty, 0.0)


def _pad_to(x: Tensor, length: int, dim: int) -> Tensor:
    extra = length - x.shape[dim]
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - (dim % x.dim())) + [0, extra]
    return F.pad(x, pad)


def _fixed(q, k, v, real, causal: bool, L: int, scale: float) -> Tensor:
    B, H, N, D = q.shape
    S = -(-N // L)
    qs, ks, vs = (_pad_to(t, S * L, 2).reshape(B, H, S, L, D) for t in (q, k, v))
    rs = _pad_to(real, S * L, 2).reshape(real.shape[0], real.shape[1], S, L).expand(B, H, S, L)
    k_abs, v_abs, valid = _region_summary(qs, ks, vs, rs, scale)  # [B, H, S, D], [B, H, S]
    local = (qs @ ks.transpose(-1, -2)) * scale  # [B, H, S, L, L]
    local_ok = rs.unsqueeze(-2)
    pos = torch.arange(L, device=q.device)
    if causal:
        local_ok = local_ok & (pos[None, :] <= pos[:, None])
    local = local.masked_fill(~local_ok, _NEG)
    prev = (qs.reshape(B, H, S * L, D) @ k_abs.transpose(-1, -2)).reshape(B, H, S, L, S) * scale
    seg = torch.arange(S, device=q.device)
    other = (seg[None, :] < seg[:, None]) if causal else (seg[None, :] != seg[:, None])  # [own, region]
    prev_ok = other[None, None, :, None, :] & valid[:, :, None, None, :]
    prev = prev.masked_fill(~prev_ok, _NEG)
    probs = _joint_softmax(torch.cat([local, prev], dim=-1))
    out = probs[..., :L] @ vs + (probs[..., L:].reshape(B, H, S * L, S) @ v_abs).reshape(B, H, S, L, D)
    return out.reshape(B, H, S * L, D)[:, :, :N]


def _logsparse_prefix(q, k, v, real, scale: float):
    """Abstractions tiling ``[0, i)``: logits ``[B, H, N, levels]`` and values ``[B, H, N, levels, D]``."""
    B, H, N, D = q.shape
    levels = max(1, math.ceil(math.log2(N))) if N > 1 else 0
    pos = torch.arange(N, device=q.device)
    logits, values = [], []
    for lvl in range(levels):
        span = 1 << lvl
        R = -(-N // span)
        qr, kr, vr = (_pad_to(t, R * span, 2).reshape(B, H, R, span, D) for t in (q, k, v))
        rr = _pad_to(real, R * span, 2).reshape(real.shape[0], real.shape[1], R, span).expand(B, H, R, span)
        k_abs, v_abs, valid = _region_summary(qr, kr, vr, rr, scale)
        region = (pos >> lvl) - 1  # the span just before the aligned span holding i
        used = ((pos >> lvl) & 1).bool()
        idx = region.clamp(min=0)
        kg = k_abs[:, :, idx]  # [B, H, N, D]
        lg = (q * kg).sum(-1) * scale
        ok = used[None, None] & valid[:, :, idx]
        logits.append(lg.masked_fill(~ok, _NEG))
        values.append(v_abs[:, :, idx])
    if not logits:
        return q.new_zeros(B, H, N, 0), q.new_zeros(B, H, N, 0, D)
    return torch.stack(logits, -1), torch.stack(values, -2)


def _logsparse(q, k, v, real, causal: bool, scale: float) -> Tensor:
    B, H, N, D = q.shape
    realx = real.expand(B, H, N)
    direct = ((q * k).sum(-1) * scale).masked_fill(~realx, _NEG).unsqueeze(-1)  # the query itself
    lg, vals = _logsparse_prefix(q, k, v, real, scale)
    parts_l, parts_v = [direct, lg], [v.unsqueeze(-2), vals]
    if not causal:
        flip = lambda t: t.flip(2)  # noqa: E731
        lg_b, vals_b = _logsparse_prefix(flip(q), flip(k), flip(v), flip(real), scale)
        parts_l.append(flip(lg_b))
        parts_v.append(flip(vals_b))
    probs = _joint_softmax(torch.cat(parts_l, -1))
    return (probs.unsqueeze(-2) @ torch.cat(parts_v, -2)).squeeze(-2)


def _axial(q, k, v, real, causal: bool, L: int, scale: float, row_summary: str) -> Tensor:
    B, H, N, D = q.shape
    S = -(-N // L)
    qs, ks, vs = (_pad_to(t, S * L, 2).reshape(B, H, S, L, D) for t in (q, k, v))
    rs = _pad_to(real, S * L, 2).reshape(real.shape[0], real.shape[1], S, L).expand(B, H, S, L)
    row_logits = (qs @ ks.transpose(-1, -2)) * scale  # [B, H, S, L, L]
    key_ok = rs.unsqueeze(-2)
    # unmasked in-row attention: summaries of earlier rows see the whole row
    row_valid = rs.any(-1)  # [B, H, S]
    row_probs = _joint_softmax(row_logits.masked_fill(~key_ok, _NEG))
    row_out = row_probs @ vs  # [B, H, S, L, D]: value of row t's abstraction seen from column l
    if row_summary == "wsum":
        row_key = row_probs @ ks
    else:
        row_key = _masked_max(ks, rs, dim=-2).unsqueeze(-2).expand(B, H, S, L, D)
    direct_ok = key_ok
    pos = torch.arange(L, device=q.device)
    if causal:
        direct_ok = direct_ok & (pos[None, :] <= pos[:, None])
    direct = row_logits.masked_fill(~direct_ok, _NEG)
    abs_logits = torch.einsum("bhsld,bhtld->bhslt", qs, row_key) * scale  # query (s, l), row t
    rows = torch.arange(S, device=q.device)
    other = (rows[None, :] < rows[:, None]) if causal else (rows[None, :] != rows[:, None])
    abs_ok = other[None, None, :, None, :] & row_valid[:, :, None, None, :]
    abs_logits = abs_logits.masked_fill(~abs_ok, _NEG)
    probs = _joint_softmax(torch.cat([direct, abs_logits], -1))
    out = probs[..., :L] @ vs + torch.einsum("bhslt,bhtld->bhsld", probs[..., L:], row_out)
    return out.reshape(B, H, S * L, D)[:, :, :N]


def combiner_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mode: str = "fixed",
    segment: Optional[int] = None,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    row_summary: str = "wsum",
    scale: Optional[float] = None,
) -> Tensor:
    """Functional Combiner (see module docstring). ``segment=None`` means ``ceil(sqrt(N))``.

    Returns ``[B, Hq, N, D]`` in the dtype of ``q`` (computed in fp32, fp64 for fp64 input).
    """
    check_qkv("combiner", q, k, v, key_padding_mask, causal)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"combiner: self-attention only, q has {q.shape[2]} tokens and k {k.shape[2]}")
    if mode not in MODES:
        raise ValueError(f"combiner: mode must be one of {', '.join(MODES)}; got {mode!r}")
    if row_summary not in ("wsum", "max"):
        raise ValueError(f"combiner: row_summary must be 'wsum' or 'max', got {row_summary!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"combiner: causal must be a bool, got {causal!r}")
    B, Hq, N, D = q.shape
    if segment is None:
        segment = max(1, math.isqrt(N - 1) + 1) if N > 1 else 1
    scale = D**-0.5 if scale is None else float(scale)
    ct = compute_dtype(q.dtype)
    qf, kf, vf = q.to(ct), expand_kv(k, Hq).to(ct), expand_kv(v, Hq).to(ct)
    real = (
        torch.ones(1, 1, N, dtype=torch.bool, device=q.device)
        if key_padding_mask is None
        else key_padding_mask[:, None, :].to(q.device)
    )
    if mode == "fixed":
        out = _fixed(qf, kf, vf, real, causal, segment, scale)
    elif mode == "logsparse":
        out = _logsparse(qf, kf, vf, real, causal, scale)
    else:
        out = _axial(qf, kf, vf, real, causal, segment, scale, row_summary)
    return out.to(q.dtype)


@register(
    "combiner",
    kind="approximation",
    description="Combiner: direct + max-pooled abstraction logits in one softmax (fixed / logsparse / axial)",
    paper="Ren et al. 2021, Combiner: Full Attention Transformer with Sparse Computation Cost",
)
class Combiner(ApproxAttention):
    """``combiner(mode="fixed"|"logsparse"|"axial", segment=None, row_summary="wsum")``.

    ``segment`` is the segment length of "fixed" and the row length of "axial" (``None`` =
    ``ceil(sqrt(N))``, the sqrt decomposition); "logsparse" has no length parameter.
    ``row_summary`` picks the abstraction key of "axial" rows (see module docstring).
    """

    name = "combiner"
    supports_causal = True

    def __init__(self, mode: str = "fixed", segment: Optional[int] = None, row_summary: str = "wsum"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"combiner: mode must be one of {', '.join(MODES)}; got {mode!r}")
        int_at_least("combiner: segment", segment, allow_none=True)
        if mode == "logsparse" and segment is not None:
            raise ValueError("combiner: mode='logsparse' takes no segment (its spans are powers of two)")
        if row_summary not in ("wsum", "max"):
            raise ValueError(f"combiner: row_summary must be 'wsum' or 'max', got {row_summary!r}")
        self.mode, self.segment, self.row_summary = mode, segment, row_summary

    def forward(self, q, k, v, *, causal: bool = False, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        return combiner_attention(
            q,
            k,
            v,
            mode=self.mode,
            segment=self.segment,
            causal=causal,
            key_padding_mask=key_padding_mask,
            row_summary=self.row_summary,
        )
