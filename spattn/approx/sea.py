"""SEA: Sparse linear attention with an Estimated Attention mask (Lee et al., ICLR 2024, arXiv 2310.01777).

SEA estimates each query's attention over ``chunks`` compressed key columns with linear-cost
Performer attention, keeps the top-``k`` compressed columns per query, expands them back to key
positions (compressed column ``c`` <-> keys ``[c*s, (c+1)*s)``, ``s = ceil(N / chunks)``) and runs
exact softmax attention on that sparse mask::

    est_i[c] = sum_j phi(q_i).phi(k_j) [j in chunk c] / sum_j phi(q_i).phi(k_j)     (Performer, V = one-hot chunk)
    mask_i   = union of the top-k chunks of est_i
    out_i    = softmax over mask_i of q_i . k_j / sqrt(D), times v_j

What is simplified (the definition allows this much without training a separate estimator):
the released model refines the compressed estimate with a learned CNN decoder and trains it by
knowledge distillation (KL to the teacher's attention + output MSE); here the estimate is the raw
Performer one, there is no decoder and no KD loss, and the optional merge of the Performer output
into the result is not done. Causal: the estimate is causal linear attention (chunked scan), chunks
entirely in the future are excluded and the query's own chunk is always kept, so every row has a key.
The chunk choice carries no gradient; gradients flow through the exact attention on the mask.
Cost: ``O(N * chunks * features)`` for the estimate, ``O(N * k * s * D)`` for the attention.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._checks import int_at_least
from .._heads import expand_kv
from ..functional import attention
from ..registry import register
from ..selection import TokenSelection
from .base import ApproxAttention
from .featuremaps import FavorProjection, favor_pair
from .linear_core import check_qkv, chunked_causal, compute_dtype, noncausal

__all__ = ["SEA", "sea_estimate", "sea_selection"]


def sea_estimate(
    q: Tensor, k: Tensor, projection: Tensor, chunk_size: int, causal: bool, key_padding_mask: Optional[Tensor] = None
) -> Tensor:
    """Performer estimate of each query's attention mass per key chunk: ``[B, Hq, N, C]`` (rows sum to 1)."""
    B, Hq, N, D = q.shape
    ct = compute_dtype(q.dtype)
    C = -(-N // chunk_size)
    phi_q, phi_k, _ = favor_pair(
        q.detach().to(ct), expand_kv(k, Hq).detach().to(ct), projection.to(ct), key_padding_mask
    )
    onehot = torch.nn.functional.one_hot(torch.arange(N, device=q.device) // chunk_size, C).to(ct)
    w = torch.cat([onehot, torch.ones(N, 1, dtype=ct, device=q.device)], -1).expand(B, Hq, N, C + 1)
    est = chunked_causal(phi_q, phi_k, w)[0] if causal else noncausal(phi_q, phi_k, w)
    den = est[..., C:]
    return torch.where(den > 0, est[..., :C] / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))


def sea_selection(
    est: Tensor, k: int, chunk_size: int, n: int, causal: bool, key_padding_mask: Optional[Tensor] = None
) -> TokenSelection:
    """Top-``k`` chunks per query of ``est [B, H, N, C]`` expanded to key positions (a TokenSelection)."""
    B, H, N, C = est.shape
    dev = est.device
    scores = est.clone()
    starts = torch.arange(C, device=dev) * chunk_size
    if key_padding_mask is not None:
        real_chunk = torch.nn.functional.pad(key_padding_mask, (0, C * chunk_size - n)).view(B, C, chunk_size).any(-1)
        scores = scores.masked_fill(~real_chunk[:, None, None, :], float("-inf"))
    if causal:
        pos = torch.arange(N, device=dev)
        scores = scores.masked_fill(starts[None, :] > pos[:, None], float("-inf"))
        own = torch.nn.functional.one_hot(pos // chunk_size, C).bool()
        scores = scores.masked_fill(own, float("inf"))  # own chunk always kept: never an empty row
    kk = min(k, C)
    top = scores.topk(kk, dim=-1)
    chosen = top.indices.masked_fill(top.values == float("-inf"), -1)  # [B, H, N, kk]
    idx = chosen.unsqueeze(-1) * chunk_size + torch.arange(chunk_size, device=dev)
    bad = (chosen.unsqueeze(-1) < 0) | (idx >= n)
    if causal:
        bad = bad | (idx > torch.arange(N, device=dev).view(1, 1, N, 1, 1))
    idx = idx.masked_fill(bad, -1).flatten(-2)
    return TokenSelection(idx, q_len=N, kv_len=n)


@register(
    "sea",
    kind="hybrid",
    description="SEA: Performer-estimated compressed attention -> top-k chunk mask -> exact attention on the mask",
    paper="Lee et al. 2024, SEA: Sparse Linear Attention with Estimated Attention Mask",
)
class SEA(ApproxAttention):
    """``sea(k=7, chunks=128, features=64, seed=0)``: keep ``k`` of ``chunks`` compressed key columns per query."""

    name = "sea"
    supports_causal = True

    def __init__(self, k: int = 7, chunks: int = 128, features: int = 64, seed: int = 0):
        super().__init__()
        int_at_least("sea: k", k)
        int_at_least("sea: chunks", chunks)
        self.k, self.chunks, self.features, self.seed = k, chunks, features, seed
        self.projection = FavorProjection(features, seed, None, owner="sea")
        self.last_selection: Optional[TokenSelection] = None

    def forward(self, q, k, v, *, causal: bool = False, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        check_qkv("sea", q, k, v, key_padding_mask)
        n = k.shape[2]
        if q.shape[2] != n:
            raise ValueError(f"sea: self-attention only, q has {q.shape[2]} tokens and k {n}")
        chunk_size = -(-n // min(self.chunks, n))
        est = sea_estimate(q, k, self.projection(q.shape[-1], q.device), chunk_size, causal, key_padding_mask)
        sel = sea_selection(est, self.k, chunk_size, n, causal, key_padding_mask)
        self.last_selection = sel
        return attention(q, k, v, sel, key_padding_mask=key_padding_mask)
