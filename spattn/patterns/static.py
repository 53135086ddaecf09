"""Static patterns: the selection depends only on positions, never on the values of q and k.

Positions. Query ``i`` of ``Nq`` queries sits at key position ``i' = i + Nk - Nq``: queries are aligned
to the *end* of the keys whenever ``Nq != Nk`` (as in decoding with a KV cache), causal or not.
Every definition below is written in terms of ``i'``; for ``Nq == Nk`` it is just ``i``. With
``causal=True`` a pattern additionally keeps only keys ``j <= i'``.

Construction. No pattern builds an ``Nq x Nk`` tensor: block maps ``[B', H', NQB, NKB]`` (which tiles
are computed, and which of them are *full* so the kernel can skip the predicate) come from
tile-level arithmetic on the first/last positions of each tile, and the token-level rule is
handed to the :class:`~spattn.layout.Layout` as ``mask_mod``, consulted only inside partial tiles.
The pattern's ``block`` is the Layout's tile size (queries and keys).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..layout import Layout, translation_invariant
from ..registry import register
from ._tiles import DEFAULT_BLOCK, floor_div, has_multiple, make_layout, tile_bounds
from .base import Pattern, causal_mask_mod, check_int, check_qk

__all__ = [
    "Dense",
    "Window",
    "DilatedWindow",
    "GlobalTokens",
    "BigBird",
    "Strided",
    "Fixed",
    "Axial",
    "AShape",
]


def _dense_layout(q_len: int, kv_len: int, block: int, causal: bool, device) -> Layout:
    p0, p1, k0, k1 = tile_bounds(q_len, kv_len, block, device)
    if not causal:
        every_tile = torch.ones(p0.shape[0], k0.shape[1], dtype=torch.bool, device=device)
        return make_layout(every_tile, None, None, q_len, kv_len, block)
    # a tile is touched if its first key is not after its last query, full if its last key is not
    # after its first query
    return make_layout(k0 <= p1, k1 <= p0, causal_mask_mod(q_len, kv_len), q_len, kv_len, block)


@register(
    "dense",
    kind="static",
    description="Full softmax attention (every pair, or every past pair when causal)",
    paper="Vaswani et al. 2017, Attention Is All You Need",
)
class Dense(Pattern):
    """Every (query, key) pair; with ``causal`` every key ``j <= i + Nk - Nq``."""

    name = "dense"

    def __init__(self, block: int = DEFAULT_BLOCK):
        check_int("dense", "block", block, 1)
        self.block = block

    def layout(self, q: Tensor, k: Tensor, causal: bool = False) -> Layout:
        _, _, _, nq, nk = check_qk(q, k)
        return _dense_layout(nq, nk, self.block, causal, q.device)


# ---------------------------------------------------------------------------------------------
# window, dilated window, global tokens


@register(
    "window",
    kind="static",
    description="Sliding-window (local) attention: keys with |i - j| <= size",
    paper="Beltagy et al. 2020, Longformer: The Long-Document Transformer",
)
class Window(Pattern):
    """Sliding-window / local attention (Longformer, Beltagy et al. 2020; Parmar et al. 2018).

    Query ``i`` attends keys ``j`` with ``|i' - j| <= size`` (``2*size + 1`` keys away from the
    borders); with ``causal`` the look-back window ``0 <= i' - j <= size``.
    ``i' = i + Nk - Nq`` (queries aligned to the end of the keys).
    """

    name = "window"

    def __init__(self, size: int, block: int = DEFAULT_BLOCK):
        check_int("window", "size", size, 0)
        check_int("window", "block", block, 1)
        self.size = size
        self.block = block

    def layout(self, q: Tensor, k: Tensor, causal: bool = False) -> Layout:
        _, _, _, nq, nk = check_qk(q, k)
        off = nk - nq
        lo, hi = (0, self.size) if causal else (-self.size, self.size)
        p0, p1, k0, k1 = tile_bounds(nq, nk, self.block, q.device)
        dmin, dmax = p0 - k1, p1 - k0  # i' - j over a tile takes every value in [dmin, dmax]
        block_map = (dmin <= hi) & (dmax >= lo)
        full_map = (dmin >= lo) & (dmax <= hi)

        @translation_invariant
        def window_mask(b, h, q_idx, kv_idx):
            d = q_idx + off - kv_idx
            return (d >= lo) & (d <= hi)

        return make_layout(block_map, full_map, window_mask, nq, nk, self.block)


@register(
    "dilated_window",
    kind="static",
    description="Dilated sliding window: keys j = i + t*dilation with |t| <= size",
    paper="Beltagy et al. 2020, Longformer: The Long-Document Transformer",
)
class DilatedWindow(Pattern):
    """Dilated sliding window (Longformer, Beltagy et al. 2020).

    Query ``i`` attends keys ``j = i' + t * dilation`` with ``|t| <= size``; with ``causal``
    ``-size <= t <= 0``. ``dilation=1`` is :class:`Window`.
    """

    name = "dilated_window"

    def __init__(self, size: int, dilation: int, block: int = DEFAULT_BLOCK):
        check_int("dilated_window", "size", size, 0)
        check_int("dilated_window", "dilation", dilation, 1)
        check_int("dilated_window", "block", block, 1)
        self.size = size
        self.dilation = dilation
        self.block = block

    def layout(self, q: Tensor, k: Tensor, causal: bool = False) -> Layout:
        _, _, _, nq, nk = check_qk(q, k)
        off, dil = nk - nq, self.dilation
        span = self.size * dil
        lo, hi = (0, span) if causal else (-span, span)
        p0, p1, k0, k1 = tile_bounds(nq, nk, self.block, q.device)
        dmin, dmax = p0 - k1, p1 - k0
        block_map = has_multiple(torch.clamp(dmin, min=lo), torch.clamp(dmax, max=hi), dil)
        full_map = (dmin >= lo) & (dmax <= hi) & ((dmin == dmax) | (dil == 1)) & (dmin % dil == 0)

        @translation_invariant
        def dilated_mask(b, h, q_idx, kv_idx):
            d = q_idx + off - kv_idx
            return (d >= lo) & (d <= hi) & (d % dil == 0)

        return make_layout(block_map, full_map, dilated_mask, nq, nk, self.block)


@register(
    "global_tokens",
    kind="static",
    description="Global tokens: the first `count` positions see all and are seen by all",
    paper="Beltagy et al. 2020, Longformer: The Long-Document Transformer",
)
class GlobalTokens(Pattern):
    """Longformer's global attention (Beltagy et al. 2020): the first ``count`` positions attend
    every key and are attended by every query, i.e. the pairs with ``i' < count`` or ``j < count``;
    with ``causal`` also ``j <= i'``. Combine with a window by ``layout_a | layout_b``.
    """

    name = "global_tokens"

    def __init__(self, count: int, block: int = DEFAULT_BLOCK):
        check_int("global_tokens", "count", count, 1)
        check_int("global_tokens", "block", block, 1)
        self.count = count
        self.block = block

    def layout(self, q: Tensor, k: Tensor, causal: bool = False) -> Layout:
        _, _, _, nq, nk = check_qk(q, k)
        off, c = nk - nq, self.count
        p0, p1, k0, k1 = tile_bounds(nq, nk, self.block, q.device)
        if causal:
            # a global query i' < count only sees j <= i' < count: global keys anyway
            block_map = (k0 <= p1) & (k0 < c)
            full_map = (k1 <= p0) & (k1 < c)
        else:
            block_map = (p0 < c) | (k0 < c)
            full_map = (p1 < c) | (k1 < c)

        def global_mask(b, h, q_idx, kv_idx):
            p = q_idx + off
            ok = (p < c) | (kv_idx < c)
            return ok & (kv_idx <= p) if causal else ok

        return make_layout(block_map, full_map, global_mask, nq, nk, self.block)


# ---------------------------------------------------------------------------------------------
# BigBird

_MASK32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (xor-shift-multiply); products stay below 2**63."""
    x = x & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


@register(
    "bigbird",
    kind="static",
    description="BigBird blocks: window + global + seeded random key blocks (per head)",
    paper="Zaheer et al. 2020, Big Bird: Transformers for Longer Sequences",
)
class BigBird(Pattern):
    """Block-level BigBird (Zaheer et al. 2020, the ITC variant), in blocks of ``block`` tokens.

    Query tile ``qb`` (queries ``qb*block ...``) sits at key block
    ``a(qb) = floor(i'_last / block)``, ``i'_last`` the aligned position of its last query
    (``a(qb) = qb`` when ``Nq == Nk``). It attends key block ``kb`` when

    * ``|a(qb) - kb| <= window // 2`` (sliding window of blocks),
    * ``kb < globals`` (global key blocks), or ``a(qb) < globals`` (global query blocks see all),
    * ``kb`` is one of ``random`` blocks drawn for (head, ``qb``) among the blocks not selected by
      the rules above (fewer when fewer remain): see :meth:`random_blocks`.

    Non-causal, every selected tile is computed in full. With ``causal``, only ``kb <= a(qb)``, the
    random blocks come from that visible past, and the token-level causal rule ``j <= i'`` applies.
    The Layout's ``mask_mod`` is the whole definition (a lookup in the block table, plus causality).
    The random draw differs per query head, so the Layout has ``H' = Hq`` heads (1 if ``random=0``).
    """

    name = "bigbird"

    def __init__(self, block: int = DEFAULT_BLOCK, window: int = 3, globals: int = 2, random: int = 3, seed: int = 0):
        check_int("bigbird", "block", block, 1)
        check_int("bigbird", "window", window, 0)
        check_int("bigbird", "globals", globals, 0)
        check_int("bigbird", "random", random, 0)
        check_int("bigbird", "seed", seed, 0)
        self.block = block
        self.window = window
        self.globals = globals
        self.random = random
        self.seed = seed

    # block-level geometry -------------------------------------------------------------------
    def anchors(self, q_len: int, kv_len: int, device=None) -> Tensor:
        """long ``[NQB]``: the key block each query tile sits at (``a(qb)``)."""
        last = (torch.arange(0, q_len, self.block, device=device) + self.block - 1).clamp(max=q_len - 1)
        return floor_div(last + (kv_len - q_len), self.block)

    def _base_map(self, q_len: int, kv_len: int, causal: bool, device) -> Tensor:
        a = self.anchors(q_len, kv_len, device)[:, None]
        kb = torch.arange(-(-kv_len // self.block), device=device)[None, :]
        base = ((a - kb).abs() <= self.window // 2) | (kb < self.globals) | (a < self.globals)
        return base & (kb <= a) if causal else base

    def random_blocks(self, num_heads: int, q_len: int, kv_len: int, causal: bool = False, device=None) -> Tensor:
        """long ``[num_heads, NQB, random]``: the random key blocks of each (head, query tile),
        ascending, padded with -1 when fewer than ``random`` blocks remain to draw from.

        Drawn without replacement, uniformly, among the key blocks not selected by the window and
        global rules (and, when causal, not after ``a(qb)``). A pure function of
        ``(seed, head, qb, lengths)``: candidate ``kb`` gets the hash of ``(seed, head, qb, kb)`` as
        its score and the ``random`` lowest scores win.
        """
        check_int("bigbird.random_blocks", "num_heads", num_heads, 1)
        nqb, nkb = -(-q_len // self.block), -(-kv_len // self.block)
        r = self.random
        if r == 0:
            return torch.empty(num_heads, nqb, 0, dtype=torch.long, device=device)
        cand = ~self._base_map(q_len, kv_len, False, device)
        if causal:
            a = self.anchors(q_len, kv_len, device)[:, None]
            cand &= torch.arange(nkb, device=device)[None, :] <= a
        seed = self.seed
        folded = 0
        while True:
            folded ^= seed & _MASK32
            seed >>= 32
            if not seed:
                break
        h = torch.arange(num_heads, device=device).view(-1, 1, 1)
        qb = torch.arange(nqb, device=device).view(1, -1, 1)
        kb = torch.arange(nkb, device=device).view(1, 1, -1)
        base = _mix32(torch.tensor(folded, device=device) + 0x9E3779B9)
        score = _mix32(_mix32(_mix32(base + h) + qb * 0x3C6EF372 + 1) + kb)
        big = 1 << 40
        score = torch.where(cand, score, big)
        order = torch.sort(score, dim=-1, stable=True)
        take = min(r, nkb)
        idx = order.indices[..., :take]
        ok = order.values[..., :take] < big
        idx = torch.sort(torch.where(ok, idx, nkb), dim=-1).values
        idx = torch.where(idx < nkb, idx, -1)
        if take < r:
            idx = torch.nn.functional.pad(idx, (0, r - take), value=-1)
        return idx

    def layout(self, q: Tensor, k: Tensor, causal: bool = False) -> Layout:
        _, hq, _, nq, nk = check_qk(q, k)
        dev = q.device
        nkb = -(-nk // self.block)
        block_map = self._base_map(nq, nk, causal, dev)[None, None]
        if self.random > 0:
            rnd = self.random_blocks(hq, nq, nk, causal, dev)
            hits = torch.zeros(hq, rnd.shape[1], nkb + 1, dtype=torch.bool, device=dev)
            hits.scatter_(-1, torch.where(rnd >= 0, rnd, nkb), True)
            block_map = block_map | hits[None, :, :, :nkb]
        # the predicate is the whole definition (block table lookup + causal), so that consumers
        # which evaluate it outside the listed tiles (e.g. eager FlexAttention) stay exact
        table = block_map[0].contiguous()
        multi_h, blk, off = table.shape[0] > 1, self.block, nk - nq

        def bigbird_mask(b, h, q_idx, kv_idx):
            hit = table[
                h * multi_h, torch.div(q_idx, blk, rounding_mode="floor"), torch.div(kv_idx, blk, rounding_mode="floor")
            ]
            return hit & (kv_idx <= q_idx + off) if causal else hit

        if not causal:
            return make_layout(block_map, block_map, bigbird_mask, nq, nk, self.block)
        p0, _, _, k1 = tile_bounds(nq, nk, self.block, dev)
        return make_layout(block_map, k1 <= p0, bigbird_mask, nq, nk, self.block)


# ---------------------------------------------------------------------------------------------
# Sparse Transformer: strided and fixed


@register(
    "strided",
    kind="static",
    description="Sparse Transformer strided (both heads merged): i-j < stride or (i-j) % stride == 0",
    paper="Child et al. 2019, Generating Long Sequences with Sparse Transformers",
)
class Strided(Pattern):
    """Strided attention of the Sparse Transformer (Child et al. 2019), *merged* form: the union of
    the paper's two factorized heads, the local head ``|i' - j| < stride`` (causal:
    ``0 <= i' - j < stride``) and the strided head ``(i' - j) mod stride == 0`` (causal: ``j <= i'``).
    The paper splits these across heads or layers; one pattern here computes their union.
    """

    name = "strided"

    def __init__(self, stride: int, block: int = DEFAULT_BLOCK):
        check_int("strided", "stride", stride, 1)
        check_int("strided", "block", block, 1)
        self.stride = stride
        self.block = block

    def layout(self, q: Tensor, k: Tensor, causal: bool = False) -> Layout:
        _, _, _, nq, nk = check_qk(q, k)
        off, s = nk - nq, self.stride
        p0, p1, k0, k1 = tile_bounds(nq, nk, self.block, q.device)
        dmin, dmax = p0 - k1, p1 - k0
        single = (dmin == dmax) & (dmin % s == 0)
        if causal:
            lo = dmin.clamp(min=0)
            block_map = (lo <= dmax) & ((lo <= s - 1) | has_multiple(lo, dmax, s))
            full_map = (dmin >= 0) & ((dmax <= s) | single | (s == 1))
        else:
            block_map = ((dmin <= s - 1) & (dmax >= 1 - s)) | has_multiple(dmin, dmax, s)
            full_map = ((dmin >= -s) & (dmax <= s)) | single | (s == 1)

        @translation_invariant
        def strided_mask(b, h, q_idx, kv_idx):
            d = q_idx + off - kv_idx
            if causal:
                return (d >= 0) & ((d < s) | (d % s == 0))
            return (d.abs() < s) | (d % s == 0)

        return make_layout(block_map, full_map, strided_mask, nq, nk, self.block)


@register(
    "fixed",
    kind="static",
    description="Sparse Transformer fixed (both heads merged): same block of `block`, or summary columns",
    paper="Child et al. 2019, Generating Long Sequences with Sparse Transformers",
)
class Fixed(Pattern):
    """Fixed attention of the Sparse Transformer (Child et al. 2019), *merged* form (the union of
    the paper's two heads), with ``l = block`` and ``c = summary``: query ``i`` attends ``j`` when
    ``floor(j / l) == floor(i' / l)`` (same block) or ``j mod l in {l-c, ..., l-1}`` (the last ``c``
    positions of every block summarise it); ``causal`` adds ``j <= i'``.

    When ``4 * summary <= block`` the summary positions are given to the Layout as extra key
    columns (so a kernel gathers ``c/l`` of the keys instead of computing every tile).
    """

    name = "fixed"

    def __init__(self, block: int = DEFAULT_BLOCK, summary: int = 8):
        check_int("fixed", "block", block, 1)
        check_int("fixed", "summary", summary, 1)
        if summary > block:
            raise ValueError(f"fixed: summary must be <= block ({block}), got {summary}")
        self.block = block
        self.summary = summary

    def layout(self, q: Tensor, k: Tensor, causal: bool = False) -> Layout:
        _, _, _, nq, nk = check_qk(q, k)
        off, l, c = nk - nq, self.block, self.summary
        p0, p1, k0, k1 = tile_bounds(nq, nk, l, q.device)
        kb = floor_div(k0, l)  # key tiles are exactly the blocks of l
        same = (floor_div(p0, l) <= kb) & (kb <= floor_div(p1, l))  # j >= kb*l <= i' holds there
        one_block = (floor_div(p0, l) == kb) & (floor_div(p1, l) == kb)
        past = (k1 <= p0) if causal else torch.ones_like(same)

        def fixed_mask(b, h, q_idx, kv_idx):
            p = q_idx + off
            ok = (torch.div(kv_idx, l, rounding_mode="floor") == torch.div(p, l, rounding_mode="floor")) | (
                kv_idx % l >= l - c
            )
            return ok & (kv_idx <= p) if causal else ok

        if 4 * c <= l:
            j = torch.arange(nk, device=q.device)[None, :]
            cols = j % l >= l - c
            if causal:
                cols = cols & (j <= p1)
            else:
                cols = cols.expand(p0.shape[0], nk)
            return make_layout(same, one_block & past, fixed_mask, nq, nk, l, column_map=cols)
        s0 = k0 + l - c  # first summary key of the tile
        summ = (s0 <= k1) & ((s0 <= p1) if causal else True)
        block_map = same | summ
        full_map = (one_block | (c == l)) & past
        return make_layout(block_map, full_map, fixed_mask, nq, nk, l)


# ---------------------------------------------------------------------------------------------
# axial, A-shape


@register(
    "axial",
    kind="static",
    description="Axial attention on a rows x cols grid (row-major): same row or same column",
    paper="Ho et al. 2019, Axial Attention in Multidimensional Transformers",
)
class Axial(Pattern):
    """Axial attention (Ho et al. 2019), both axes merged in one pattern: the ``Nk`` keys form a
    ``rows x cols`` grid in row-major order (``cols = Nk / rows``); query ``i`` (at grid position
    ``i'``) attends keys in the same row or the same column; ``causal`` adds ``j <= i'``.
    Requires ``Nk % rows == 0`` and ``Nq <= Nk``.
    """

    name = "axial"

    def __init__(self, rows: int, block: int = DEFAULT_BLOCK):
        check_int("axial", "rows", rows, 1)
        check_int("axial", "block", block, 1)
        self.rows = rows
        self.block = block

    def layout(self, q: Tensor, k: Tensor, causal: bool = False) -> Layout:
        _, _, _, nq, nk = check_qk(q, k)
        if nk % self.rows:
            raise ValueError(f"axial: the number of keys ({nk}) must be divisible by rows={self.rows}")
        if nq > nk:
            raise ValueError(f"axial: queries are grid positions, so Nq ({nq}) must be <= Nk ({nk})")
        off, cols = nk - nq, nk // self.rows
        p0, p1, k0, k1 = tile_bounds(nq, nk, self.block, q.device)
        dmin, dmax = p0 - k1, p1 - k0
        # same column: i' - j is a multiple of cols
        col_sel = has_multiple(dmin.clamp(min=0) if causal else dmin, dmax, cols)
        # same row: the rows both tiles touch; causal also needs a key <= query within one row
        rlo = torch.maximum(floor_div(p0, cols), floor_div(k0, cols))
        rhi = torch.minimum(floor_div(p1, cols), floor_div(k1, cols))
        row_sel = rlo <= rhi
        if causal:

            def row_ok(r):  # earliest key of the tile in row r <= latest query of the tile in row r
                return torch.maximum(k0, r * cols) <= torch.minimum(p1, r * cols + cols - 1)

            row_sel = row_sel & ((rhi - rlo >= 2) | row_ok(rlo) | row_ok(rhi))
        block_map = row_sel | col_sel
        # full (conservative but exact for tiles of > 1 query and key): one shared row, or one column
        one_row = (floor_div(p0, cols) == floor_div(k1, cols)) & (floor_div(p1, cols) == floor_div(k0, cols))
        full_map = one_row | (cols == 1)
        if causal:
            full_map = full_map & (dmin >= 0)

        def axial_mask(b, h, q_idx, kv_idx):
            p = q_idx + off
            ok = (torch.div(p, cols, rounding_mode="floor") == torch.div(kv_idx, cols, rounding_mode="floor")) | (
                p % cols == kv_idx % cols
            )
            return ok & (kv_idx <= p) if causal else ok

        return make_layout(block_map, full_map, axial_mask, nq, nk, self.block)


@register(
    "a_shape",
    kind="static",
    description="A-shape: attention sinks (first `sinks` keys) + local window of `local` keys",
    paper="Xiao et al. 2023, Efficient Streaming Language Models with Attention Sinks; Jiang et al. 2024, MInference",
)
class AShape(Pattern):
    """Attention sinks + local window (StreamingLLM, Xiao et al. 2023; MInference's A-shape,
    Jiang et al. 2024). Causal: ``j <= i'`` and (``j < sinks`` or ``i' - j < local``);
    non-causal: ``j < sinks`` or ``|i' - j| < local``.
    """

    name = "a_shape"

    def __init__(self, sinks: int = 64, local: int = 1024, block: int = DEFAULT_BLOCK):
        check_int("a_shape", "sinks", sinks, 0)
        check_int("a_shape", "local", local, 1)
        check_int("a_shape", "block", block, 1)
        self.sinks = sinks
        self.local = local
        self.block = block

    def layout(self, q: Tensor, k: Tensor, causal: bool = False) -> Layout:
        _, _, _, nq, nk = check_qk(q, k)
        off, s, w = nk - nq, self.sinks, self.local
        p0, p1, k0, k1 = tile_bounds(nq, nk, self.block, q.device)
        dmin, dmax = p0 - k1, p1 - k0
        # extreme i' - j over the pairs whose key is not a sink
        ns_dmax = p1 - torch.clamp(k0, min=s)
        no_nonsink = k1 < s
        if causal:
            block_map = ((k0 < s) & (k0 <= p1)) | ((dmin <= w - 1) & (dmax >= 0))
            full_map = (dmin >= 0) & (no_nonsink | (ns_dmax <= w - 1))
        else:
            block_map = (k0 < s) | ((dmin <= w - 1) & (dmax >= 1 - w))
            full_map = no_nonsink | ((ns_dmax <= w - 1) & (dmin >= 1 - w))

        def a_shape_mask(b, h, q_idx, kv_idx):
            d = q_idx + off - kv_idx
            if causal:
                return (d >= 0) & ((kv_idx < s) | (d < w))
            return (kv_idx < s) | (d.abs() < w)

        return make_layout(block_map, full_map, a_shape_mask, nq, nk, self.block)
