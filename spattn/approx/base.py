"""Base classes of mechanisms that are not "select pairs, then softmax over them".

Two shapes of mechanism plug into :class:`spattn.nn.Attention` by spec string:

* :class:`ApproxAttention` replaces the attention *function*: it receives projected
  ``q [B, Hq, Nq, D]``, ``k, v [B, Hkv, Nk, D]`` and returns ``[B, Hq, Nq, D]`` (linear attention,
  Performer, Linformer, Nyströmformer, Combiner, Scatterbrain, SLA, ...).
* :class:`AttentionLayer` replaces the whole *layer* ``x [B, N, dim] -> [B, N, dim]`` because it
  changes the projections or the sequence itself (SeqBoat's sparse modular activation, Sparse
  Query Attention's reduced query heads).

Factories registered in :mod:`spattn.registry` may declare any of the *context* parameters
``dim, heads, kv_heads, head_dim, causal, max_len``; :class:`spattn.nn.Attention` passes the ones it
knows and the spec string did not set, so learned state can be created at construction time.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

from torch import Tensor, nn

__all__ = ["ApproxAttention", "AttentionLayer", "CONTEXT_PARAMETERS"]

#: parameters nn.Attention fills in from its own configuration when a factory declares them
CONTEXT_PARAMETERS = ("dim", "heads", "kv_heads", "head_dim", "causal", "max_len")


class _SpecMixin:
    name: str = "mechanism"

    def params(self) -> dict[str, Any]:
        sig = inspect.signature(type(self).__init__)
        return {
            p: getattr(self, p)
            for p in sig.parameters
            if p != "self" and p not in CONTEXT_PARAMETERS and hasattr(self, p)
        }

    def spec(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{self.name}({args})" if args else self.name


class ApproxAttention(_SpecMixin, nn.Module):
    """An attention function that approximates or replaces softmax over selected pairs.

    Subclasses implement :meth:`forward` and set ``supports_causal``; mechanisms without a causal
    form must raise ``ValueError`` for ``causal=True``. An auxiliary loss, if any, is left on
    ``self.aux_loss`` after each forward.
    """

    supports_causal: bool = True

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, key_padding_mask: Optional[Tensor] = None
    ) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return self.spec()


class AttentionLayer(_SpecMixin, nn.Module):
    """A whole attention layer ``x [B, N, dim] -> [B, N, dim]`` built from a spec string."""

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError
