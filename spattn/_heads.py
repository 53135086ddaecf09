"""Grouped-query attention's head mapping, shared by every layer (a leaf module)."""

from __future__ import annotations

from torch import Tensor

__all__ = ["expand_kv"]


def expand_kv(x: Tensor, heads: int) -> Tensor:
    """``[B, Hkv, ...] -> [B, heads, ...]``: query head ``h`` reads key/value head ``h // (heads / Hkv)``
    (``x`` itself when ``heads == Hkv``)."""
    group = heads // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)
