"""The oracle: dense masked softmax attention over a Layout (quadratic memory, any dtype incl. fp64)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..layout import Layout

__all__ = ["reference_attention"]


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
