"""BiFormer bi-level routing attention (Zhu et al., CVPR 2023, arXiv 2303.08810).

The ``N = H·W`` tokens are a 2-D grid in raster order (token ``t`` at row ``t // W``, column
``t % W``), cut into ``S x S`` regions of ``(H/S) x (W/S)`` tokens (``S = regions``; H and W must be
divisible by S, as in the official ``bra_legacy.py`` without ``auto_pad``).

1. Region level: ``q_r``, ``k_r`` = mean of q, k over each region (detached: the routing has no
   gradient, ``diff_routing=False`` in the official code); affinity ``A_r = q_r k_rᵀ`` ``[S², S²]``;
   each region keeps the ``topk`` regions of highest affinity (its own region is *not* forced).
2. Token level: every query attends all tokens of its region's routed regions (``topk·H·W/S²``
   keys), softmax over them — returned as a :class:`~spattn.selection.TokenSelection` in the
   caller's raster order (indices ``[B, H', N, topk·(H/S)·(W/S)]``), so no reordering is needed.

Official routing runs before the head split, over all ``qk_dim`` channels, so all heads share one
routed set: by default the affinity sums the per-head dot products (``sum_h q_r^h · k_r^{h // G}``
for grouped-query heads), which equals the dot product of the concatenated heads, and the selection
has one head (``H' = 1``). ``per_head=True`` routes every query head separately (not in the paper).
Ties between regions go to the lower region index (``torch.topk`` leaves them unspecified).
The paper's LePE positional branch and projections belong to the layer, not to this pattern.
Defaults: ``regions=7`` (224² ImageNet), ``topk=4`` (stage 2 of BiFormer-T/S/B; the stages use 1, 4, 16).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..layout import Layout
from ..registry import register
from ..selection import TokenSelection
from ._padding import real_tokens, zero_padded
from ._tiles import selection_layout
from .base import Pattern, check_int, check_qk

__all__ = ["BiFormer", "region_tokens"]


def region_tokens(height: int, width: int, regions: int, device=None) -> Tensor:
    """int64 ``[S², (H/S)·(W/S)]``: raster token positions of each region (regions in raster order)."""
    rh, rw = height // regions, width // regions
    grid = torch.arange(height * width, device=device).view(regions, rh, regions, rw)
    return grid.permute(0, 2, 1, 3).reshape(regions * regions, rh * rw)


@register(
    "biformer",
    kind="dynamic",
    description="Bi-level routing: top-k regions per region from pooled q/k, token attention inside them",
    paper="Zhu et al. 2023, BiFormer: Vision Transformer with Bi-Level Routing Attention (CVPR)",
)
class BiFormer(Pattern):
    """Bi-level routing attention over an ``H x W`` token grid (see module docstring).

    Args:
        regions: S, regions per side (S² regions).
        topk: routed regions per region, ``1 <= topk <= S²``.
        grid: ``(H, W)``; None means a square grid (N must be a perfect square).
        per_head: route each query head separately instead of sharing one routing across heads.
        block: tile size of :meth:`layout` (inspection only; the kernel runs :meth:`select`).
    """

    name = "biformer"
    content_based = True

    def __init__(
        self, regions: int = 7, topk: int = 4, grid: Optional[tuple] = None, per_head: bool = False, block: int = 64
    ):
        check_int("biformer", "regions", regions, 1)
        check_int("biformer", "topk", topk, 1)
        check_int("biformer", "block", block, 1)
        if topk > regions * regions:
            raise ValueError(f"biformer: topk={topk} exceeds the number of regions {regions}² = {regions * regions}")
        if grid is not None:
            if not (isinstance(grid, (tuple, list)) and len(grid) == 2):
                raise TypeError(f"biformer: grid must be a (height, width) pair or None, got {grid!r}")
            for side in grid:
                check_int("biformer", "grid", side, 1)
            grid = tuple(grid)
            self._check_grid(grid, regions)
        if not isinstance(per_head, bool):
            raise TypeError(f"biformer: per_head must be a bool, got {per_head!r}")
        self.regions, self.topk, self.grid, self.per_head, self.block = regions, topk, grid, per_head, block

    @staticmethod
    def _check_grid(grid: tuple, regions: int) -> None:
        if grid[0] % regions or grid[1] % regions:
            raise ValueError(f"biformer: grid {grid} must be divisible by regions={regions} in both sides")

    def _grid_for(self, n: int) -> tuple[int, int]:
        if self.grid is None:
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"biformer: {n} tokens are not a square grid; pass grid=(height, width)")
            grid = (side, side)
        else:
            grid = self.grid
            if grid[0] * grid[1] != n:
                raise ValueError(f"biformer: grid {grid} holds {grid[0] * grid[1]} tokens but the input has {n}")
        self._check_grid(grid, self.regions)
        return grid

    def routed_regions(self, q: Tensor, k: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """int64 ``[B, H', S², topk]``: the routed regions of each region (best first).

        ``key_padding_mask [B, N]`` (True = real token): regions average their real tokens, and a
        region without a real token is routed to last (it adds no key)."""
        batch, hq, hkv, nq, nk = check_qk(q, k)
        height, width = self._grid_for(nq)
        members = region_tokens(height, width, self.regions, q.device)
        sdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        real = real_tokens("biformer", key_padding_mask, batch, nk, k.device) if nq == nk else None
        if real is None:
            qr = q.detach().to(sdt)[:, :, members].mean(3)  # [B, Hq, S², D]
            kr = k.detach().to(sdt)[:, :, members].mean(3)  # [B, Hkv, S², D]
        else:
            count = real[:, members].sum(-1).to(sdt)  # [B, S²] real tokens per region
            mean = lambda x: (
                zero_padded(x.detach().to(sdt), real)[:, :, members].sum(3) / count.clamp(min=1)[:, None, :, None]
            )
            qr, kr = mean(q), mean(k)
        group = hq // hkv
        affinity = torch.matmul(qr.view(batch, hkv, group, *qr.shape[2:]), kr.transpose(-1, -2).unsqueeze(2))
        affinity = affinity.view(batch, hq, *affinity.shape[3:])
        if not self.per_head:
            affinity = affinity.sum(1, keepdim=True)
        if real is not None:
            affinity = affinity.masked_fill((count == 0)[:, None, None, :], float("-inf"))
        order = torch.sort(affinity, dim=-1, descending=True, stable=True).indices
        return order[..., : self.topk]

    def select(
        self, q: Tensor, k: Tensor, causal: bool = False, *, key_padding_mask: Optional[Tensor] = None, state=None
    ) -> TokenSelection:
        if causal:
            raise ValueError("biformer: bi-level routing is defined for non-causal attention over a 2-D grid")
        _, _, _, nq, nk = check_qk(q, k)
        if nq != nk:
            raise ValueError(f"biformer: self-attention over one grid needs Nq == Nk, got {nq} and {nk}")
        height, width = self._grid_for(nq)
        members = region_tokens(height, width, self.regions, q.device)  # [S², w²]
        region_of = torch.empty(nq, dtype=torch.long, device=q.device)
        region_of[members.reshape(-1)] = torch.arange(members.shape[0], device=q.device).repeat_interleave(
            members.shape[1]
        )
        routed = self.routed_regions(q, k, key_padding_mask)[:, :, region_of]  # [B, H', N, topk]
        indices = members[routed].flatten(3)  # [B, H', N, topk * w²]
        return TokenSelection(indices, nq, nk)

    def layout(self, q: Tensor, k: Tensor, causal: bool = False, key_padding_mask: Optional[Tensor] = None) -> Layout:
        """The routed selection as a Layout with tiles of ``block`` (inspection and plots)."""
        return selection_layout(self.select(q, k, causal=causal, key_padding_mask=key_padding_mask), self.block)
