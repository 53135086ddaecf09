"""Layout: which (query, key) pairs an attention computes — the contract between patterns and kernels.

The sequence of queries is cut into blocks of ``block_q`` tokens and the keys into blocks of
``block_k`` tokens. Per (batch, head, query block) a Layout records, FlexAttention-style,

* ``kv_num_blocks[b, h, qb]``: how many key blocks are computed, and
* ``kv_indices[b, h, qb, :kv_num_blocks]``: which ones, sorted ascending (later slots are padding),
* ``full[b, h, qb, s]``: whether every pair of that tile is computed; tiles that are not full are
  *partial* and keep only the pairs where the token predicate ``mask_mod`` holds,
* optional extra key *columns* ``col_indices[b, h, qb, :col_num]`` (token positions, e.g. global
  tokens or MInference's vertical lines) computed for every query of the block where ``mask_mod``
  holds (or for all of them when there is no predicate).

Query ``i`` attends key ``j`` iff
``(kb(j) selected for qb(i) and (full or mask_mod(b, h, i, j))) or (j a column of qb(i) and mask_mod(b, h, i, j))``.

``mask_mod(b, h, q_idx, kv_idx) -> bool tensor`` takes broadcastable integer tensors, as in
FlexAttention; ``b`` and ``h`` index the Layout's own batch/head dimensions, which are either the
real sizes or 1 (shared, broadcast). Predicates that depend on positions only through ``q_idx - kv_idx``
should be marked with :func:`translation_invariant` so kernels can reuse tile masks. Nothing here materialises an Nq x Nk tensor except
:meth:`Layout.to_dense` and layouts built by :meth:`Layout.from_dense`.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ._checks import check_int, is_int

__all__ = ["Layout", "MaskMod", "translation_invariant", "ceil_div", "true_positions"]

#: mixed-radix tile keys above this would overflow int64 (then rows are deduplicated as tuples)
_INT64_KEYS = 2**63 - 1

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def translation_invariant(mask_mod: MaskMod) -> MaskMod:
    """Mark a predicate that depends on ``q_idx`` and ``kv_idx`` only through ``q_idx - kv_idx``.

    Kernels may then reuse one tile's mask for every tile with the same block structure
    (windows, causal diagonals, dilations); an unmarked predicate is always evaluated per tile.
    """
    mask_mod.translation_invariant = True  # type: ignore[attr-defined]
    return mask_mod


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ``b``: the number of blocks of ``b`` covering ``a`` positions."""
    return -(-a // b)


def true_positions(mask: Tensor, fill: int = 0, min_width: int = 1) -> tuple[Tensor, Tensor]:
    """For a bool tensor ``[..., M]``: ``(count [...], positions [..., W])`` -- the True entries' indices
    ascending, padded with ``fill`` to ``W = max(max count, min_width)``. The one block-map -> index
    conversion of the package (Layouts from block maps, per-query key lists, Layout columns).

    Linear time: each True entry is scattered to its rank (a running count), no sort.
    """
    num = mask.sum(-1)
    width = max(int(num.max()) if num.numel() else 0, min_width)
    rank = torch.where(mask, mask.cumsum(-1) - 1, width)  # False entries go to a spill slot
    out = torch.full((*mask.shape[:-1], width + 1), fill, dtype=torch.long, device=mask.device)
    positions = torch.arange(mask.shape[-1], device=mask.device).expand(mask.shape)
    out.scatter_(-1, rank, positions)
    return num, out[..., :width]


def _check_size(name: str, value) -> int:
    """``value`` as an int >= 1 (numpy integers accepted), or raise naming ``name``."""
    return check_int(None, name, value, 1, numpy=True)


def _check_int_tensor(name: str, t: Tensor, dims: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims, got shape {tuple(t.shape)}")


class Layout:
    """Block-sparse description of an attention pattern (see module docstring).

    Shapes: ``kv_num_blocks [B', H', NQB]``, ``kv_indices [B', H', NQB, S]``, ``full [B', H', NQB, S]``,
    ``col_num [B', H', NQB]``, ``col_indices [B', H', NQB, C]`` with ``B'`` in {1, B}, ``H'`` in {1, H}.
    Implements the :class:`~spattn.selection.Selection` protocol.
    """

    kind = "layout"

    def __init__(
        self,
        kv_num_blocks: Tensor,
        kv_indices: Tensor,
        *,
        q_len: int,
        kv_len: int,
        block_q: int,
        block_k: Optional[int] = None,
        mask_mod: Optional[MaskMod] = None,
        full: Optional[Tensor] = None,
        col_num: Optional[Tensor] = None,
        col_indices: Optional[Tensor] = None,
    ):
        q_len, kv_len = _check_size("q_len", q_len), _check_size("kv_len", kv_len)
        block_q = _check_size("block_q", block_q)
        block_k = block_q if block_k is None else _check_size("block_k", block_k)
        # a tile longer than its sequence covers exactly the same pairs as one of the sequence's length:
        # clamp, so that kernels never allocate block_q x block_k tiles for short sequences
        block_q, block_k = min(block_q, q_len), min(block_k, kv_len)
        if mask_mod is not None and not callable(mask_mod):
            raise TypeError(
                f"mask_mod must be callable (b, h, q_idx, kv_idx) -> bool tensor, got {type(mask_mod).__name__}"
            )
        _check_int_tensor("kv_num_blocks", kv_num_blocks, 3)
        _check_int_tensor("kv_indices", kv_indices, 4)
        if 0 in kv_num_blocks.shape[:2]:
            raise ValueError(
                f"kv_num_blocks must have batch and head sizes >= 1, got shape {tuple(kv_num_blocks.shape)}"
            )
        self.q_len, self.kv_len, self.block_q, self.block_k = q_len, kv_len, block_q, block_k
        nqb, nkb = ceil_div(q_len, block_q), ceil_div(kv_len, block_k)
        bh = tuple(kv_num_blocks.shape[:2])
        if kv_num_blocks.shape[2] != nqb:
            raise ValueError(
                f"kv_num_blocks must have {nqb} query blocks (q_len={q_len}, block_q={block_q}) "
                f"in dim 2, got shape {tuple(kv_num_blocks.shape)}"
            )
        if tuple(kv_indices.shape[:3]) != bh + (nqb,):
            raise ValueError(f"kv_indices must have shape {bh + (nqb,)} + (slots,), got {tuple(kv_indices.shape)}")
        device = kv_indices.device
        num = kv_num_blocks.to(device=device, dtype=torch.long)
        slots = kv_indices.shape[3]
        if num.numel() and (int(num.min()) < 0 or int(num.max()) > slots):
            raise ValueError(f"kv_num_blocks must lie in [0, {slots}] (the number of slots in kv_indices)")
        valid = torch.arange(slots, device=device) < num[..., None]
        idx = kv_indices.to(torch.long)
        if bool(((idx < 0) | (idx >= nkb))[valid].any()):
            raise ValueError(f"kv_indices must lie in [0, {nkb}) for kv_len={kv_len}, block_k={block_k}")
        if full is None:
            full = torch.full(valid.shape, mask_mod is None, dtype=torch.bool, device=device)
        else:
            if not isinstance(full, Tensor) or full.dtype != torch.bool or full.shape != kv_indices.shape:
                raise ValueError(f"full must be a bool tensor of shape {tuple(kv_indices.shape)}")
            full = full.to(device) | (mask_mod is None)
        # sort the valid slots ascending, padding (index nkb) last; reject duplicates
        key = torch.where(valid, idx, torch.full_like(idx, nkb))
        key, order = torch.sort(key, dim=-1, stable=True)
        if slots > 1 and bool(((key[..., 1:] == key[..., :-1]) & (key[..., 1:] < nkb)).any()):
            raise ValueError("kv_indices must not repeat a key block within one query block")
        self.kv_num_blocks = num
        self.kv_indices = torch.where(key < nkb, key, torch.zeros_like(key))
        self.full = torch.gather(full, -1, order) & (key < nkb)
        self.mask_mod = mask_mod
        self.col_num, self.col_indices = self._normalize_columns(col_num, col_indices, bh, nqb, device)

    def check(self) -> "Layout":
        """Re-validate the index tables (they are ordinary, mutable tensors) before a kernel reads them.

        Raises ValueError naming the table and its valid range when a count, block index or column lies
        outside it, a valid slot repeats or is out of order, or a table's shape or dtype changed.
        Cost: a few reductions over ``B' x H' x NQB x S`` integers, and nothing when no table changed
        since the last check (tensors count their in-place writes in ``_version``); a change also drops
        the cached block maps. Returns ``self``.
        """
        tables = (self.kv_num_blocks, self.kv_indices, self.full, self.col_num, self.col_indices)
        signature = tuple((id(t), getattr(t, "_version", None)) for t in tables)
        if self.__dict__.get("_checked") == signature:
            return self
        for derived in ("_cache", "_checked", "_flex_block_masks"):  # maps (and flex's BlockMask) of old tables
            self.__dict__.pop(derived, None)
        nqb, nkb = ceil_div(self.q_len, self.block_q), ceil_div(self.kv_len, self.block_k)
        num, idx, full = self.kv_num_blocks, self.kv_indices, self.full
        for name, t, dims in (("kv_num_blocks", num, 3), ("kv_indices", idx, 4)):
            if not isinstance(t, Tensor) or t.dtype != torch.long or t.dim() != dims:
                raise ValueError(
                    f"Layout.{name} must be an int64 tensor with {dims} dims (changed after construction?)"
                )
        slots = idx.shape[3]
        if (
            num.shape[2] != nqb
            or tuple(idx.shape[:3]) != tuple(num.shape)
            or not isinstance(full, Tensor)
            or full.shape != idx.shape
        ):
            raise ValueError(
                f"Layout tables have inconsistent shapes: kv_num_blocks {tuple(num.shape)}, "
                f"kv_indices {tuple(idx.shape)}, full {tuple(getattr(full, 'shape', ()))}; "
                f"expected [B', H', {nqb}] and [B', H', {nqb}, S]"
            )
        if num.numel() and (int(num.min()) < 0 or int(num.max()) > slots):
            raise ValueError(
                f"Layout.kv_num_blocks must lie in [0, {slots}] (slots of kv_indices), "
                f"got values in [{int(num.min())}, {int(num.max())}]"
            )
        valid = torch.arange(slots, device=idx.device) < num[..., None]
        bad = ((idx < 0) | (idx >= nkb)) & valid
        if bool(bad.any()):
            raise ValueError(f"Layout.kv_indices must lie in [0, {nkb}) (key blocks), got {int(idx[bad][0])}")
        if slots > 1 and bool(((idx[..., 1:] <= idx[..., :-1]) & valid[..., 1:]).any()):
            raise ValueError("Layout.kv_indices must be strictly increasing over the valid slots")
        if self.col_num is not None:
            cnum, cidx = self.col_num, self.col_indices
            if (
                not isinstance(cidx, Tensor)
                or cidx.dtype != torch.long
                or cidx.dim() != 4
                or tuple(cidx.shape[:3]) != tuple(num.shape)
                or tuple(cnum.shape) != tuple(num.shape)
            ):
                raise ValueError("Layout.col_num / col_indices changed shape or dtype after construction")
            width = cidx.shape[3]
            if int(cnum.min()) < 0 or int(cnum.max()) > width:
                raise ValueError(f"Layout.col_num must lie in [0, {width}]")
            cvalid = torch.arange(width, device=cidx.device) < cnum[..., None]
            if bool((((cidx < 0) | (cidx >= self.kv_len)) & cvalid).any()):
                raise ValueError(f"Layout.col_indices must lie in [0, {self.kv_len})")
        self.__dict__["_checked"] = signature
        return self

    # ------------------------------------------------------------------ construction helpers
    def _normalize_columns(self, col_num, col_indices, bh, nqb, device):
        if (col_num is None) != (col_indices is None):
            raise ValueError("col_num and col_indices must be given together")
        if col_num is None:
            return None, None
        _check_int_tensor("col_num", col_num, 3)
        _check_int_tensor("col_indices", col_indices, 4)
        if tuple(col_num.shape) != bh + (nqb,) or tuple(col_indices.shape[:3]) != bh + (nqb,):
            raise ValueError(
                f"col_num must have shape {bh + (nqb,)} and col_indices {bh + (nqb,)} + (columns,), "
                f"got {tuple(col_num.shape)} and {tuple(col_indices.shape)}"
            )
        cnum = col_num.to(device=device, dtype=torch.long)
        cidx = col_indices.to(device=device, dtype=torch.long)
        width = cidx.shape[3]
        if cnum.numel() and (int(cnum.min()) < 0 or int(cnum.max()) > width):
            raise ValueError(f"col_num must lie in [0, {width}]")
        cvalid = torch.arange(width, device=device) < cnum[..., None]
        if bool(((cidx < 0) | (cidx >= self.kv_len))[cvalid].any()):
            raise ValueError(f"col_indices must lie in [0, {self.kv_len})")
        # a column inside a selected block of the same query block is already computed: drop it
        covered = torch.gather(self.block_map(), -1, (cidx.clamp(0, self.kv_len - 1) // self.block_k))
        keep = cvalid & ~covered
        sentinel = self.kv_len
        key = torch.where(keep, cidx, torch.full_like(cidx, sentinel))
        key = torch.sort(key, dim=-1).values
        if width > 1 and bool(((key[..., 1:] == key[..., :-1]) & (key[..., 1:] < sentinel)).any()):
            raise ValueError("col_indices must not repeat a column within one query block")
        num = keep.sum(-1)
        if int(num.max()) == 0:
            return None, None
        key = key[..., : int(num.max())]
        return num, torch.where(key < sentinel, key, torch.zeros_like(key))

    @classmethod
    def from_block_map(
        cls,
        block_map: Tensor,
        *,
        q_len: int,
        kv_len: int,
        block_q: int,
        block_k: Optional[int] = None,
        full_map: Optional[Tensor] = None,
        mask_mod: Optional[MaskMod] = None,
        column_map: Optional[Tensor] = None,
    ) -> "Layout":
        """Build from a block-level bool map ``[B', H', NQB, NKB]`` (True = tile computed).

        ``full_map`` (same shape) marks tiles needing no predicate; ``column_map [B', H', NQB, Nk]``
        marks extra key columns per query block.
        """
        if not isinstance(block_map, Tensor) or block_map.dtype != torch.bool or block_map.dim() != 4:
            raise ValueError("block_map must be a 4-D bool tensor [B', H', NQB, NKB]")
        q_len, kv_len = _check_size("q_len", q_len), _check_size("kv_len", kv_len)
        block_q = _check_size("block_q", block_q)
        block_k = block_q if block_k is None else _check_size("block_k", block_k)
        nqb, nkb = ceil_div(q_len, block_q), ceil_div(kv_len, block_k)
        if tuple(block_map.shape[2:]) != (nqb, nkb):
            raise ValueError(
                f"block_map must be [B', H', NQB, NKB] = [B', H', {nqb}, {nkb}] for q_len={q_len}, kv_len={kv_len}, "
                f"block_q={block_q}, block_k={block_k}; got shape {tuple(block_map.shape)}"
            )
        num, idx = true_positions(block_map)
        full = None
        if full_map is not None:
            if not isinstance(full_map, Tensor) or full_map.shape != block_map.shape or full_map.dtype != torch.bool:
                raise ValueError(f"full_map must be a bool tensor of shape {tuple(block_map.shape)}")
            full = torch.gather(full_map, -1, idx)
        col_num = col_idx = None
        if column_map is not None:
            lead = tuple(block_map.shape[:3])
            if (
                not isinstance(column_map, Tensor)
                or column_map.dtype != torch.bool
                or column_map.dim() != 4
                or column_map.shape[3] != kv_len
                or any(c not in (1, b) for c, b in zip(column_map.shape[:3], lead))
            ):
                shape = tuple(column_map.shape) if isinstance(column_map, Tensor) else type(column_map).__name__
                raise ValueError(
                    f"column_map must be a bool tensor [B', H', NQB, Nk] broadcastable to "
                    f"{lead + (kv_len,)}, got {shape}"
                )
            col_num, col_idx = true_positions(column_map.expand(*lead, kv_len))
        return cls(
            num,
            idx,
            q_len=q_len,
            kv_len=kv_len,
            block_q=block_q,
            block_k=block_k,
            mask_mod=mask_mod,
            full=full,
            col_num=col_num,
            col_indices=col_idx,
        )

    @classmethod
    def from_dense(cls, mask: Tensor, block_q: int, block_k: Optional[int] = None) -> "Layout":
        """Layout computing exactly the True pairs of ``mask`` (``[Nq, Nk]``, ``[B', H', Nq, Nk]``).

        For tests and user-given masks: the predicate looks the mask up, so the mask is kept alive.
        """
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise TypeError(f"mask must be a bool tensor [Nq, Nk] or [B', H', Nq, Nk], got {got}")
        if mask.dim() == 2:
            mask = mask[None, None]
        if mask.dim() != 4 or 0 in mask.shape:
            raise ValueError(
                f"mask must have shape [Nq, Nk] or [B', H', Nq, Nk] with no empty dimension, got {tuple(mask.shape)}"
            )
        block_q = _check_size("block_q", block_q)
        block_k = block_q if block_k is None else _check_size("block_k", block_k)
        bp, hp, nq, nk = mask.shape
        # a tile larger than the sequence covers the same pairs as one of the sequence's size: clamp it
        # so the padded mask below stays Nq x Nk (exact either way)
        block_q, block_k = min(block_q, nq), min(block_k, nk)
        nqb, nkb = ceil_div(nq, block_q), ceil_div(nk, block_k)
        padded = torch.nn.functional.pad(mask, (0, nkb * block_k - nk, 0, nqb * block_q - nq))
        tiles = padded.view(bp, hp, nqb, block_q, nkb, block_k)
        block_map = tiles.any(dim=5).any(dim=3)
        ones = torch.ones_like(padded)
        ones[..., nq:, :] = False
        ones[..., :, nk:] = False
        # a tile is full when it holds every in-range pair
        full_map = (tiles == ones.view_as(tiles)).all(dim=5).all(dim=3) & block_map
        multi_b, multi_h = bp > 1, hp > 1

        def lookup(b, h, q_idx, kv_idx):
            return mask[b * multi_b, h * multi_h, q_idx, kv_idx]

        return cls.from_block_map(
            block_map,
            q_len=nq,
            kv_len=nk,
            block_q=block_q,
            block_k=block_k,
            full_map=full_map,
            mask_mod=lookup,
        )

    # ------------------------------------------------------------------ basic properties
    @property
    def batch(self) -> int:
        return self.kv_num_blocks.shape[0]

    @property
    def heads(self) -> int:
        return self.kv_num_blocks.shape[1]

    @property
    def num_q_blocks(self) -> int:
        return self.kv_num_blocks.shape[2]

    @property
    def num_kv_blocks(self) -> int:
        return ceil_div(self.kv_len, self.block_k)

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    @property
    def has_columns(self) -> bool:
        return self.col_num is not None

    def valid_slots(self) -> Tensor:
        """bool ``[B', H', NQB, S]``: which slots of ``kv_indices`` hold a computed block."""
        return torch.arange(self.kv_indices.shape[3], device=self.device) < self.kv_num_blocks[..., None]

    def valid_columns(self) -> Tensor:
        """bool ``[B', H', NQB, C]``: which slots of ``col_indices`` hold a column."""
        if self.col_num is None:
            raise ValueError("this layout has no extra columns")
        return torch.arange(self.col_indices.shape[3], device=self.device) < self.col_num[..., None]

    def block_map(self) -> Tensor:
        """bool ``[B', H', NQB, NKB]``: True where a tile is computed."""
        out = torch.zeros(*self.kv_num_blocks.shape, self.num_kv_blocks + 1, dtype=torch.bool, device=self.device)
        idx = torch.where(self.valid_slots(), self.kv_indices, self.num_kv_blocks)
        return out.scatter_(-1, idx, True)[..., :-1]

    def full_map(self) -> Tensor:
        """bool ``[B', H', NQB, NKB]``: True where a tile is computed in full (no predicate)."""
        out = torch.zeros(*self.kv_num_blocks.shape, self.num_kv_blocks + 1, dtype=torch.bool, device=self.device)
        idx = torch.where(self.valid_slots() & self.full, self.kv_indices, self.num_kv_blocks)
        return out.scatter_(-1, idx, True)[..., :-1]

    def column_map(self) -> Optional[Tensor]:
        """bool ``[B', H', NQB, Nk]`` of extra columns, or None."""
        if self.col_num is None:
            return None
        out = torch.zeros(*self.col_num.shape, self.kv_len + 1, dtype=torch.bool, device=self.device)
        idx = torch.where(self.valid_columns(), self.col_indices, self.kv_len)
        return out.scatter_(-1, idx, True)[..., :-1]

    def head(self, index: int) -> "Layout":
        """The layout of one head as a single-head layout (``H' = 1``; a shared layout returns itself).

        The predicate keeps seeing the original head number, so head-dependent predicates stay right.
        """
        if self.heads == 1:
            return self
        if not is_int(index) or not 0 <= index < self.heads:
            raise ValueError(f"Layout.head: index must be an int in [0, {self.heads}), got {index!r}")
        sl = slice(index, index + 1)
        mask_mod = self.mask_mod
        if mask_mod is not None:
            inner = mask_mod

            def mask_mod(b, h, q_idx, kv_idx):
                return inner(b, h + index, q_idx, kv_idx)

            if getattr(inner, "translation_invariant", False):
                translation_invariant(mask_mod)
        columns = {} if self.col_num is None else dict(col_num=self.col_num[:, sl], col_indices=self.col_indices[:, sl])
        return Layout(
            self.kv_num_blocks[:, sl],
            self.kv_indices[:, sl],
            q_len=self.q_len,
            kv_len=self.kv_len,
            block_q=self.block_q,
            block_k=self.block_k,
            mask_mod=mask_mod,
            full=self.full[:, sl],
            **columns,
        )

    def __repr__(self) -> str:
        cols = f", columns<= {self.col_indices.shape[3]}" if self.has_columns else ""
        return (
            f"Layout(batch={self.batch}, heads={self.heads}, q_len={self.q_len}, kv_len={self.kv_len}, "
            f"block=({self.block_q}, {self.block_k}), max_blocks={self.kv_indices.shape[3]}"
            f"{cols}, predicate={'yes' if self.mask_mod is not None else 'no'})"
        )

    # ------------------------------------------------------------------ membership
    def contains(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        """Whether query ``q_idx`` attends key ``kv_idx`` (broadcastable index tensors).

        Uses block-level lookups plus the predicate; never builds an Nq x Nk tensor itself.
        """
        b = b * (self.batch > 1)
        h = h * (self.heads > 1)
        in_range = (q_idx < self.q_len) & (kv_idx < self.kv_len)
        q_c = q_idx.clamp(0, self.q_len - 1)
        kv_c = kv_idx.clamp(0, self.kv_len - 1)
        qb, kb = q_c // self.block_q, kv_c // self.block_k
        key = (b, h, qb, kb)
        selected = self._cached("block_map")[key]
        if self.mask_mod is None and not self.has_columns:
            return selected & in_range
        pred = None if self.mask_mod is None else self.mask_mod(b, h, q_c, kv_c)
        if pred is None:
            out = selected
        else:
            out = selected & (self._cached("full_map")[key] | pred)
        if self.has_columns:
            col = self._cached("column_map")[b, h, qb, kv_c]
            out = out | (col if pred is None else col & pred)
        return out & in_range

    def _cached(self, name: str) -> Tensor:
        cache = self.__dict__.setdefault("_cache", {})
        if name not in cache:
            cache[name] = getattr(self, name)()
        return cache[name]

    def to_dense(self) -> Tensor:
        """bool ``[B', H', Nq, Nk]``: True where the pair is computed. Quadratic: for tests and plots."""
        dev = self.device
        b = torch.arange(self.batch, device=dev).view(-1, 1, 1, 1)
        h = torch.arange(self.heads, device=dev).view(1, -1, 1, 1)
        q = torch.arange(self.q_len, device=dev).view(1, 1, -1, 1)
        kv = torch.arange(self.kv_len, device=dev).view(1, 1, 1, -1)
        out = self.contains(b, h, q, kv)
        return out.expand(self.batch, self.heads, self.q_len, self.kv_len).clone()

    # ------------------------------------------------------------------ statistics
    def partial_tiles(self) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor, Tensor]:
        """The partial tiles (valid slots not marked ``full``), each distinct mask once.

        Returns ``((b, h, qb, slot, kb), inverse, rep)``: the P partial tiles' coordinates (long
        ``[P]`` each), ``inverse [P]`` the distinct mask of each tile and ``rep [U]`` one tile (an index
        into P) per distinct mask. With a :func:`translation_invariant` ``mask_mod`` the tiles of one
        (batch, head) at the same block offset share a mask unless a sequence end cuts them
        differently; otherwise every tile is its own.
        """
        dev = self.device
        bq, bk = self.block_q, self.block_k
        b, h, qb, s = (self.valid_slots() & ~self.full).nonzero(as_tuple=True)
        kb = self.kv_indices[b, h, qb, s]
        if getattr(self.mask_mod, "translation_invariant", False) and b.numel() > 0:
            rows = (self.q_len - qb * bq).clamp(max=bq)
            cols = (self.kv_len - kb * bk).clamp(max=bk)
            # one int64 per tile, mixed radix over (b, h, offset, rows, cols): a 1-d unique sorts it
            # in the order of the tuples (on CPU torch.unique(dim=0) compares the rows one by one:
            # tens of thousands of small ops per 8k-token prefill)
            offset = kb * bk - qb * bq + (self.num_q_blocks - 1) * bq  # >= 0
            span = (self.num_q_blocks - 1) * bq + (self.num_kv_blocks - 1) * bk + 1
            if self.batch * self.heads * span * (bq + 1) * (bk + 1) <= _INT64_KEYS:
                key = (((b * self.heads + h) * span + offset) * (bq + 1) + rows) * (bk + 1) + cols
                unique, inverse = torch.unique(key, return_inverse=True)
            else:
                unique, inverse = torch.unique(torch.stack([b, h, offset, rows, cols], 1), dim=0, return_inverse=True)
            rep = torch.empty(unique.shape[0], dtype=torch.long, device=dev)
            rep.scatter_(0, inverse, torch.arange(b.numel(), device=dev))
        else:
            inverse = rep = torch.arange(b.numel(), device=dev)
        return (b, h, qb, s, kb), inverse, rep

    def tile_masks(self, b: Tensor, h: Tensor, qb: Tensor, kb: Tensor) -> Tensor:
        """bool ``[T, block_q, block_k]``: ``mask_mod`` on tiles (b, h, qb, kb) (long ``[T]`` each).
        Rows / columns past the sequence ends repeat the last position's value (callers cut them)."""
        dev = self.device
        if b.numel() == 0:
            return torch.zeros(0, self.block_q, self.block_k, dtype=torch.bool, device=dev)
        q_idx = (qb * self.block_q).view(-1, 1, 1) + torch.arange(self.block_q, device=dev).view(1, -1, 1)
        kv_idx = (kb * self.block_k).view(-1, 1, 1) + torch.arange(self.block_k, device=dev).view(1, 1, -1)
        masks = self.mask_mod(
            b.view(-1, 1, 1), h.view(-1, 1, 1), q_idx.clamp(max=self.q_len - 1), kv_idx.clamp(max=self.kv_len - 1)
        )
        return masks.expand(b.numel(), self.block_q, self.block_k).to(torch.bool)

    def pair_counts(self, chunk_elems: int = 1 << 22) -> Tensor:
        """long ``[B', H', Nq]``: keys computed per query, without an Nq x Nk tensor."""
        dev = self.device
        bq, bk = self.block_q, self.block_k
        nqb = self.num_q_blocks
        k_sizes = (self.kv_len - torch.arange(self.num_kv_blocks, device=dev) * bk).clamp(max=bk)
        valid = self.valid_slots()
        rows = torch.zeros(self.batch, self.heads, nqb, bq, dtype=torch.long, device=dev)  # per query row
        rows += (k_sizes[self.kv_indices] * (valid & self.full)).sum(-1)[..., None]
        (b, h, qb, _, kb), inverse, rep = self.partial_tiles()
        # keys per row of each distinct mask, evaluated in chunks, then spread over the tiles sharing it
        per_mask = torch.empty(rep.numel(), bq, dtype=torch.long, device=dev)
        step = max(1, chunk_elems // (bq * bk))
        for start in range(0, rep.numel(), step):
            r = rep[start : start + step]
            inside = (kb[r] * bk).view(-1, 1, 1) + torch.arange(bk, device=dev).view(1, 1, -1) < self.kv_len
            per_mask[start : start + step] = (self.tile_masks(b[r], h[r], qb[r], kb[r]) & inside).sum(-1)
        rows.index_put_((b, h, qb), per_mask[inverse], accumulate=True)
        if self.has_columns:
            cols = self.valid_columns().nonzero()
            step = max(1, chunk_elems // bq)
            for start in range(0, cols.shape[0], step):
                t = cols[start : start + step]
                b, h, qb = t[:, 0], t[:, 1], t[:, 2]
                kv = self.col_indices[b, h, qb, t[:, 3]][:, None]
                q = qb[:, None] * bq + torch.arange(bq, device=dev)[None]
                ok = torch.ones(t.shape[0], bq, dtype=torch.bool, device=dev)
                if self.mask_mod is not None:
                    ok = ok & self.mask_mod(b[:, None], h[:, None], q.clamp(max=self.q_len - 1), kv)
                rows.index_put_((b, h, qb), ok.long(), accumulate=True)
        return rows.flatten(2)[..., : self.q_len]

    def density(self) -> float:
        """Fraction of (query, key) pairs computed, averaged over batch and heads."""
        return float(self.pair_counts().double().sum()) / (self.batch * self.heads * self.q_len * self.kv_len)

    def to_layout(self, block: Optional[int] = None) -> "Layout":
        """This layout (the :class:`~spattn.selection.Selection` protocol's conversion; ``block`` is ignored)."""
        return self

    @classmethod
    def causal_window(
        cls, q_len: int, kv_len: int, window: int, block_q: int, block_k: Optional[int] = None, device=None
    ) -> "Layout":
        """The causal sliding window of ``window`` keys as a Layout: query ``i`` (aligned to the end of the
        keys, ``i' = i + kv_len - q_len``) sees key ``j`` iff ``0 <= i' - j < window`` (transformers'
        ``sliding_window_causal_mask_function``; Beltagy et al. 2020's causal band)."""
        for name, value in (("q_len", q_len), ("kv_len", kv_len), ("window", window), ("block_q", block_q)):
            check_int("Layout.causal_window", name, value, 1)
        block_k = block_q if block_k is None else check_int("Layout.causal_window", "block_k", block_k, 1)
        off = kv_len - q_len
        q_starts = torch.arange(0, q_len, block_q, device=device)
        p0 = (q_starts + off)[:, None]
        p1 = ((q_starts + block_q - 1).clamp(max=q_len - 1) + off)[:, None]
        k0 = torch.arange(0, kv_len, block_k, device=device)[None, :]
        k1 = (k0 + block_k - 1).clamp(max=kv_len - 1)
        dmin, dmax = p0 - k1, p1 - k0  # i' - j over a tile takes every value in [dmin, dmax]
        block_map = (dmax >= 0) & (dmin <= window - 1)
        full_map = block_map & (dmin >= 0) & (dmax <= window - 1)

        @translation_invariant
        def in_window(b, h, q_idx, kv_idx):
            d = q_idx + off - kv_idx
            return (d >= 0) & (d < window)

        return cls.from_block_map(
            block_map[None, None],
            q_len=q_len,
            kv_len=kv_len,
            block_q=block_q,
            block_k=block_k,
            full_map=full_map[None, None],
            mask_mod=in_window,
        )

    def within_window(self, window: int) -> "Layout":
        """The pairs of this layout inside the causal sliding window of ``window`` keys
        (:meth:`causal_window`; the :class:`~spattn.selection.Selection` protocol's restriction)."""
        return self & Layout.causal_window(self.q_len, self.kv_len, window, self.block_q, self.block_k, self.device)

    def block_density(self) -> float:
        """Fraction of tiles computed (what a block-sparse kernel pays for)."""
        return float(self.kv_num_blocks.double().mean()) / self.num_kv_blocks

    # ------------------------------------------------------------------ set algebra
    def _check_compatible(self, other: "Layout", op: str) -> None:
        if getattr(other, "kind", None) != self.kind:  # the Selection protocol's kind: another block Layout
            raise TypeError(f"{op} expects a Layout, got {type(other).__name__}")
        mine = (self.q_len, self.kv_len, self.block_q, self.block_k)
        theirs = (other.q_len, other.kv_len, other.block_q, other.block_k)
        if mine != theirs:
            raise ValueError(f"{op}: layouts differ in (q_len, kv_len, block_q, block_k): {mine} vs {theirs}")
        for dim, a, b in (("batch", self.batch, other.batch), ("heads", self.heads, other.heads)):
            if a != b and 1 not in (a, b):
                raise ValueError(f"{op}: layouts' {dim} sizes {a} and {b} do not broadcast")

    def _expanded_maps(self, shape):
        bm = self.block_map().expand(*shape)
        fm = self.full_map().expand(*shape)
        cm = self.column_map()
        return bm, fm, (None if cm is None else cm.expand(*shape[:3], self.kv_len))

    def _combine(self, other: "Layout", op: str) -> "Layout":
        self._check_compatible(other, op)
        shape = (max(self.batch, other.batch), max(self.heads, other.heads), self.num_q_blocks, self.num_kv_blocks)
        bm_a, fm_a, cm_a = self._expanded_maps(shape)
        bm_b, fm_b, cm_b = other._expanded_maps(shape)
        bk = self.block_k

        def blocks_as_columns(bm):
            return bm.repeat_interleave(bk, dim=-1)[..., : self.kv_len]

        if op == "union":
            block_map, full_map = bm_a | bm_b, fm_a | fm_b
            cols = [c for c in (cm_a, cm_b) if c is not None]
            column_map = None if not cols else (cols[0] if len(cols) == 1 else cols[0] | cols[1])
            plain = all(x.mask_mod is None and not x.has_columns for x in (self, other))
            mask_mod = None if plain else (lambda b, h, q, kv: self.contains(b, h, q, kv) | other.contains(b, h, q, kv))
        else:
            block_map, full_map = bm_a & bm_b, fm_a & fm_b
            column_map = None
            if cm_a is not None:
                cover_b = blocks_as_columns(bm_b) if cm_b is None else blocks_as_columns(bm_b) | cm_b
                column_map = cm_a & cover_b
            if cm_b is not None:
                extra = cm_b & blocks_as_columns(bm_a)
                column_map = extra if column_map is None else column_map | extra
            plain = all(x.mask_mod is None and not x.has_columns for x in (self, other))
            mask_mod = None if plain else (lambda b, h, q, kv: self.contains(b, h, q, kv) & other.contains(b, h, q, kv))
        return Layout.from_block_map(
            block_map,
            q_len=self.q_len,
            kv_len=self.kv_len,
            block_q=self.block_q,
            block_k=self.block_k,
            full_map=full_map if mask_mod is not None else None,
            mask_mod=mask_mod,
            column_map=column_map,
        )

    def union(self, other: "Layout") -> "Layout":
        """Pairs computed by either layout."""
        return self._combine(other, "union")

    def intersection(self, other: "Layout") -> "Layout":
        """Pairs computed by both layouts."""
        return self._combine(other, "intersection")

    __or__ = union
    __and__ = intersection

    # ------------------------------------------------------------------ FlexAttention
    def to_block_mask(self):
        """A FlexAttention ``BlockMask`` built from the block indices (no N x N predicate sweep)."""
        from torch.nn.attention.flex_attention import BlockMask

        nkb = self.num_kv_blocks
        valid = self.valid_slots()
        shape = (*self.kv_num_blocks.shape, nkb)
        full_idx = torch.where(valid & self.full, self.kv_indices, nkb)
        part_idx = torch.where(valid & ~self.full, self.kv_indices, nkb)
        full_map = torch.zeros(*shape[:3], nkb + 1, dtype=torch.bool, device=self.device).scatter_(-1, full_idx, True)[
            ..., :-1
        ]
        part_map = torch.zeros(*shape[:3], nkb + 1, dtype=torch.bool, device=self.device).scatter_(-1, part_idx, True)[
            ..., :-1
        ]
        cm = self.column_map()
        if cm is not None:
            # blocks holding extra columns are evaluated with the full membership predicate
            col_blocks = torch.zeros(shape, dtype=torch.bool, device=self.device)
            padded = torch.nn.functional.pad(cm, (0, nkb * self.block_k - self.kv_len))
            col_blocks |= padded.view(*shape, self.block_k).any(-1)
            part_map = part_map | (col_blocks & ~full_map)
        multi_b, multi_h = self.batch > 1, self.heads > 1
        for name in ("block_map", "full_map") + (("column_map",) if cm is not None else ()):
            self._cached(name)  # fill the lookup tables now, not while the predicate is traced

        # FlexAttention may evaluate the predicate on pairs outside the listed tiles (its kernel
        # tiles can be coarser than ours), so it gets the complete membership test, not the
        # Layout's inside-partial-tiles predicate.
        def mask_mod(b, h, q_idx, kv_idx):
            return self.contains(b * multi_b, h * multi_h, q_idx, kv_idx)

        p_num, p_idx = true_positions(part_map)
        f_num, f_idx = true_positions(full_map)
        pad = lambda t: torch.nn.functional.pad(t, (0, nkb - t.shape[-1]))
        return BlockMask.from_kv_blocks(
            p_num.to(torch.int32),
            pad(p_idx).to(torch.int32),
            f_num.to(torch.int32),
            pad(f_idx).to(torch.int32),
            BLOCK_SIZE=(self.block_q, self.block_k),
            mask_mod=mask_mod,
            seq_lengths=(self.q_len, self.kv_len),
        )
