"""Pre-norm Transformer block around :class:`spattn.nn.Attention` (any registered mechanism).

``TransformerBlock(dim, heads, attention="window(size=32)")`` maps ``x [B, N, dim]`` to
``[B, N, dim]`` as ``x + Drop(Attn(LN(x)))`` then ``x + Drop(MLP(LN(x)))`` (pre-norm, Xiong et al.
2020, "On Layer Normalization in the Transformer Architecture"). ``mlp_ratio=0`` drops the MLP
(Zoology's MQAR attention baselines use ``nn.Identity`` as the state mixer).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..approx.base import AttentionLayer
from ..patterns.static import Dense
from .attention import Attention, check_dropout
from .positions import RotaryProjection

__all__ = ["TransformerBlock", "MLP"]


class MLP(nn.Module):
    """``x [.., dim]`` -> ``Linear(dim, hidden) -> GELU -> Dropout -> Linear(hidden, dim)``."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1, self.act, self.drop, self.fc2 = (
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class TransformerBlock(nn.Module):
    """Pre-norm attention + MLP block.

    Args:
        dim, heads: model width and attention heads (``kv_heads`` for GQA).
        attention: spec string of any registered mechanism (``None``/``"dense"`` = full attention).
        causal: causal attention (language models).
        max_len: longest sequence, passed to mechanisms that need it and to RoPE tables.
        mlp_ratio: hidden width of the MLP in multiples of ``dim`` (0 = no MLP).
        dropout: residual/MLP dropout; ``attn_dropout`` on the attention output.
        rope: rotate queries and keys with RoPE (needs ``max_len`` and an even head dim; not
            available for layer-level mechanisms that bring their own projections).
    After each forward ``aux_loss`` holds the attention's auxiliary loss (0 when it has none).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        attention: Optional[str] = None,
        *,
        causal: bool = False,
        max_len: Optional[int] = None,
        kv_heads: Optional[int] = None,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        rope: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        if (
            isinstance(mlp_ratio, bool)
            or not isinstance(mlp_ratio, (int, float))
            or not math.isfinite(mlp_ratio)
            or mlp_ratio < 0
        ):
            raise ValueError(f"TransformerBlock: mlp_ratio must be a finite number >= 0, got {mlp_ratio!r}")
        check_dropout("TransformerBlock", "dropout", dropout)
        check_dropout("TransformerBlock", "attn_dropout", attn_dropout)
        if not isinstance(rope, bool):
            raise TypeError(f"TransformerBlock: rope must be a bool, got {rope!r}")
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(
            dim,
            heads,
            attention,
            causal=causal,
            kv_heads=kv_heads,
            dropout=attn_dropout,
            backend=backend,
            max_len=max_len,
        )
        if rope:
            if max_len is None:
                raise ValueError("TransformerBlock: rope=True needs max_len")
            if isinstance(self.attn.mechanism, AttentionLayer):
                raise ValueError(
                    f"TransformerBlock: RoPE cannot be applied inside {self.attn.spec}, which brings its own "
                    "projections; use learned positions instead"
                )
            self.attn.q_proj = RotaryProjection(self.attn.q_proj, self.attn.heads, max_len)
            self.attn.k_proj = RotaryProjection(self.attn.k_proj, self.attn.kv_heads, max_len)
        self.drop = nn.Dropout(dropout)
        hidden = int(round(mlp_ratio * dim))
        self.norm2 = nn.LayerNorm(dim) if hidden else None
        self.mlp = MLP(dim, hidden, dropout) if hidden else None

        # the dense baseline runs on torch's fused SDPA (what a user would compare against), not on the
        # block-sparse kernel over an all-ones layout
        self.use_sdpa = isinstance(self.attn.mechanism, Dense) and self.attn.backend == "auto"

    @property
    def aux_loss(self) -> Tensor:
        return self.attn.aux_loss

    def _dense_sdpa(self, x: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        a = self.attn
        q = rearrange(a.q_proj(x), "b n (h d) -> b h n d", h=a.heads)
        k = rearrange(a.k_proj(x), "b n (h d) -> b h n d", h=a.kv_heads)
        v = rearrange(a.v_proj(x), "b n (h d) -> b h n d", h=a.kv_heads)
        if a.kv_heads != a.heads:
            k = k.repeat_interleave(a.heads // a.kv_heads, dim=1)
            v = v.repeat_interleave(a.heads // a.kv_heads, dim=1)
        mask = None
        if key_padding_mask is not None:
            mask = key_padding_mask[:, None, None, :]
            if a.causal:
                n = x.shape[1]
                mask = mask & torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=a.causal and mask is None)
        if mask is not None:  # rows without any visible key: zeros, as the spattn kernels return
            out = out.masked_fill(~mask.any(-1, keepdim=True), 0.0)
        a.aux_loss = x.new_zeros(())
        return a.dropout(a.out_proj(rearrange(out, "b h n d -> b n (h d)")))

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """``x [B, N, dim]``, ``key_padding_mask [B, N]`` bool (True = real token) -> ``[B, N, dim]``."""
        h = self.norm1(x)
        if self.use_sdpa:
            x = x + self.drop(self._dense_sdpa(h, key_padding_mask))
        else:
            x = x + self.drop(self.attn(h, key_padding_mask=key_padding_mask))
        if self.mlp is not None:
            x = x + self.drop(self.mlp(self.norm2(x)))
        return x
