"""Multi-head attention module running any registered mechanism."""

from __future__ import annotations

from typing import Optional, Union

import torch
from einops import rearrange
from torch import Tensor, nn

from .. import registry
from .._checks import int_at_least, is_int
from ..approx.base import CONTEXT_PARAMETERS, ApproxAttention, AttentionLayer
from ..functional import BACKENDS, attention
from ..layout import Layout
from ..patterns import Pattern
from .positions import RotaryProjection

Mechanism = Union[Pattern, ApproxAttention, AttentionLayer]

__all__ = ["Attention", "build_mechanism", "build_for_heads", "check_dropout", "check_sequence", "head_width"]


def check_sequence(owner: str, x, dim: int) -> None:
    """``x`` must be a floating tensor ``[B, N, dim]`` with ``B, N >= 1``."""
    if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != dim or 0 in x.shape:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{owner}: x must have shape [B, N, {dim}] with B, N >= 1, got {shape}")
    if not x.is_floating_point():
        raise TypeError(f"{owner}: x must be a floating-point tensor, got {x.dtype}")


def head_width(owner: str, dim: int, heads: int, head_dim: Optional[int]) -> int:
    """``head_dim`` (a positive int), or ``dim // heads`` when it is None (then ``heads`` must divide ``dim``)."""
    if head_dim is None:
        if dim % heads:
            raise ValueError(f"{owner}: dim={dim} must be divisible by heads={heads} (or pass head_dim)")
        return dim // heads
    return int_at_least(f"{owner}: head_dim", head_dim, allow_none=True)


def check_dropout(owner: str, name: str, p) -> None:
    """A dropout probability: a number in [0, 1)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{owner}: {name} must lie in [0, 1), got {p!r}")


def build_mechanism(attention: Union[None, str, Mechanism], **context) -> Optional[Mechanism]:
    """Build a mechanism from a spec string, filling in the context parameters its factory declares.

    ``context`` holds what the caller knows (``dim, heads, kv_heads, head_dim, causal, max_len``);
    a value is passed only when the factory accepts that name and the spec did not set it.
    Objects (Pattern, ApproxAttention, AttentionLayer) are returned unchanged; None means dense.
    """
    unknown = sorted(set(context) - set(CONTEXT_PARAMETERS))
    if unknown:
        raise ValueError(f"build_mechanism: unknown context {unknown}; valid: {', '.join(CONTEXT_PARAMETERS)}")
    if attention is None or isinstance(attention, (Pattern, ApproxAttention, AttentionLayer)):
        return attention
    if not isinstance(attention, str):
        raise TypeError(
            f"attention must be None, a spec string such as 'window(size=256)' or a mechanism object, "
            f"got {type(attention).__name__}"
        )
    name, params = registry.parse_spec(attention)
    accepted = registry.lookup(name).parameters()
    fill = {k: v for k, v in context.items() if v is not None and k in accepted and k not in params}
    mech = registry.build(attention, **fill)
    if not isinstance(mech, (Pattern, ApproxAttention, AttentionLayer)):
        raise TypeError(f"{name!r} builds a {type(mech).__name__}, which is not an attention mechanism")
    return mech


def build_for_heads(
    attention: Union[None, str, Mechanism], *, heads: int, head_dim: int, causal: bool, max_len: Optional[int]
) -> Optional[Mechanism]:
    """:func:`build_mechanism` for self-attention with ``heads`` query and key heads of width ``head_dim``
    (no grouping; model width ``heads * head_dim``), the setting the benchmarks run mechanisms in."""
    return build_mechanism(
        attention,
        dim=heads * head_dim,
        heads=heads,
        kv_heads=heads,
        head_dim=head_dim,
        causal=causal,
        max_len=max_len,
    )


class Attention(nn.Module):
    """Multi-head (optionally grouped-query) self-attention with a pluggable mechanism.

    ``Attention(dim=512, heads=8, attention="window(size=256)", causal=True)`` maps
    ``x [B, N, dim]`` to ``[B, N, dim]``. ``attention`` is any registered spec string (see
    ``spattn.mechanisms()``) or a mechanism object (``None`` = dense):

    * a :class:`Pattern` selects pairs and a kernel computes softmax attention on them;
    * an :class:`~spattn.approx.base.ApproxAttention` replaces the attention function on q, k, v;
    * an :class:`~spattn.approx.base.AttentionLayer` replaces the whole layer (its own projections).

    ``kv_heads`` < ``heads`` gives grouped-query attention (Ainslie et al. 2023); ``max_len`` is
    passed to mechanisms that need the maximum length up front (e.g. Linformer's projections).
    Layouts of static patterns are cached per (length, causal, device). When q_proj / k_proj apply
    RoPE (:class:`~spattn.nn.positions.RotaryProjection`), patterns that route against fixed
    references (``selects_before_rope``: routing's centroids) select on the unrotated vectors.
    Mechanisms with auxiliary losses (routing's commitment loss) report them on ``self.aux_loss``
    after each forward.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        attention: Union[None, str, Mechanism] = None,
        *,
        causal: bool = False,
        kv_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        bias: bool = False,
        dropout: float = 0.0,
        backend: str = "auto",
        max_len: Optional[int] = None,
    ):
        super().__init__()
        for name, val in (("dim", dim), ("heads", heads)):
            int_at_least(f"Attention: {name}", val)
        kv_heads = heads if kv_heads is None else kv_heads
        if not is_int(kv_heads) or kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"Attention: kv_heads must be a positive divisor of heads={heads}, got {kv_heads!r}")
        head_dim = head_width("Attention", dim, heads, head_dim)
        check_dropout("Attention", "dropout", dropout)
        if not isinstance(bias, bool):
            raise TypeError(f"Attention: bias must be a bool, got {bias!r}")
        if backend not in BACKENDS:
            raise ValueError(f"Attention: backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        if not isinstance(causal, bool):
            raise TypeError(f"Attention: causal must be a bool, got {causal!r}")
        self.dim, self.heads, self.kv_heads, self.head_dim = dim, heads, kv_heads, head_dim
        int_at_least("Attention: max_len", max_len, allow_none=True)
        self.causal, self.backend, self.max_len = causal, backend, max_len
        self.mechanism = build_mechanism(
            attention, dim=dim, heads=heads, kv_heads=kv_heads, head_dim=head_dim, causal=causal, max_len=max_len
        )
        if isinstance(self.mechanism, ApproxAttention) and causal and not self.mechanism.supports_causal:
            raise ValueError(f"Attention: {self.mechanism.spec()} has no causal form; use causal=False")
        if not isinstance(self.mechanism, AttentionLayer):  # a layer brings its own projections
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
        return (
            f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, attention={self.spec}, causal={self.causal}"
        )

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

    @staticmethod
    def _heads(y: Tensor, heads: int) -> Tensor:
        return rearrange(y, "b n (h d) -> b h n d", h=heads)

    def _selects_before_rope(self) -> bool:
        """A pattern that routes against fixed references, in a layer whose q / k carry RoPE."""
        return (
            getattr(self.mechanism, "selects_before_rope", False)
            and isinstance(self.q_proj, RotaryProjection)
            and isinstance(self.k_proj, RotaryProjection)
        )

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """``x [B, N, dim]`` -> ``[B, N, dim]``; ``key_padding_mask [B, N]`` bool, True = real token."""
        check_sequence("Attention", x, self.dim)
        if isinstance(self.mechanism, AttentionLayer):
            out = self.mechanism(x, key_padding_mask=key_padding_mask)
            self.aux_loss = getattr(self.mechanism, "aux_loss", None)
            if self.aux_loss is None:
                self.aux_loss = x.new_zeros(())
            return self.dropout(out)
        v = self._heads(self.v_proj(x), self.kv_heads)
        if self._selects_before_rope():
            # routing compares q / k with centroids: RoPE's per-position rotation would scramble
            # the clusters, so select on the vectors before rotation and attend with the rotated ones
            q_raw, k_raw = self.q_proj.proj(x), self.k_proj.proj(x)
            q, k = (
                self._heads(self.q_proj.rotate(q_raw), self.heads),
                self._heads(self.k_proj.rotate(k_raw), self.kv_heads),
            )
            sel = self.mechanism.select(
                self._heads(q_raw, self.heads),
                self._heads(k_raw, self.kv_heads),
                causal=self.causal,
                key_padding_mask=key_padding_mask,
            )
            out = attention(q, k, v, sel, backend=self.backend, key_padding_mask=key_padding_mask)  # causal is in sel
        else:
            q, k = self._heads(self.q_proj(x), self.heads), self._heads(self.k_proj(x), self.kv_heads)
            if isinstance(self.mechanism, ApproxAttention):
                out = self.mechanism(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask)
            else:
                pat, causal = self._pattern_arg(q, k)
                out = attention(q, k, v, pat, causal=causal, backend=self.backend, key_padding_mask=key_padding_mask)
        aux = getattr(self.mechanism, "aux_loss", None)
        self.aux_loss = x.new_zeros(()) if aux is None else aux
        return self.dropout(self.out_proj(rearrange(out, "b h n d -> b n (h d)")))
