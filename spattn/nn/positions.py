"""Position information for the model zoo: learned absolute embeddings and rotary embeddings.

* Learned absolute positions (Vaswani et al. 2017; the LRA and Zoology baselines) add a trained
  vector per position to the token embeddings: ``LearnedPositions(max_len, dim)``.
* Rotary position embeddings (RoPE, Su et al. 2021, "RoFormer") rotate each (even, odd) pair of
  query/key channels by an angle proportional to the position, so the dot product depends on the
  relative offset only. :class:`RotaryProjection` wraps a q or k projection ``x [B, N, dim] ->
  [B, N, heads*head_dim]`` and rotates every head of its output, which lets any mechanism of
  :class:`spattn.nn.Attention` that uses the module's projections see rotated queries and keys.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import int_at_least, is_int

__all__ = ["LearnedPositions", "RotaryProjection", "rotary_tables", "apply_rotary"]


class LearnedPositions(nn.Module):
    """``x [B, N, dim]`` -> ``x + P[:N]`` with a learned table ``P [max_len, dim]``."""

    def __init__(self, max_len: int, dim: int):
        super().__init__()
        for name, value in (("max_len", max_len), ("dim", dim)):
            int_at_least(f"LearnedPositions: {name}", value)
        self.max_len = max_len
        self.table = nn.Embedding(max_len, dim)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[1]
        if n > self.max_len:
            raise ValueError(f"sequence length {n} exceeds the model's max_len={self.max_len} (learned positions)")
        return x + self.table.weight[:n].to(x.dtype)


def rotary_tables(n: int, head_dim: int, base: float = 10000.0, device=None) -> tuple[Tensor, Tensor]:
    """cos, sin ``[n, head_dim // 2]`` of the RoPE angles ``pos * base^(-2i/head_dim)``."""
    int_at_least("rotary_tables: n", n, 0)
    if not is_int(head_dim) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"rotary_tables: head_dim must be an even int >= 2, got {head_dim!r}")
    inv = base ** (-torch.arange(0, head_dim // 2, device=device, dtype=torch.float64) * 2 / head_dim)
    ang = torch.arange(n, device=device, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos().float(), ang.sin().float()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved channel pairs of ``x [B, N, H, D]`` (D even) by the angles of ``cos/sin [N, D/2]``."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)


class RotaryProjection(nn.Module):
    """A linear projection followed by RoPE on each of its ``heads`` output heads.

    ``x [B, N, dim]`` -> ``[B, N, heads*head_dim]``; position ``t`` of the sequence is rotated by
    angle ``t * theta_i`` on channel pair ``i``. Sequences longer than ``max_len`` are rejected.
    """

    def __init__(self, proj: nn.Linear, heads: int, max_len: int, base: float = 10000.0):
        super().__init__()
        if proj.out_features % heads:
            raise ValueError(f"RotaryProjection: out_features={proj.out_features} not divisible by heads={heads}")
        head_dim = proj.out_features // heads
        if head_dim % 2:
            raise ValueError(f"RotaryProjection: head_dim must be even for RoPE, got {head_dim}")
        self.proj, self.heads, self.head_dim, self.max_len = proj, heads, head_dim, max_len
        cos, sin = rotary_tables(max_len, head_dim, base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.rotate(self.proj(x))

    def rotate(self, y: Tensor) -> Tensor:
        """RoPE on an already projected ``y [B, N, heads*head_dim]`` (``forward = rotate ∘ proj``)."""
        n = y.shape[1]
        if n > self.max_len:
            raise ValueError(f"sequence length {n} exceeds the model's max_len={self.max_len} (rotary positions)")
        y = y.unflatten(-1, (self.heads, self.head_dim))
        return apply_rotary(y, self.cos[:n], self.sin[:n]).flatten(-2)
