"""Pattern base class: a pattern turns (q, k) and its parameters into a :class:`~spattn.layout.Layout`."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, Optional

from torch import Tensor
from torch.nn import Module

from .._checks import check_float, check_int  # re-exported: a pattern's parameter checks
from ..layout import Layout, MaskMod, translation_invariant
from ..selection import ClusterSelection, TokenSelection

__all__ = ["Pattern", "PaddedPattern", "causal_mask_mod", "check_qk", "check_int", "check_float", "require_causal"]


class Pattern(ABC):
    """Selects the (query, key) pairs attention computes.

    Subclasses store each constructor parameter under an attribute of the same name (so that
    ``repr`` round-trips to a spec string) and implement :meth:`layout`.
    """

    name: str = "pattern"
    #: True when the selection looks at the values of q/k (dynamic patterns)
    content_based: bool = False
    #: True when the selection compares each q / k with fixed references (routing's centroids) rather
    #: than q with k: rotating by position (RoPE) would change the choice, so layers with RoPE select
    #: on the vectors before rotation and attend with the rotated ones
    selects_before_rope: bool = False
    #: True for decode-time selectors (one query against a growing KV cache) that keep incremental
    #: summaries in the ``state`` of :meth:`select`
    decode_time: bool = False

    @abstractmethod
    def layout(self, q: Tensor, k: Tensor, causal: bool = False) -> Layout:
        """Layout for queries ``q [B, H, Nq, D]`` and keys ``k [B, Hkv, Nk, D]``.

        With ``causal=True`` queries are aligned to the end of the keys (as in decoding):
        query ``i`` may see key ``j`` only if ``j <= i + Nk - Nq``.
        """

    def select(
        self,
        q: Tensor,
        k: Tensor,
        causal: bool = False,
        *,
        key_padding_mask: Optional[Tensor] = None,
        state: Any = None,
    ) -> "Layout | TokenSelection | ClusterSelection":
        """What a kernel executes: the Layout by default.

        One signature for every pattern: ``key_padding_mask [B, Nk]`` (True = real key) and ``state``
        (a decode-time selector's :class:`~spattn.kvcache.LayerState`) are passed by every caller;
        patterns that do not look at them accept and ignore them (positions only: padding is the
        kernel's business).

        Patterns whose choice is per token override this: per-query key sets return a
        :class:`~spattn.selection.TokenSelection` (token-sparse kernel), routing returns a
        :class:`~spattn.selection.ClusterSelection` (cluster-window kernel). Their :meth:`layout`
        may then be expensive (it exists for inspection and plots).
        """
        return self.layout(q, k, causal=causal)

    def params(self) -> dict[str, Any]:
        sig = inspect.signature(type(self).__init__)
        return {p: getattr(self, p) for p in sig.parameters if p != "self" and hasattr(self, p)}

    def spec(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{self.name}({args})" if args else self.name

    def __repr__(self) -> str:
        return self.spec()

    # Patterns with learned state are also nn.Modules; those compare by identity, because
    # nn.Module.named_modules() de-duplicates by hash/eq and two layers' centroids must stay distinct.
    def __eq__(self, other: object) -> bool:
        if isinstance(self, Module):
            return self is other
        return type(self) is type(other) and self.params() == other.params()  # type: ignore[union-attr]

    def __hash__(self) -> int:
        if isinstance(self, Module):
            return id(self)
        return hash((type(self), self.spec()))


class PaddedPattern(Pattern):
    """A content-based pattern whose :meth:`layout` takes ``key_padding_mask [B, Nk]`` (True = real
    token) and ignores padded positions completely; :meth:`select` passes the mask on
    (``spattn.attention`` gives it to every ``select``)."""

    content_based = True

    @abstractmethod
    def layout(self, q: Tensor, k: Tensor, causal: bool = False, key_padding_mask: Optional[Tensor] = None) -> Layout:
        """Layout of ``q [B, H, Nq, D]``, ``k [B, Hkv, Nk, D]``; padded positions never influence it."""

    def select(
        self,
        q: Tensor,
        k: Tensor,
        causal: bool = False,
        *,
        key_padding_mask: Optional[Tensor] = None,
        state: Any = None,
    ) -> Layout:
        return self.layout(q, k, causal=causal, key_padding_mask=key_padding_mask)


def causal_mask_mod(q_len: int, kv_len: int) -> MaskMod:
    """Predicate of causal attention with queries aligned to the end of the keys."""
    offset = kv_len - q_len

    @translation_invariant
    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    return causal


def require_causal(owner: str, causal: bool) -> None:
    """Prefill selectors estimated from the last queries are defined for causal attention only."""
    if not causal:
        raise ValueError(
            f"{owner} is defined for causal prefill (estimated from the last queries); call it with causal=True"
        )


def check_qk(q: Tensor, k: Tensor) -> tuple[int, int, int, int, int]:
    """Validate shapes; returns (B, Hq, Hkv, Nq, Nk)."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H, N, D], got {tuple(t.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch and head dim")
    return q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2]
