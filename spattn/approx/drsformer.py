"""DRSformer's multi-ratio top-k sparse attention (TKSA; Chen et al., CVPR 2023, "Learning a Sparse
Transformer Network for Effective Image Deraining"; official code cschenxiang/DRSformer, class ``Attention``).

Official operator, per head::

    q, k = L2-normalize(q), L2-normalize(k)
    A = (q @ kᵀ) * temperature                       # temperature: learned per head, init 1
    for r in (1/2, 2/3, 3/4, 4/5):
        keep the int(n * r) largest entries of each row of A (torch.topk + scatter), others -> -inf
        O_r = softmax(A) @ v
    out = w_1 O_1 + w_2 O_2 + w_3 O_3 + w_4 O_4      # w_i learned scalars, init 0.2, unconstrained

**Deviation:** the original is Restormer-style *transposed* attention — its "tokens" are the
``C = dim/heads`` channels and the vectors normalised are over the ``H·W`` pixels. This module applies
the same operator to ordinary *token* attention: ``q, k, v [B, H, N, D]``, each token's ``D``-vector is
normalised and each query keeps ``int(Nk · r)`` keys (at least 1). As in the official code exactly
that many are kept (ties resolved by lower key index, see :func:`spattn.patterns.topk.topk_selections`
with ``ties="first"``), the selection carries no gradient, and gradients reach q, k, v, the
temperatures and the mixing weights through the kept entries. Key padding and (an extension, not in
the paper) causal masking are applied before the selection; rows with fewer allowed keys keep them all.
Each ratio's attention runs on the token-sparse kernel, so memory is ``O(chunk · Nk · r)``; like the
original, the top-k is a selection operator, not a FLOP saving (the scores are computed densely).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import int_at_least
from ..kernels.tokensparse import tokensparse_attention
from ..patterns.topk import topk_selections
from ..registry import register
from .base import ApproxAttention
from .linear_core import check_qkv

__all__ = ["DRSformerTopK"]

PAPER_RATIOS = (1 / 2, 2 / 3, 3 / 4, 4 / 5)


@register(
    "drsformer_topk",
    kind="dynamic",
    description="DRSformer multi-ratio top-k attention mixed by learned weights (on tokens, not channels)",
    paper="Chen et al. 2023, Learning a Sparse Transformer Network for Effective Image Deraining (CVPR)",
)
class DRSformerTopK(ApproxAttention):
    """Multi-ratio top-k softmax attention with learned mixing weights (see module docstring).

    Args:
        ratios: fractions ``r`` in (0, 1] of the keys each query keeps, one attention per ratio.
        normalize: L2-normalise q and k (cosine scores times a learned temperature), as the paper.
        heads: number of query heads (context parameter); one temperature per head, or a single
            shared temperature when None.

    ``forward(q [B, Hq, Nq, D], k, v [B, Hkv, Nk, D]) -> [B, Hq, Nq, D]``.
    """

    name = "drsformer_topk"
    supports_causal = True

    def __init__(self, ratios: Sequence[float] = PAPER_RATIOS, normalize: bool = True, heads: Optional[int] = None):
        super().__init__()
        if not isinstance(ratios, (tuple, list)) or not ratios:
            raise TypeError(f"drsformer_topk: ratios must be a non-empty tuple of numbers in (0, 1], got {ratios!r}")
        for r in ratios:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
                raise ValueError(f"drsformer_topk: every ratio must lie in (0, 1], got {r!r}")
        if not isinstance(normalize, bool):
            raise TypeError(f"drsformer_topk: normalize must be a bool, got {normalize!r}")
        int_at_least("drsformer_topk: heads", heads, allow_none=True)
        self.ratios, self.normalize, self.heads = tuple(float(r) for r in ratios), normalize, heads
        self.weights = nn.Parameter(torch.full((len(ratios),), 0.2))
        self.temperature = nn.Parameter(torch.ones(heads or 1))

    def keys_kept(self, kv_len: int) -> list[int]:
        """Keys per query for each ratio: ``max(1, int(kv_len * r))``."""
        return [max(1, int(kv_len * r)) for r in self.ratios]

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, key_padding_mask: Optional[Tensor] = None
    ) -> Tensor:
        check_qkv(self.name, q, k, v, key_padding_mask, causal)
        if k.shape != v.shape:
            raise ValueError(
                f"drsformer_topk: expected q [B, Hq, Nq, D], k = v [B, Hkv, Nk, D], got "
                f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
            )
        if self.heads is not None and q.shape[1] != self.heads:
            raise ValueError(f"drsformer_topk: built for heads={self.heads} but q has {q.shape[1]} heads")
        if self.normalize:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        q = q * self.temperature.to(q.dtype).view(-1, 1, 1)  # logits = (q·k) * temperature_h
        selections = topk_selections(
            q, k, self.keys_kept(k.shape[2]), causal=causal, key_padding_mask=key_padding_mask, ties="first"
        )
        out = 0
        for weight, selection in zip(self.weights, selections):
            out = out + weight.to(q.dtype) * tokensparse_attention(
                q, k, v, selection, scale=1.0, key_padding_mask=key_padding_mask
            )
        return out
