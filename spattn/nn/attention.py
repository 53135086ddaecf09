"""Multi-head attention module running any registered mechanism."""

from __future__ import annotations

from typing import Optional, Union

import torch
from einops import rearrange
from torch import Tensor, nn

from .. import registry
from ..functional import BACKENDS, attention
from ..layout import Layout
from ..patterns import Pattern, pattern as make_pattern

__all__ = ["Attention"]


class Attention(nn.Module):
    """Multi-head (optionally grouped-query) self-attention with a pluggable mechanism.

    ``Attention(dim=512, heads=8, attention="window(size=256)", causal=True)`` maps
    ``x [B, N, dim]`` to ``[B, N, dim]``. ``attention`` is a spec string or a :class:`Pattern`
    (``None`` = dense). ``kv_heads`` < ``heads`` gives grouped-query attention (Ainslie et al. 2023).
    Layouts of static patterns are cached per (length, causal, device). Mechanisms with auxiliary
    losses report them on ``self.aux_loss`` after each forward (0 for static patterns).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        attention: Union[None, str, Pattern] = None,
        *,
        causal: bool = False,
        kv_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        bias: bool = False,
        dropout: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        for name, val in (("dim", dim), ("heads", heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"Attention: {name} must be a positive int, got {val!r}")
        kv_heads = heads if kv_heads is None else kv_heads
        if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"Attention: kv_heads must be a positive divisor of heads={heads}, got {kv_heads!r}")
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"Attention: dim={dim} must be divisible by heads={heads} (or pass head_dim)")
            head_dim = dim // heads
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Attention: dropout must lie in [0, 1), got {dropout}")
        if backend not in BACKENDS:
            raise ValueError(f"Attention: backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        if not isinstance(causal, bool):
            raise TypeError(f"Attention: causal must be a bool, got {causal!r}")
        self.dim, self.heads, self.kv_heads, self.head_dim = dim, heads, kv_heads, head_dim
        self.causal, self.backend = causal, backend
        self.mechanism = None if attention is None else make_pattern(attention)
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=bias)
        self.out_proj = nn.Linear(heads * head_dim, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.aux_loss: Tensor = torch.zeros(())
        self._layouts: dict[tuple, Layout] = {}

    @property
    def spec(self) -> str:
        return "dense" if self.mechanism is None else self.mechanism.spec()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, attention={self.spec}, causal={self.causal}"

    def _pattern_arg(self, q: Tensor, k: Tensor):
        """The pattern, or a cached Layout when the pattern ignores values."""
        mech = self.mechanism
        if mech is None or mech.content_based:
            return mech, self.causal
        key = (q.shape[2], k.shape[2], self.causal, q.device)
        layout = self._layouts.get(key)
        if layout is None:
            if len(self._layouts) > 16:
                self._layouts.clear()
            layout = self._layouts[key] = mech.layout(q, k, causal=self.causal)
        return layout, False

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """``x [B, N, dim]`` -> ``[B, N, dim]``; ``key_padding_mask [B, N]`` bool, True = real token."""
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"Attention: x must have shape [B, N, {self.dim}], got {shape}")
        q = rearrange(self.q_proj(x), "b n (h d) -> b h n d", h=self.heads)
        k = rearrange(self.k_proj(x), "b n (h d) -> b h n d", h=self.kv_heads)
        v = rearrange(self.v_proj(x), "b n (h d) -> b h n d", h=self.kv_heads)
        pat, causal = self._pattern_arg(q, k)
        out = attention(q, k, v, pat, causal=causal, backend=self.backend, key_padding_mask=key_padding_mask)
        aux = getattr(self.mechanism, "aux_loss", None)
        self.aux_loss = x.new_zeros(()) if aux is None else aux
        return self.dropout(self.out_proj(rearrange(out, "b h n d -> b n (h d)")))
