"""Cluster-window attention: executes a :class:`~spattn.selection.ClusterSelection` (routing).

Routing Transformer (Roy et al. 2021, TACL, arXiv 2003.05997): per (batch, head) there are C windows,
each a sorted list of query positions ``query_indices [B, H', C, wq]`` and of key positions
``key_indices [B, H', C, wk]``. Inside a window dense softmax attention runs between its queries and
its keys (with ``causal``: key position ``j`` visible to query position ``i`` iff
``j <= i + Nk - Nq``). A query chosen by several windows receives the **mean** of their outputs,
a query chosen by none receives zeros (in the paper only the local heads see it).

Precise semantics (also what the ``reference=True`` oracle computes):

* A window is a *set* of positions: a position repeated inside one window's query (or key) list
  counts once. Routing's balanced top-w never repeats; the causal-safe variant of
  :class:`spattn.patterns.routing.Routing` pads short windows by repeating a member.
* A query contributes to the average only for windows in which it sees at least one key (after
  causality and ``key_padding_mask``); ``out = sum / count`` with ``count`` that number, zeros
  where it is 0. The paper's code divides by ``count + 1e-2`` (lucidrains: ``+ 1e-5``), which
  shrinks every output by ~1% and leaves a gradient scale that depends on an arbitrary constant;
  we divide exactly, which is the same thing for ``count >= 1`` up to that shrink factor.

Memory is ``O(B · H · C · wq · wk)`` = ``O(N · w)`` for balanced windows, never ``N²``.
No log-sum-exp exists for an average of softmaxes, so ``return_lse=True`` is a ``ValueError``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_kind
from ..selection import ClusterSelection
from ._finite import nan_exact

__all__ = ["clustered_attention"]


def _check(q: Tensor, k: Tensor, v: Tensor, sel: ClusterSelection, key_padding_mask: Optional[Tensor]) -> None:
    check_kind("clustered_attention: selection", sel, ClusterSelection)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"clustered_attention: {name} must be a 4-D tensor [B, H, N, D]")
    b, hq, nq, d = q.shape
    _, hkv, nk, _ = k.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or hq % hkv:
        raise ValueError(
            f"clustered_attention: expected q [B, Hq, Nq, D], k = v [B, Hkv, Nk, D] with Hq % Hkv == 0; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if (sel.q_len, sel.kv_len) != (nq, nk):
        raise ValueError(
            f"clustered_attention: selection is for (Nq, Nk) = {(sel.q_len, sel.kv_len)} but q, k have {(nq, nk)}"
        )
    if sel.batch not in (1, b):
        raise ValueError(f"clustered_attention: selection batch {sel.batch} must be 1 or B={b}")
    if sel.heads not in (1, hq):
        raise ValueError(f"clustered_attention: selection heads {sel.heads} must be 1 or Hq={hq}")
    if sel.device != q.device:
        raise ValueError(f"clustered_attention: selection is on {sel.device} but q is on {q.device}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("clustered_attention: key_padding_mask must be a bool tensor [B, Nk] (True = real key)")
        if tuple(key_padding_mask.shape) != (b, nk):
            raise ValueError(
                f"clustered_attention: key_padding_mask must have shape {(b, nk)}, got {tuple(key_padding_mask.shape)}"
            )


def _first_occurrence(idx: Tensor) -> Tensor:
    """bool like ``idx [..., w]`` (sorted along the last dim): True at the first slot of each position."""
    first = torch.ones_like(idx, dtype=torch.bool)
    first[..., 1:] = idx[..., 1:] != idx[..., :-1]
    return first


def _sorted_windows(sel: ClusterSelection) -> tuple[Tensor, Tensor]:
    """Window positions sorted ascending (patterns produce sorted windows; user-built ones may not be)."""
    return sel.query_indices.sort(dim=-1).values, sel.key_indices.sort(dim=-1).values


def clustered_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    selection: ClusterSelection,
    *,
    scale: Optional[float] = None,
    key_padding_mask: Optional[Tensor] = None,
    return_lse: bool = False,
    reference: bool = False,
) -> Tensor:
    """Attention inside routing windows, outputs averaged over the windows of each query.

    Args:
        q: ``[B, Hq, Nq, D]``; k, v: ``[B, Hkv, Nk, D]`` (``Hq % Hkv == 0``: query head ``h`` reads
            key/value head ``h // (Hq / Hkv)``).
        selection: windows ``[B|1, Hq|1, C, w]`` (see module docstring for the exact semantics).
        scale: logit scale, default ``1/sqrt(D)``.
        key_padding_mask: bool ``[B, Nk]``, True for real keys.
        return_lse: not supported (an average of softmaxes has no single log-sum-exp): ValueError.
        reference: run the plain per-window loop (the oracle for tests).

    Returns ``[B, Hq, Nq, D]``.
    """
    if return_lse:
        raise ValueError(
            "clustered_attention: return_lse=True is not supported for routing windows: a query's output is the "
            "average of several window softmaxes, which has no single log-sum-exp"
        )
    _check(q, k, v, selection, key_padding_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if reference:
        return _reference(q, k, v, selection, scale, key_padding_mask)
    return nan_exact(lambda q, k, v: _windows(q, k, v, selection, scale, key_padding_mask), q, k, v)


def _windows(q, k, v, sel, scale, key_padding_mask):
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    qi, ki = _sorted_windows(sel)
    c, wq, wk = qi.shape[2], qi.shape[3], ki.shape[3]
    qi = qi.expand(b, hq, c, wq)
    ki = ki.expand(b, hq, c, wk)

    # gather per-window q [B, Hq, C, wq, D]; k, v read through their kv head without repeating it
    qw = torch.gather(q, 2, qi.reshape(b, hq, c * wq, 1).expand(-1, -1, -1, d)).view(b, hq, c, wq, d)
    kidx = ki.reshape(b, hkv, g * c * wk, 1).expand(-1, -1, -1, d)
    kw = torch.gather(k, 2, kidx).view(b, hq, c, wk, d)
    vw = torch.gather(v, 2, kidx).view(b, hq, c, wk, d)

    first_q, first_k = _first_occurrence(qi), _first_occurrence(ki)
    args = (qw.reshape(b, hq * c, wq, d), kw.reshape(b, hq * c, wk, d), vw.reshape(b, hq * c, wk, d))
    distinct = key_padding_mask is None and bool(first_q.all()) and bool(first_k.all())
    if distinct and not sel.causal:
        # plain windows: every query sees every key of its window, no mask (SDPA's fused kernels)
        o = F.scaled_dot_product_attention(*args, scale=scale).view(b, hq, c, wq, d)
        weight = first_q
    elif distinct and nq == nk and wq == wk and torch.equal(qi, ki):
        # shared-QK causal windows: sorted identical positions make the position mask lower-triangular
        o = F.scaled_dot_product_attention(*args, is_causal=True, scale=scale).view(b, hq, c, wq, d)
        weight = first_q
    else:
        key_ok = first_k  # [B, Hq, C, wk]
        if key_padding_mask is not None:
            key_ok = key_ok & torch.gather(key_padding_mask[:, None, None, :].expand(b, hq, c, nk), 3, ki)
        allowed = key_ok[..., None, :].expand(b, hq, c, wq, wk)
        if sel.causal:
            allowed = allowed & (ki[..., None, :] <= qi[..., :, None] + (nk - nq))
        has_key = allowed.any(-1)  # [B, Hq, C, wq]
        # rows with no visible key: give them every key (finite softmax), zero their output below
        safe = allowed | ~has_key[..., None]
        o = F.scaled_dot_product_attention(*args, attn_mask=safe.reshape(b, hq * c, wq, wk), scale=scale)
        o = o.view(b, hq, c, wq, d)
        weight = has_key & first_q  # a repeated query slot counts once
    o = o * weight[..., None].to(o.dtype)
    flat = qi.reshape(b, hq, c * wq)
    total = o.new_zeros(b, hq, nq, d).scatter_add(2, flat[..., None].expand(-1, -1, -1, d), o.reshape(b, hq, c * wq, d))
    count = torch.zeros(b, hq, nq, dtype=o.dtype, device=o.device).scatter_add(
        2, flat, weight.reshape(b, hq, c * wq).to(o.dtype)
    )
    return total / count.clamp(min=1)[..., None]


def _reference(q, k, v, sel, scale, key_padding_mask):
    """Plain loop over (batch, head, window): dense softmax on the window's sets, then the mean."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    total = [[q.new_zeros(nq, d) for _ in range(hq)] for _ in range(b)]
    count = torch.zeros(b, hq, nq, dtype=q.dtype, device=q.device)
    for bi in range(b):
        for h in range(hq):
            sb, sh = bi if sel.batch > 1 else 0, h if sel.heads > 1 else 0
            for c in range(sel.clusters):
                qpos = torch.unique(sel.query_indices[sb, sh, c])
                kpos = torch.unique(sel.key_indices[sb, sh, c])
                if key_padding_mask is not None:
                    kpos = kpos[key_padding_mask[bi, kpos]]
                mask = torch.ones(len(qpos), len(kpos), dtype=torch.bool, device=q.device)
                if sel.causal:
                    mask = kpos[None, :] <= qpos[:, None] + (nk - nq)
                rows = mask.any(-1)
                if not bool(rows.any()):
                    continue
                qpos, mask = qpos[rows], mask[rows]
                logits = (q[bi, h, qpos] @ k[bi, h // g, kpos].T) * scale
                logits = logits.masked_fill(~mask, -math.inf)
                vals = v[bi, h // g, kpos]
                out = torch.softmax(logits, dim=-1) @ vals.nan_to_num(0.0, posinf=math.inf, neginf=-math.inf)
                # 0 · NaN is NaN: a NaN value reaches only the rows allowed to see its key
                out = out.masked_fill((mask.to(vals.dtype) @ torch.isnan(vals).to(vals.dtype)) > 0, math.nan)
                total[bi][h] = total[bi][h].index_add(0, qpos, out)
                count[bi, h, qpos] += 1
    stacked = torch.stack([torch.stack(row) for row in total])
    return stacked / count.clamp(min=1)[..., None]
