"""The oracle: dense masked softmax attention over a Layout (quadratic memory, any dtype incl. fp64)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..layout import Layout

__all__ = ["reference_attention", "float64_attention", "nan_reach"]


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: Layout,
    *,
    scale: Optional[float] = None,
    key_padding_mask: Optional[Tensor] = None,
    return_lse: bool = False,
    softcap: Optional[float] = None,
):
    """softmax(q kᵀ · scale restricted to ``layout``) v, computed densely (float32 for half inputs).

    ``softcap``: scores ``s`` (already scaled) become ``softcap * tanh(s / softcap)`` before masking
    and softmax (Gemma 2's attention logit soft-capping).

    q ``[B, Hq, Nq, D]``, k/v ``[B, Hkv, Nk, D]`` (GQA: query head h uses kv head h // (Hq/Hkv)),
    ``key_padding_mask [B, Nk]`` bool (True = real key). Rows with no allowed key give zeros
    and log-sum-exp ``-inf``. Excluded pairs are exactly excluded (score ``-inf``, value never read), so
    NaN in q, k or v reaches only the rows that see it. Returns ``out [B, Hq, Nq, D]`` and, if asked, ``lse [B, Hq, Nq]``.
    """
    batch, hq, nq, dim = q.shape
    group = hq // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    allowed = layout.check().to_dense()  # [B', H', Nq, Nk]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    # half precisions score, normalise and sum in float32, as SDPA does (fp16 scores of large inputs
    # overflow to inf otherwise); the output is returned in the input dtype
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    out_dtype = q.dtype
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, float("-inf"))
    empty = ~allowed.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(empty, 0.0)  # keeps logsumexp and its gradient finite
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores - lse).masked_fill(empty, 0.0)
    v_nan = torch.isnan(v)
    if bool(v_nan.any()):
        # 0 · NaN is NaN: a NaN value reaches exactly the rows allowed to see its key, in its column
        out = torch.matmul(probs, v.masked_fill(v_nan, 0.0))
        seen = torch.matmul(allowed.to(v.dtype), v_nan.to(v.dtype)) > 0
        out = out.masked_fill(seen, float("nan"))
    else:
        out = torch.matmul(probs, v)
    out = out.to(out_dtype)
    if not return_lse:
        return out
    lse = (
        lse.squeeze(-1)
        .to(torch.float64 if out_dtype == torch.float64 else torch.float32)
        .masked_fill(empty.squeeze(-1), float("-inf"))
    )
    return out, lse.expand(batch, hq, nq)


def float64_attention(q, k, v, dense, key_padding_mask=None, scale=None):
    """Dense masked softmax attention computed in float64 from a bool mask ``dense [B'|1, H'|1, Nq, Nk]``,
    returned in q's dtype: the exact answer that rounded kernels (bf16, fp32) are measured against.
    q ``[B, Hq, Nq, D]``, k/v ``[B, Hkv, Nk, D]``; rows without an allowed key give zeros."""
    g = q.shape[1] // k.shape[1]
    qd, kd, vd = (t.double() for t in (q, k, v))
    kd, vd = kd.repeat_interleave(g, 1), vd.repeat_interleave(g, 1)
    s = (qd @ kd.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    m = dense
    if key_padding_mask is not None:
        m = m & key_padding_mask[:, None, None, :]
    s = s.masked_fill(~m, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ vd).to(q.dtype)


def nan_reach(allowed, q, k, v, where, pos):
    """Which outputs ``[B, Hq, Nq, D]`` the dense definition makes NaN when one element of q, k or v is NaN.

    ``where`` in ``"q" | "k" | "v"`` names the poisoned tensor, ``pos = (b, h, i, c)`` the element (``h`` a kv
    head for k and v); ``allowed [B|1, Hq|1, Nq, Nk]`` are the pairs computed. A NaN query poisons its whole
    row if it sees any key; a NaN key every row of its kv-head group that sees it; a NaN value only
    channel ``c`` of those rows (excluded pairs never read their key or value)."""
    b, hq, nq, d = q.shape
    g = hq // k.shape[1]
    allowed = allowed.expand(b, hq, nq, k.shape[2])
    bi, h, i, c = pos
    nan = torch.zeros(b, hq, nq, d, dtype=torch.bool)
    if where == "q":
        nan[bi, h, i] = bool(allowed[bi, h, i].any())
    else:  # key / value position i of kv head h: every query head of the group that sees it
        heads = slice(h * g, (h + 1) * g)
        rows = allowed[bi, heads, :, i]  # [g, Nq]
        if where == "k":
            nan[bi, heads] = rows[..., None].expand(-1, -1, d)
        else:
            nan[bi, heads, :, c] = rows
    return nan
