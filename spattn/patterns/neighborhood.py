"""Neighborhood attention (NAT) and dilated neighborhood attention (DiNAT), 1-D and 2-D."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..layout import Layout
from ..registry import register
from .base import Pattern, check_int, check_qk
from ._tiles import DEFAULT_BLOCK, make_layout, tile_stats_from_segments

__all__ = ["Neighborhood"]


def _per_axis(owner: str, name: str, value: Any, axes: int) -> tuple[int, ...]:
    """An int, or a tuple/list of one int per axis, as a tuple of ``axes`` ints (each >= 1)."""
    if isinstance(value, (tuple, list)):
        if len(value) != axes:
            raise ValueError(f"{owner}: {name} must be an int or {axes} ints (one per axis), got {value!r}")
        for v in value:
            check_int(owner, name, v, 1)
        return tuple(value)
    check_int(owner, name, value, 1)
    return (value,) * axes


def _axis_window(x: Tensor, n: int, k: int, d: int, causal: bool) -> tuple[Tensor, Tensor]:
    """NATTEN's per-axis rule (algorithms.md §10) for positions ``x`` on an axis of length ``n``:
    ``(g, lo)``: the dilation group ``g = x mod d`` and the first neighbour in group coordinates;
    the neighbours are ``g + d * t`` for ``t`` in ``[lo, lo + k - 1]`` (``t >= 0``)."""
    g = x % d
    xg = torch.div(x, d, rounding_mode="floor")
    if causal:
        return g, xg - (k - 1)  # truncated at the start: keys t < 0 do not exist
    left = k // 2
    right = k // 2 + (k % 2 - 1)
    n_g = torch.div(n - g + d - 1, d, rounding_mode="floor")  # group length ceil((n - g) / d)
    center = torch.minimum(xg.clamp(min=left), n_g - 1 - right)  # shifted, never truncated
    return g, center - left


def _axis_ok(x: Tensor, y: Tensor, n: int, k: int, d: int, causal: bool) -> Tensor:
    g, lo = _axis_window(x, n, k, d, causal)
    yg = torch.div(y, d, rounding_mode="floor")
    return (y % d == g) & (yg >= lo) & (yg <= lo + (k - 1))


@register(
    "neighborhood",
    kind="static",
    description="Neighborhood attention (NAT/DiNAT): k nearest (dilated) neighbours per axis, 1-D or 2-D",
    paper="Hassani et al. 2023, Neighborhood Attention Transformer; Hassani & Shi 2022, DiNAT",
)
class Neighborhood(Pattern):
    """Neighborhood attention, NAT (Hassani et al., CVPR 2023), with dilation, DiNAT (Hassani & Shi
    2022), exactly as NATTEN defines it.

    Per axis of length ``n`` with kernel ``k`` and dilation ``d``: a position ``x`` belongs to the
    dilation group ``g = x mod d`` (positions ``g, g+d, ...``, ``n_g = ceil((n-g)/d)`` of them) at
    group coordinate ``x_g = x // d``. Non-causal, its neighbours are the group coordinates
    ``c - k//2 + [0, k)`` with ``c = clamp(x_g, k//2, n_g - 1 - (k//2 + k%2 - 1))``: the window is
    *shifted* at the borders (never truncated or zero-padded), so every query has exactly ``k``
    neighbours per axis. Causal: ``x_g - (k-1) + [0, k)``, truncated below 0. Original index
    ``g + d * t``. Requires ``n >= k * d`` on every axis.

    ``shape=None``: 1-D over the ``Nk`` keys. ``shape=(H, W)``: ``Nk = H * W`` in row-major order
    and the neighbourhood is the product of the per-axis ones; ``kernel`` and ``dilation`` are an
    int or one int per axis. Query ``i`` sits at position ``i' = i + Nk - Nq`` (``Nq <= Nk``).
    """

    name = "neighborhood"

    def __init__(
        self,
        kernel: "int | tuple[int, int]" = 7,
        dilation: "int | tuple[int, int]" = 1,
        shape: "tuple[int, int] | None" = None,
        block: int = DEFAULT_BLOCK,
    ):
        if shape is not None:
            if not isinstance(shape, (tuple, list)) or len(shape) != 2:
                raise ValueError(f"neighborhood: shape must be None (1-D) or (H, W) for 2-D, got {shape!r}")
            for v in shape:
                check_int("neighborhood", "shape", v, 1)
            shape = tuple(shape)
        axes = 1 if shape is None else 2
        _per_axis("neighborhood", "kernel", kernel, axes)
        _per_axis("neighborhood", "dilation", dilation, axes)
        check_int("neighborhood", "block", block, 1)
        self.kernel = tuple(kernel) if isinstance(kernel, list) else kernel
        self.dilation = tuple(dilation) if isinstance(dilation, list) else dilation
        self.shape = shape
        self.block = block

    def _geometry(self, nk: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """``((H, W), (k_r, k_c), (d_r, d_c))``; 1-D is the grid ``(1, Nk)`` with a trivial row axis."""
        if self.shape is None:
            (k,), (d,) = _per_axis("", "", self.kernel, 1), _per_axis("", "", self.dilation, 1)
            dims, ks, ds = (1, nk), (1, k), (1, d)
        else:
            dims = self.shape
            if dims[0] * dims[1] != nk:
                raise ValueError(f"neighborhood: shape={dims} needs H*W = {dims[0] * dims[1]} keys, got Nk = {nk}")
            ks, ds = _per_axis("", "", self.kernel, 2), _per_axis("", "", self.dilation, 2)
        for axis, n, k, d in zip(("rows", "cols"), dims, ks, ds):
            if n < k * d:
                what = f"axis {axis} " if self.shape is not None else ""
                raise ValueError(
                    f"neighborhood: {what}length {n} is shorter than kernel*dilation = {k}*{d} = {k * d}; "
                    "every dilation group needs at least `kernel` positions"
                )
        return dims, ks, ds

    def layout(self, q: Tensor, k: Tensor, causal: bool = False) -> Layout:
        _, _, _, nq, nk = check_qk(q, k)
        if nq > nk:
            raise ValueError(f"neighborhood: queries are positions of the key grid, so Nq ({nq}) must be <= Nk ({nk})")
        (H, W), (kr, kc), (dr, dc) = self._geometry(nk)
        off = nk - nq

        def segments(p):
            # one raster segment per neighbour row: columns c_first ... c_last, step dc
            r, c = torch.div(p, W, rounding_mode="floor"), p % W
            gr, lor = _axis_window(r, H, kr, dr, causal)
            gc, loc = _axis_window(c, W, kc, dc, causal)
            t = lor[:, None] + torch.arange(kr, device=p.device)  # neighbour rows in group coords
            row = (gr[:, None] + dr * t) * W
            a = row + (gc + dc * loc.clamp(min=0))[:, None]
            b = row + (gc + dc * (loc + kc - 1))[:, None]
            b = torch.where(t >= 0, b, a - 1)  # causal: rows before the first one do not exist
            return a, b, row + gc[:, None], dc

        block_map, full_map = tile_stats_from_segments(segments, nq, nk, self.block, q.device)

        def neighborhood_mask(b, h, q_idx, kv_idx):
            p = q_idx + off
            ok_c = _axis_ok(p % W, kv_idx % W, W, kc, dc, causal)
            if H == 1:
                return ok_c
            row_p, row_k = torch.div(p, W, rounding_mode="floor"), torch.div(kv_idx, W, rounding_mode="floor")
            return _axis_ok(row_p, row_k, H, kr, dr, causal) & ok_c

        return make_layout(block_map, full_map, neighborhood_mask, nq, nk, self.block)
