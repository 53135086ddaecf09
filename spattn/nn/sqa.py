"""Sparse Query Attention (Filipek 2025, arXiv 2510.01817): fewer *query* heads than the baseline.

A baseline layer has ``heads`` heads of width ``head_dim = dim / heads``. SQA keeps the head width and
projects to ``H_q < heads`` query heads and ``H_kv <= H_q`` key/value heads (each key/value head
serves ``H_q / H_kv`` query heads, as in GQA); the output projection maps ``H_q * head_dim`` back to
``dim``. Score and value FLOPs scale with ``H_q``: a ``heads / H_q`` speed-up where attention is
compute-bound (training, prefill, encoders), while ``H_kv`` sets the KV-cache size.

Variants (defaults of ``(H_q, H_kv)``, overridable by ``query_heads`` / ``key_value_heads``):
``standard`` SQA ``(H/2, H/4)``, symmetric ``sSQA`` ``(H/2, H/2)``, extreme ``xSQA`` ``(H/4, H/4)``.
``pattern`` optionally restricts the attention to a registered sparse pattern (e.g. the paper's
suggested SQA + sliding window, ``pattern="window(size=256)"``).
"""

from __future__ import annotations

from typing import Optional

from einops import rearrange
from torch import Tensor, nn

from .. import registry
from .._checks import int_at_least
from ..approx.base import AttentionLayer
from ..functional import attention
from ..patterns import Pattern
from ..registry import register
from .attention import check_sequence, head_width

__all__ = ["SparseQueryAttention", "VARIANTS"]

#: variant -> (query-head fraction, key/value-head fraction) of the baseline heads
VARIANTS = {"standard": (2, 4), "symmetric": (2, 2), "extreme": (4, 4)}


@register(
    "sqa",
    kind="layer",
    description="Sparse Query Attention: fewer query heads (standard / symmetric sSQA / extreme xSQA), GQA-style kv heads",
    paper="Filipek, Sparse Query Attention (SQA), 2025 (arXiv 2510.01817)",
)
class SparseQueryAttention(AttentionLayer):
    """``x [B, N, dim] -> [B, N, dim]`` with ``query_heads`` query and ``key_value_heads`` key/value heads.

    Args:
        dim, heads, head_dim, causal: the baseline layer (given by :class:`spattn.nn.Attention`).
        query_heads: ``H_q`` (``1 <= H_q <= heads``); default from ``variant``.
        key_value_heads: ``H_kv`` dividing ``H_q``; default from ``variant`` (at most ``H_q``).
        variant: ``"standard"``, ``"symmetric"`` or ``"extreme"``.
        pattern: optional sparse-pattern spec for the attention itself (None = dense).
        bias: biases of the projections.
    """

    name = "sqa"

    def __init__(
        self,
        dim: int,
        heads: int,
        query_heads: Optional[int] = None,
        key_value_heads: Optional[int] = None,
        variant: str = "standard",
        pattern: Optional[str] = None,
        head_dim: Optional[int] = None,
        causal: bool = False,
        bias: bool = False,
    ):
        super().__init__()
        int_at_least("sqa: dim", dim)
        int_at_least("sqa: heads", heads)
        if variant not in VARIANTS:
            raise ValueError(f"sqa: variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        head_dim = head_width("sqa", dim, heads, head_dim)
        fq, fkv = VARIANTS[variant]
        hq = max(1, heads // fq) if query_heads is None else int_at_least("sqa: query_heads", query_heads)
        hkv = (
            max(1, min(hq, heads // fkv))
            if key_value_heads is None
            else int_at_least("sqa: key_value_heads", key_value_heads)
        )
        if hq > heads:
            raise ValueError(f"sqa: query_heads={hq} must be <= heads={heads} (SQA reduces query heads)")
        if hkv > hq or hq % hkv:
            raise ValueError(f"sqa: key_value_heads={hkv} must divide query_heads={hq} (and so be <= it)")
        if not isinstance(causal, bool):
            raise TypeError(f"sqa: causal must be a bool, got {causal!r}")
        if pattern is not None and not isinstance(pattern, str):
            raise TypeError(f"sqa: pattern must be a spec string or None, got {type(pattern).__name__}")
        if pattern is not None:
            try:
                built = registry.build(pattern)
            except (TypeError, ValueError) as err:
                raise type(err)(f"sqa: pattern {pattern!r}: {err}") from None
            if not isinstance(built, Pattern):
                raise ValueError(f"sqa: pattern must name a sparse pattern (see spattn.mechanisms()), got {pattern!r}")
        if not isinstance(bias, bool):
            raise TypeError(f"sqa: bias must be a bool, got {bias!r}")
        self.dim, self.heads, self.head_dim, self.causal = dim, heads, head_dim, causal
        self.query_heads, self.key_value_heads, self.variant, self.pattern = hq, hkv, variant, pattern
        self.q_proj = nn.Linear(dim, hq * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, hkv * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, hkv * head_dim, bias=bias)
        self.out_proj = nn.Linear(hq * head_dim, dim, bias=bias)

    def params(self):
        out = {"query_heads": self.query_heads, "key_value_heads": self.key_value_heads, "variant": self.variant}
        if self.pattern is not None:
            out["pattern"] = self.pattern
        return out

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """``x [B, N, dim]``, ``key_padding_mask [B, N]`` bool (True = real) -> ``[B, N, dim]``."""
        check_sequence("sqa", x, self.dim)
        q = rearrange(self.q_proj(x), "b n (h d) -> b h n d", h=self.query_heads)
        k = rearrange(self.k_proj(x), "b n (h d) -> b h n d", h=self.key_value_heads)
        v = rearrange(self.v_proj(x), "b n (h d) -> b h n d", h=self.key_value_heads)
        out = attention(q, k, v, self.pattern, causal=self.causal, key_padding_mask=key_padding_mask)
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))
