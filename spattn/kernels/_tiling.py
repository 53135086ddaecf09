"""How the eager block-sparse kernel cuts a Layout into SDPA calls (its *tile plan*).

A query tile (``block_q`` queries of every query head sharing one kv head) is attended against
at most two key sets, each run through PyTorch's fused CPU flash kernel and merged by log-sum-exp:

* the **band**: a contiguous key range at a fixed token offset from the tile (``[qb·bq + lo,
  qb·bq + lo + L)``). Windows, causal diagonals, dilations and neighbourhoods put most of their
  tiles on such a band, which is read from K/V through a zero-copy strided view.
* the **gathered** keys: every other selected block (globals, random, content-based choices) and
  the extra columns, copied into a per-tile buffer.

Pairs inside those key sets that the Layout does not compute are removed by an additive ``-inf``
mask in every dtype (a finite "very negative" value loses to large real scores in fp16: masked keys
would win the softmax); rows of a key set with no allowed key are recognised from the mask itself
(:func:`empty_rows`), since SDPA returns them as zeros with log-sum-exp 0. Memory stays proportional to the computed tiles: work proceeds in chunks of
query tiles whose buffers fit ``chunk_elems`` elements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..layout import Layout

# below this fraction of query tiles, an offset is not worth a band
_BAND_MIN_SHARE = 0.5


def mask_value(dtype: torch.dtype) -> float:
    """The additive 'excluded' score: ``-inf`` in every dtype, so no real score, however large, loses to it."""
    return float("-inf")


def empty_rows(mask: Optional[Tensor]) -> Optional[Tensor]:
    """bool ``[..., 1|M]`` of an additive mask ``[..., 1|M, R]``: rows with no allowed key (None: none)."""
    if mask is None:
        return None
    empty = torch.isneginf(mask).all(-1)
    return empty if bool(empty.any()) else None


@dataclass
class Chunk:
    start: int  # first query tile
    stop: int  # one past the last query tile
    gather_blocks: int = 0  # gathered key blocks per tile in this chunk
    gather_cols: int = 0  # gathered single key columns per tile in this chunk
    uniform: bool = False  # every band tile of the chunk has the plan's shared band mask

    @property
    def gathers(self) -> bool:
        return bool(self.gather_blocks or self.gather_cols)


@dataclass
class GatherSet:
    """The gathered keys of a chunk: whole blocks, then single columns."""

    blocks: Tensor  # [B'', Hk'', T, nb] key block indices (nkb = padding)
    cols: Optional[Tensor]  # [B'', Hk'', T, nc] key positions (nk = padding)
    positions: Tensor  # [B'', Hk'', T, nb·bk + nc] key position of every gathered slot (nk = padding)
    is_col: Optional[Tensor]  # [B'', Hk'', T, nb·bk + nc] which slots are columns


def _dedupe_sorted(x: Tensor, sentinel: int) -> Tensor:
    """Sort the last dim, replace repeats by ``sentinel`` and move them to the end."""
    x = torch.sort(x, dim=-1).values
    if x.shape[-1] > 1:
        dup = torch.zeros_like(x, dtype=torch.bool)
        dup[..., 1:] = x[..., 1:] == x[..., :-1]
        x = torch.sort(torch.where(dup, torch.full_like(x, sentinel), x), dim=-1).values
    return x


class TilePlan:
    """Decomposition of ``layout`` for inputs with ``batch``, ``heads_q``, ``heads_kv`` heads."""

    def __init__(
        self,
        layout: Layout,
        batch: int,
        heads_q: int,
        heads_kv: int,
        key_padding_mask: Optional[Tensor],
        chunk_elems: int = 1 << 23,
    ):
        self.layout = layout
        self.batch, self.heads_q, self.heads_kv = batch, heads_q, heads_kv
        self.group = heads_q // heads_kv
        self.bq, self.bk = layout.block_q, layout.block_k
        self.nq, self.nk = layout.q_len, layout.kv_len
        self.nqb, self.nkb = layout.num_q_blocks, layout.num_kv_blocks
        self.kpm = key_padding_mask
        self.device = layout.device
        self._find_band()
        self._find_uniform_tiles()
        self._residual_keys()
        self._make_chunks(chunk_elems)
        self._uniform_masks: dict[torch.dtype, Optional[Tensor]] = {}

    # ------------------------------------------------------------------ band
    def _find_band(self) -> None:
        lay = self.layout
        valid = lay.valid_slots()
        qb = torch.arange(self.nqb, device=self.device).view(1, 1, -1, 1)
        offsets = lay.kv_indices * self.bk - qb * self.bq  # token offset of each tile from its query tile
        self.band_lo, self.band_len = 0, 0
        self.in_band = torch.zeros_like(valid)
        if not bool(valid.any()):
            return
        values, counts = torch.unique(offsets[valid], return_counts=True)
        tiles = lay.batch * lay.heads * self.nqb
        keep = counts >= _BAND_MIN_SHARE * tiles
        values, counts = values[keep], counts[keep]
        if values.numel() == 0:
            return
        # the run of consecutive offsets (step block_k) covering the most computed tiles
        breaks = torch.nonzero(values[1:] - values[:-1] != self.bk).flatten() + 1
        bounds = [0, *breaks.tolist(), values.numel()]
        best = max(range(len(bounds) - 1), key=lambda r: int(counts[bounds[r] : bounds[r + 1]].sum()))
        lo, hi = int(values[bounds[best]]), int(values[bounds[best + 1] - 1])
        self.band_lo, self.band_len = lo, hi - lo + self.bk
        self.in_band = valid & (offsets >= lo) & (offsets <= hi)

    def _find_uniform_tiles(self) -> None:
        """Tiles whose band mask equals one reference tile's: same block states, all in range,
        and a translation-invariant (or unused) predicate. They share one broadcast mask."""
        self.uniform = torch.zeros(self.nqb, dtype=torch.bool, device=self.device)
        self.uniform_ref = -1
        if not self.band_len or self.kpm is not None or self.bq % self.bk or self.band_lo % self.bk:
            return
        lay = self.layout
        qb = torch.arange(self.nqb, device=self.device)
        first = qb * self.bq + self.band_lo
        interior = (first >= 0) & (first + self.band_len <= self.nk) & ((qb + 1) * self.bq <= self.nq)
        if not bool(interior.any()):
            return
        kb = (first // self.bk)[:, None] + torch.arange(self.band_len // self.bk, device=self.device)
        kb = kb.clamp(0, self.nkb - 1)
        rows = qb[:, None]
        selected = lay._cached("block_map")[:, :, rows, kb]  # [B', H', NQB, slots]
        partial = selected & ~lay._cached("full_map")[:, :, rows, kb]
        state = selected.to(torch.int8) + partial.to(torch.int8)
        candidates = torch.nonzero(interior).flatten()
        ref = int(candidates[candidates.numel() // 2])
        if bool(partial[:, :, ref].any()) and not getattr(lay.mask_mod, "translation_invariant", False):
            return
        same = (state == state[:, :, ref : ref + 1]).all(-1).all(0).all(0)
        self.uniform = interior & same
        self.uniform_ref = ref

    # ------------------------------------------------------------------ gathered keys
    def _owner_union(self, idx: Tensor, sentinel: int) -> Tensor:
        """Union over the query heads that share a kv head (their rows share one key buffer)."""
        if self.layout.heads > 1 and self.group > 1:
            b, _, n, s = idx.shape
            idx = (
                idx.view(b, self.heads_kv, self.group, n, s)
                .permute(0, 1, 3, 2, 4)
                .reshape(b, self.heads_kv, n, self.group * s)
            )
        return _dedupe_sorted(idx, sentinel)

    def _residual_keys(self) -> None:
        lay = self.layout
        residual = lay.valid_slots() & ~self.in_band
        blocks = torch.where(residual, lay.kv_indices, torch.full_like(lay.kv_indices, self.nkb))
        blocks = self._owner_union(blocks, self.nkb)
        width = int((blocks < self.nkb).sum(-1).max()) if blocks.numel() else 0
        self.res_blocks = blocks[..., :width]  # [B'', Hk'', NQB, Sr] sorted, sentinel nkb
        self.res_cols = None
        if lay.has_columns:
            cols = torch.where(lay.valid_columns(), lay.col_indices, torch.full_like(lay.col_indices, self.nk))
            cols = self._owner_union(cols, self.nk)
            width = int((cols < self.nk).sum(-1).max())
            self.res_cols = cols[..., :width] if width else None
        self.blocks_per_tile = (self.res_blocks < self.nkb).sum(-1).amax(dim=(0, 1))  # [NQB]
        self.cols_per_tile = torch.zeros_like(self.blocks_per_tile)
        if self.res_cols is not None:
            self.cols_per_tile = (self.res_cols < self.nk).sum(-1).amax(dim=(0, 1))

    def _make_chunks(self, chunk_elems: int) -> None:
        rows = self.batch * self.heads_q * self.bq
        self.chunks: list[Chunk] = []
        blocks, cols = self.blocks_per_tile.tolist(), self.cols_per_tile.tolist()
        uniform = self.uniform.tolist()
        start, cum, nb, nc = 0, 0, 0, 0
        for t in range(self.nqb):
            keys, chunk_keys = blocks[t] * self.bk + cols[t], nb * self.bk + nc
            cost = (self.band_len + keys) * rows
            # tiles gathering very different key counts go to different chunks (a chunk pays its max)
            lopsided = not (chunk_keys / 2 <= keys <= 2 * chunk_keys or max(keys, chunk_keys) <= self.bk)
            if t > start and (cum + cost > chunk_elems or uniform[t] != uniform[start] or lopsided):
                self.chunks.append(Chunk(start, t, nb, nc, uniform[start]))
                start, cum, nb, nc = t, 0, 0, 0
            cum += cost
            nb, nc = max(nb, blocks[t]), max(nc, cols[t])
        self.chunks.append(Chunk(start, self.nqb, nb, nc, uniform[start]))

    # ------------------------------------------------------------------ per-chunk key indices and masks
    def gather_keys(self, chunk: Chunk) -> GatherSet:
        """The keys the chunk's tiles gather (blocks sorted, padding last; then columns)."""
        blocks = self.res_blocks[:, :, chunk.start : chunk.stop, : chunk.gather_blocks]
        tok = blocks[..., None] * self.bk + torch.arange(self.bk, device=self.device)
        tok = torch.where((blocks[..., None] < self.nkb) & (tok < self.nk), tok, self.nk).flatten(-2)
        if not chunk.gather_cols:
            return GatherSet(blocks, None, tok, None)
        cols = self.res_cols[:, :, chunk.start : chunk.stop, : chunk.gather_cols]
        lead = torch.broadcast_shapes(tok.shape[:2], cols.shape[:2])
        positions = torch.cat([tok.expand(*lead, *tok.shape[2:]), cols.expand(*lead, *cols.shape[2:])], -1)
        is_col = torch.zeros(positions.shape, dtype=torch.bool, device=self.device)
        is_col[..., tok.shape[-1] :] = True
        return GatherSet(blocks, cols, positions, is_col)

    def _per_head(self, t: Tensor) -> Tensor:
        """[B'', Hk'', ...] -> indexable by layout head: [B'', H'|1, ...]."""
        if self.layout.heads > 1 and t.shape[1] > 1 and self.group > 1:
            return t.repeat_interleave(self.group, dim=1)
        return t

    def _allowed(self, chunk: Chunk, kv: Tensor, is_col: Optional[Tensor]) -> Tensor:
        """bool ``[B'|B, H'|1, T, 1|bq, R]``: whether the query rows of the chunk compute key ``kv``.

        ``kv [B'|1, H'|1, T, 1, R]`` holds key positions (``>= nk`` or ``< 0`` means padding). The row
        dim stays 1 unless the predicate is needed. Padded query rows (beyond ``nq``) are not masked:
        their results are finite and discarded.
        """
        lay = self.layout
        dev = self.device
        b = torch.arange(lay.batch, device=dev).view(-1, 1, 1, 1, 1)
        h = torch.arange(lay.heads, device=dev).view(1, -1, 1, 1, 1)
        qb = torch.arange(chunk.start, chunk.stop, device=dev).view(1, 1, -1, 1, 1)
        in_range = (kv >= 0) & (kv < self.nk)
        kv_c = kv.clamp(0, self.nk - 1)
        kb = kv_c // self.bk
        selected = lay._cached("block_map")[b, h, qb, kb]
        allowed = selected
        pred = None

        def predicate():
            q = qb * self.bq + torch.arange(self.bq, device=dev).view(1, 1, 1, -1, 1)
            return lay.mask_mod(b, h, q.clamp(max=self.nq - 1), kv_c)

        if lay.mask_mod is not None:
            full = lay._cached("full_map")[b, h, qb, kb]
            if bool((selected & ~full).any()):
                pred = predicate()
                allowed = selected & (full | pred)
        if is_col is not None and bool(is_col.any()):
            # column membership by binary search in the layout's sorted per-head column lists
            cols = torch.where(lay.valid_columns(), lay.col_indices, torch.full_like(lay.col_indices, self.nk + 1))
            cols = cols[:, :, chunk.start : chunk.stop]  # [B', H', T, C]
            flat_kv = kv_c.squeeze(3)
            shape = torch.broadcast_shapes(cols.shape[:3], flat_kv.shape[:3])
            cols_e = cols.expand(*shape, cols.shape[-1]).contiguous()
            kv_e = flat_kv.expand(*shape, flat_kv.shape[-1]).contiguous()
            pos = torch.searchsorted(cols_e, kv_e).clamp(max=cols_e.shape[-1] - 1)
            col_member = (torch.gather(cols_e, -1, pos) == kv_e).unsqueeze(3)
            if lay.mask_mod is not None:
                col_member = col_member & (predicate() if pred is None else pred)
            allowed = torch.where(is_col, col_member, allowed)
        allowed = allowed & in_range
        if self.kpm is not None:
            allowed = allowed & _kpm_lookup(self.kpm, kv_c)
        return allowed

    def band_positions(self, chunk: Chunk) -> Tensor:
        """Key positions of the band for each tile of the chunk: ``[1, 1, T, 1, L]``."""
        dev = self.device
        qb = torch.arange(chunk.start, chunk.stop, device=dev).view(1, 1, -1, 1, 1)
        return qb * self.bq + self.band_lo + torch.arange(self.band_len, device=dev).view(1, 1, 1, 1, -1)

    def band_mask(self, chunk: Chunk, dtype: torch.dtype) -> Optional[Tensor]:
        """Additive mask of the band keys for the chunk's tiles (shared across uniform tiles)."""
        if chunk.uniform:
            if dtype not in self._uniform_masks:
                ref = Chunk(self.uniform_ref, self.uniform_ref + 1, 0)
                self._uniform_masks[dtype] = self._band_mask(ref, dtype)
            return self._uniform_masks[dtype]
        return self._band_mask(chunk, dtype)

    def _band_mask(self, chunk: Chunk, dtype: torch.dtype) -> Optional[Tensor]:
        kv = self.band_positions(chunk)
        allowed = self._allowed(chunk, kv, None)
        if self.bq % self.bk or self.band_lo % self.bk:
            # the window is not block aligned for every tile: keep only keys of in-band tiles
            qb = torch.arange(chunk.start, chunk.stop, device=self.device).view(1, 1, -1, 1, 1)
            offset = torch.div(kv, self.bk, rounding_mode="floor") * self.bk - qb * self.bq
            allowed = allowed & (offset >= self.band_lo) & (offset <= self.band_lo + self.band_len - self.bk)
        return self.to_sdpa_mask(allowed, dtype)

    def gather_mask(self, chunk: Chunk, keys: GatherSet, dtype: torch.dtype) -> Optional[Tensor]:
        kv5 = self._per_head(keys.positions).unsqueeze(3)
        col5 = None if keys.is_col is None else self._per_head(keys.is_col).unsqueeze(3)
        return self.to_sdpa_mask(self._allowed(chunk, kv5, col5), dtype)

    def to_sdpa_mask(self, allowed: Tensor, dtype: torch.dtype) -> Optional[Tensor]:
        """bool ``[B'|B, H'|1, T, 1|bq, R]`` -> additive ``[1|B·Hkv, T, 1|G·bq, R]`` (None: all allowed)."""
        if bool(allowed.all()):
            return None
        bm, hm, t, m, r = allowed.shape
        g, hkv = self.group, self.heads_kv
        if g == 1 or (hm == 1 and m == 1):
            # one row pattern per kv head, or one for every head: rows stay 1 (broadcast) or bq
            if bm * hm > 1:
                allowed = allowed.expand(self.batch, hkv, t, m, r)
            rows = allowed.reshape(-1, t, m, r)
        else:
            allowed = allowed.expand(bm, hm, t, self.bq, r)
            if hm == 1:
                allowed = allowed.unsqueeze(2).expand(bm, 1, g, t, self.bq, r)
            else:
                allowed = allowed.view(bm, hkv, g, t, self.bq, r)
            allowed = allowed.permute(0, 1, 3, 2, 4, 5)  # [bm, hkv|1, T, G, bq, R]
            if allowed.shape[0] * allowed.shape[1] > 1:
                allowed = allowed.expand(self.batch, hkv, t, g, self.bq, r)
            rows = allowed.reshape(-1, t, g * self.bq, r)
        zero = torch.zeros((), dtype=dtype, device=rows.device)
        return torch.where(rows, zero, torch.full((), mask_value(dtype), dtype=dtype, device=rows.device))


def _kpm_lookup(kpm: Tensor, kv: Tensor) -> Tensor:
    """key_padding_mask ``[B, Nk]`` looked up at positions ``kv [B'|1, H'|1, T, 1, R]`` -> [B, ...]."""
    flat = kv.reshape(kv.shape[0], -1).expand(kpm.shape[0], -1)
    return torch.gather(kpm, 1, flat).view(kpm.shape[0], *kv.shape[1:])
