"""Routing Transformer attention layer (Roy, Saffar, Vaswani, Grangier; TACL 2021, arXiv 2003.05997).

The paper's layer splits its heads: ``local_heads`` attend within a local window, the other heads use
k-means routing (:class:`spattn.patterns.routing.Routing`), and all outputs are concatenated and
projected. Routing heads layer-normalise q and k without gain or bias (so the logits are
``LN(q)·LN(k)``); we then scale them by ``head_dim ** -0.5``, the lucidrains port's choice (the
official code applies no scale, which with LN'd vectors gives logits of size ~``head_dim``).
Decoders share the query and key projections (``share_qk``, default = ``causal``), which the paper's
causal routing needs: windows are chosen once and the causal mask inside a window is by position.

The centroids live in buffers of ``self.routing`` (saved by ``state_dict``, EMA-updated in training
mode); the commitment loss is on :attr:`RoutingAttention.aux_loss` after each forward (add it to the
task loss).
"""

from __future__ import annotations

from typing import Optional

import torch
from einops import rearrange
from torch import Tensor, nn

from .._checks import int_at_least
from ..approx.base import AttentionLayer
from ..functional import attention
from ..kernels.clustered import clustered_attention
from ..patterns.routing import Routing, layer_norm
from ..patterns.static import Window
from ..registry import register
from .attention import check_sequence, head_width

__all__ = ["RoutingAttention"]


@register(
    "routing_transformer",
    kind="layer",
    description="Routing Transformer layer: local-window heads + k-means routing heads (centroids in buffers)",
    paper="Roy, Saffar, Vaswani, Grangier 2021, Efficient Content-Based Sparse Attention with Routing Transformers (TACL)",
)
class RoutingAttention(AttentionLayer):
    """Self-attention ``x [B, N, dim] -> [B, N, dim]`` mixing local and routing heads.

    Args:
        dim: model width; heads: total heads; head_dim: per-head width (default ``dim // heads``).
        clusters: centroids per routing head (paper: 8 at 4k tokens, 16 at 8k).
        local_heads: heads doing local attention (default ``heads // 2``, the paper's enwik8 4 + 4);
            the remaining ``heads - local_heads`` heads route.
        window: local heads see keys within ``window`` positions (causal: the ``window`` previous
            ones), the paper's 256-token local blocks.
        routing_window: tokens per routing window (default ``ceil(N / clusters)``).
        causal: decoder self-attention.
        share_qk: keys = queries (one projection); default ``causal`` (the paper's decoders).
        causal_safe: the routing variant whose selection never looks at future tokens (see
            :mod:`spattn.patterns.routing`); the paper's is ``False``.
        decay, commitment: k-means EMA decay (0.999) and commitment-loss weight (1e-4).
    """

    name = "routing_transformer"

    def __init__(
        self,
        dim: int,
        heads: int,
        clusters: int = 8,
        local_heads: Optional[int] = None,
        window: int = 256,
        routing_window: Optional[int] = None,
        causal: bool = False,
        share_qk: Optional[bool] = None,
        causal_safe: bool = False,
        decay: float = 0.999,
        commitment: float = 1e-4,
        head_dim: Optional[int] = None,
        bias: bool = False,
    ):
        super().__init__()
        int_at_least("RoutingAttention: dim", dim)
        int_at_least("RoutingAttention: heads", heads)
        local_heads = heads // 2 if local_heads is None else local_heads
        int_at_least("RoutingAttention: local_heads", local_heads, 0)
        if local_heads > heads:
            raise ValueError(f"RoutingAttention: local_heads={local_heads} exceeds heads={heads}")
        int_at_least("RoutingAttention: window", window, 0)
        if routing_window is not None:
            int_at_least("RoutingAttention: routing_window", routing_window)
        for name, flag in (("causal_safe", causal_safe), ("bias", bias)):
            if not isinstance(flag, bool):
                raise TypeError(f"RoutingAttention: {name} must be a bool, got {flag!r}")
        head_dim = head_width("RoutingAttention", dim, heads, head_dim)
        if not isinstance(causal, bool):
            raise TypeError(f"RoutingAttention: causal must be a bool, got {causal!r}")
        share_qk = causal if share_qk is None else share_qk
        if not isinstance(share_qk, bool):
            raise TypeError(f"RoutingAttention: share_qk must be a bool or None, got {share_qk!r}")
        self.dim, self.heads, self.head_dim, self.causal = dim, heads, head_dim, causal
        self.clusters, self.local_heads, self.window, self.routing_window = (
            clusters,
            local_heads,
            window,
            routing_window,
        )
        self.share_qk, self.causal_safe, self.decay, self.commitment, self.bias = (
            share_qk,
            causal_safe,
            decay,
            commitment,
            bias,
        )
        inner = heads * head_dim
        self.q_proj = nn.Linear(dim, inner, bias=bias)
        self.k_proj = None if share_qk else nn.Linear(dim, inner, bias=bias)
        self.v_proj = nn.Linear(dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, dim, bias=bias)
        self.local = Window(size=window) if local_heads else None
        routing_heads = heads - local_heads
        self.routing = None
        if routing_heads:
            self.routing = Routing(
                clusters=clusters,
                window=routing_window,
                causal_safe=causal_safe,
                share_qk=share_qk,
                decay=decay,
                commitment=commitment,
                heads=routing_heads,
                head_dim=head_dim,
            )
        self.aux_loss: Tensor = torch.zeros(())

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """``x [B, N, dim]`` -> ``[B, N, dim]``; ``key_padding_mask [B, N]`` bool, True = real token."""
        check_sequence("RoutingAttention", x, self.dim)
        q = rearrange(self.q_proj(x), "b n (h d) -> b h n d", h=self.heads)
        k = q if self.k_proj is None else rearrange(self.k_proj(x), "b n (h d) -> b h n d", h=self.heads)
        v = rearrange(self.v_proj(x), "b n (h d) -> b h n d", h=self.heads)
        lh = self.local_heads
        outs = []
        if self.local is not None:
            outs.append(
                attention(
                    q[:, :lh], k[:, :lh], v[:, :lh], self.local, causal=self.causal, key_padding_mask=key_padding_mask
                )
            )
        self.aux_loss = x.new_zeros(())
        if self.routing is not None:
            qr = layer_norm(q[:, lh:])
            kr = qr if self.share_qk else layer_norm(k[:, lh:])
            sel = self.routing.select(qr, kr, causal=self.causal, key_padding_mask=key_padding_mask)
            outs.append(clustered_attention(qr, kr, v[:, lh:], sel, key_padding_mask=key_padding_mask))
            self.aux_loss = self.routing.aux_loss
        out = torch.cat(outs, dim=1)
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))
