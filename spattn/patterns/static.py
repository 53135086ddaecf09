"""Static patterns: the selection depends only on positions, never on the values of q and k."""

from __future__ import annotations

import torch
from torch import Tensor

from ..layout import Layout
from ..registry import register
from .base import Pattern, causal_mask_mod, check_int, check_qk

__all__ = ["Dense"]

DEFAULT_BLOCK = 64


def _dense_layout(q_len: int, kv_len: int, block: int, causal: bool, device) -> Layout:
    nqb, nkb = -(-q_len // block), -(-kv_len // block)
    if not causal:
        return Layout.from_block_map(
            torch.ones(1, 1, nqb, nkb, dtype=torch.bool, device=device),
            q_len=q_len, kv_len=kv_len, block_q=block,
        )
    offset = kv_len - q_len
    q_first = torch.arange(nqb, device=device) * block
    q_last = (q_first + block - 1).clamp(max=q_len - 1)
    k_first = torch.arange(nkb, device=device) * block
    k_last = (k_first + block - 1).clamp(max=kv_len - 1)
    block_map = k_first[None, :] <= q_last[:, None] + offset
    full_map = k_last[None, :] <= q_first[:, None] + offset
    return Layout.from_block_map(
        block_map[None, None], full_map=full_map[None, None], mask_mod=causal_mask_mod(q_len, kv_len),
        q_len=q_len, kv_len=kv_len, block_q=block,
    )


@register("dense", kind="static", description="Full softmax attention (every pair, or every past pair when causal)",
          paper="Vaswani et al. 2017, Attention Is All You Need")
class Dense(Pattern):
    """Every (query, key) pair; with ``causal`` every key ``j <= i + Nk - Nq``."""

    name = "dense"

    def __init__(self, block: int = DEFAULT_BLOCK):
        check_int("dense", "block", block, 1)
        self.block = block

    def layout(self, q: Tensor, k: Tensor, causal: bool = False) -> Layout:
        _, _, _, nq, nk = check_qk(q, k)
        return _dense_layout(nq, nk, self.block, causal, q.device)
