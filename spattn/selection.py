"""Selections that are not block layouts: per-query token sets and routing's cluster windows.

Content-based patterns whose choice is per token rather than per block hand one of these to a
kernel instead of a :class:`~spattn.layout.Layout` (same layer: patterns build them, kernels read them):

* :class:`TokenSelection` — each query attends to its own set of at most K keys (top-k attention,
  decode-time selection: Quest, Double Sparsity, TidalDecode). Softmax runs over the union of the
  selected keys, so it is exactly attention restricted to ``to_dense()``.
* :class:`PageSelection` — each query attends to the visible tokens of its own set of key *pages*
  (fixed runs of ``page`` positions: Quest's unit of selection). Same meaning as the TokenSelection
  of those tokens (:meth:`PageSelection.to_tokens`), but a kernel can fetch whole pages as rows.
* :class:`ClusterSelection` — Routing Transformer windows: C windows of w sorted positions per
  (batch, head); each window runs dense attention on its own members and a query that belongs to
  several windows receives the *average* of their outputs (Roy et al. 2021), which is not a softmax
  over a union, so it has its own kernel.

Batch and head dimensions broadcast like a Layout's (size 1 = shared). All four kinds, the
:class:`~spattn.layout.Layout` included, meet the :class:`Selection` protocol; which kernel runs
which kind is decided in one place, ``spattn.functional``'s dispatch table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, runtime_checkable

import torch
from torch import Tensor

from ._checks import check_int, is_int
from .layout import Layout

__all__ = ["Selection", "TokenSelection", "PageSelection", "ClusterSelection"]


@runtime_checkable
class Selection(Protocol):
    """What every kind of selection offers, whatever its unit (blocks, tokens, pages, clusters).

    ``kind`` names it in messages; ``batch`` / ``heads`` are 1 when shared (broadcast);
    ``pair_counts()`` is long ``[B', H', Nq]`` (keys computed per query); ``density()`` the fraction
    of (query, key) pairs computed; ``to_layout()`` the same pairs as a block Layout and ``to_dense()``
    as a bool ``[B', H', Nq, Nk]`` mask (both may be quadratic: inspection, tests, the reference kernel).

    Optional capability (not part of the structural check, so a kind defined elsewhere need not have it):
    ``within_window(window)``, the pairs inside the causal sliding window of ``window`` keys (query ``i``
    aligned to the end of the keys sees key ``j`` iff ``0 <= i + Nk - Nq - j < window``) as a selection
    a kernel runs. Layout, TokenSelection and PageSelection have it; ClusterSelection has not (a window
    would change which keys each routing window averages over). ``integrations.hf`` needs it for
    layers with a sliding window.
    """

    kind: str
    q_len: int
    kv_len: int

    @property
    def batch(self) -> int: ...

    @property
    def heads(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def pair_counts(self) -> Tensor: ...

    def density(self) -> float: ...

    def to_layout(self, block: Optional[int] = None) -> Layout: ...

    def to_dense(self) -> Tensor: ...


def _density(sel) -> float:
    return float(sel.pair_counts().double().sum()) / (sel.batch * sel.heads * sel.q_len * sel.kv_len)


def _check_index_tensor(owner: str, name: str, t: Tensor, dims: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.long:
        raise TypeError(f"{owner}: {name} must be int64, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{owner}: {name} must be {dims}-D, got shape {tuple(t.shape)}")


def _check_lengths(owner: str, **sizes) -> None:
    for name, value in sizes.items():
        check_int(owner, name, value, 1)


def _check_flag(owner: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be a bool, got {value!r}")


def _check_distinct(owner: str, name: str, t: Tensor) -> None:
    """No valid entry (>= 0) repeats along the last dim: a repeated key would count twice in the softmax."""
    if t.shape[-1] > 1 and t.numel():
        s = t.sort(dim=-1).values
        if bool(((s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)).any()):
            raise ValueError(f"{owner}: {name} must not repeat an entry within one query's slots (-1 = unused)")


def _within(t: Tensor, end: int) -> bool:
    """Every entry of the int64 tensor ``t`` lies in ``[-1, end)`` (one reduction pass)."""
    low, high = torch.aminmax(t)
    return int(low) >= -1 and int(high) < end


@dataclass(frozen=True)
class TokenSelection:
    """Per-query key indices.

    Attributes:
        indices: ``[B', H', Nq, K]`` int64 key positions in ``[0, kv_len)``; ``-1`` marks an unused
            slot. Duplicates are not allowed among the valid slots of one query (a key counts once).
        q_len, kv_len: sequence lengths the selection was made for.
    Causality, windows, sinks etc. are already applied by the pattern: every valid index is computed.
    """

    indices: Tensor
    q_len: int
    kv_len: int
    kind = "token selection"

    def __post_init__(self):
        _check_index_tensor("TokenSelection", "indices", self.indices, 4)
        _check_lengths("TokenSelection", q_len=self.q_len, kv_len=self.kv_len)
        if self.indices.shape[2] != self.q_len:
            raise ValueError(f"TokenSelection: indices has {self.indices.shape[2]} query rows but q_len={self.q_len}")
        if self.indices.numel() and not _within(self.indices, self.kv_len):
            raise ValueError(f"TokenSelection: indices must lie in [-1, {self.kv_len}), -1 = unused slot")
        _check_distinct("TokenSelection", "indices", self.indices)

    @property
    def batch(self) -> int:
        return self.indices.shape[0]

    @property
    def heads(self) -> int:
        return self.indices.shape[1]

    @property
    def k(self) -> int:
        return self.indices.shape[3]

    @property
    def device(self) -> torch.device:
        return self.indices.device

    @property
    def valid(self) -> Tensor:
        """bool ``[B', H', Nq, K]``: which slots hold a key."""
        return self.indices >= 0

    def to_dense(self) -> Tensor:
        """bool ``[B', H', Nq, Nk]``, True where a pair is computed (materialises Nq×Nk: tests only)."""
        b, h, nq, _ = self.indices.shape
        dense = torch.zeros(b, h, nq, self.kv_len + 1, dtype=torch.bool, device=self.device)
        dense.scatter_(-1, torch.where(self.valid, self.indices, self.kv_len), True)
        return dense[..., : self.kv_len]

    def to_layout(self, block: Optional[int] = None) -> Layout:
        """The same pairs as a block :class:`Layout` of ``block`` (default 64) tokens (via ``to_dense``:
        O(Nq·Nk), for the reference kernel and inspection)."""
        return Layout.from_dense(self.to_dense(), 64 if block is None else block)

    def pair_counts(self) -> Tensor:
        """int64 ``[B', H', Nq]``: keys computed per query."""
        return self.valid.sum(-1)

    def within_window(self, window: int) -> "TokenSelection":
        """The selected keys inside the causal sliding window of ``window`` keys (the rest become ``-1``)."""
        check_int("TokenSelection.within_window", "window", window, 1)
        pos = (torch.arange(self.q_len, device=self.device) + self.kv_len - self.q_len)[:, None]
        keep = (self.indices >= 0) & (self.indices <= pos) & (self.indices > pos - window)
        return TokenSelection(torch.where(keep, self.indices, -1), self.q_len, self.kv_len)

    def density(self) -> float:
        """Fraction of (query, key) pairs computed, averaged over batch and heads."""
        return _density(self)


@dataclass(frozen=True)
class PageSelection:
    """Per-query sets of key pages (Quest, Tang et al. 2024: pages are the unit of KV selection).

    Attributes:
        pages: ``[B', H', Nq, P]`` int64 page ids; page ``p`` covers key positions
            ``[p*page, (p+1)*page)`` (the last page may be partial); ``-1`` marks an unused slot.
            Duplicates are not allowed among the valid slots of one query.
        page: tokens per page.
        q_len, kv_len: sequence lengths the selection was made for.
        causal: query ``i`` sees only positions ``<= i + kv_len - q_len`` inside its pages.
        shared_by: the rows of each run of ``shared_by`` consecutive heads are identical (one page set
            per grouped-query-attention group): a kernel may then fetch each page once per group.
            Checked at construction; it changes nothing in the meaning.
    Exactly the :class:`TokenSelection` returned by :meth:`to_tokens`.
    """

    pages: Tensor
    page: int
    q_len: int
    kv_len: int
    causal: bool = False
    shared_by: int = 1
    kind = "page selection"

    def __post_init__(self):
        _check_index_tensor("PageSelection", "pages", self.pages, 4)
        if not is_int(self.page) or self.page < 1:
            raise ValueError(f"PageSelection: page must be an int >= 1, got {self.page!r}")
        _check_lengths("PageSelection", q_len=self.q_len, kv_len=self.kv_len)
        _check_flag("PageSelection", "causal", self.causal)
        if self.pages.shape[2] != self.q_len:
            raise ValueError(f"PageSelection: pages has {self.pages.shape[2]} query rows but q_len={self.q_len}")
        if self.pages.numel() and not _within(self.pages, self.num_pages):
            raise ValueError(f"PageSelection: pages must lie in [-1, {self.num_pages}), -1 = unused slot")
        _check_distinct("PageSelection", "pages", self.pages)
        s, h = self.shared_by, self.pages.shape[1]
        if not is_int(s) or s < 1 or h % s:
            raise ValueError(f"PageSelection: shared_by must be a positive int dividing the {h} head rows, got {s!r}")
        if s > 1:
            grouped = self.pages.view(self.pages.shape[0], h // s, s, *self.pages.shape[2:])
            if not torch.equal(grouped, grouped[:, :, :1].expand_as(grouped)):
                raise ValueError(f"PageSelection: shared_by={s} but the rows of a group of {s} heads differ")

    @property
    def num_pages(self) -> int:
        """Pages of the key sequence, ``ceil(kv_len / page)``."""
        return -(-self.kv_len // self.page)

    @property
    def batch(self) -> int:
        return self.pages.shape[0]

    @property
    def heads(self) -> int:
        return self.pages.shape[1]

    @property
    def device(self) -> torch.device:
        return self.pages.device

    def last_visible(self) -> Tensor:
        """int64 ``[Nq]``: the last key position each query may see."""
        if self.causal:
            return torch.arange(self.q_len, device=self.device) + (self.kv_len - self.q_len)
        return torch.full((self.q_len,), self.kv_len - 1, dtype=torch.long, device=self.device)

    def to_tokens(self) -> TokenSelection:
        """The same pairs as a :class:`TokenSelection` (``P * page`` slots per query)."""
        tokens = self.pages[..., None] * self.page + torch.arange(self.page, device=self.device)
        last = self.last_visible()[None, None, :, None, None]
        ok = (self.pages[..., None] >= 0) & (tokens <= last) & (tokens < self.kv_len)
        return TokenSelection(torch.where(ok, tokens, -1).flatten(-2), q_len=self.q_len, kv_len=self.kv_len)

    def to_dense(self) -> Tensor:
        """bool ``[B', H', Nq, Nk]`` (materialises Nq×Nk: tests only)."""
        return self.to_tokens().to_dense()

    def to_layout(self, block: Optional[int] = None) -> Layout:
        return self.to_tokens().to_layout(block)

    def within_window(self, window: int) -> TokenSelection:
        """The tokens of the selected pages inside the causal sliding window of ``window`` keys
        (a window cuts pages: the result is per token)."""
        return self.to_tokens().within_window(window)

    def pair_counts(self) -> Tensor:
        """int64 ``[B', H', Nq]``: keys computed per query."""
        first = self.pages * self.page
        end = torch.minimum(first + self.page, self.last_visible()[None, None, :, None] + 1)
        return torch.where(self.pages >= 0, (end - first).clamp(min=0), 0).sum(-1)

    def density(self) -> float:
        """Fraction of (query, key) pairs computed, averaged over batch and heads."""
        return _density(self)


@dataclass(frozen=True)
class ClusterSelection:
    """Routing windows: per (batch, head), C windows of w token positions sorted ascending.

    Attributes:
        query_indices: ``[B, H', C, w]`` int64 positions of the queries of each window.
        key_indices: ``[B, H', C, w]`` positions of its keys (the same tensor for shared-QK routing).
        q_len, kv_len: sequence lengths.
        causal: inside a window, query at position i sees key at position j only if j <= i
            (positions aligned to the end of the keys when q_len != kv_len).
    A query in no window gets zeros; a query in several windows gets the mean of their outputs.
    """

    query_indices: Tensor
    key_indices: Tensor
    q_len: int
    kv_len: int
    causal: bool = False
    kind = "routing windows"

    def __post_init__(self):
        _check_index_tensor("ClusterSelection", "query_indices", self.query_indices, 4)
        _check_index_tensor("ClusterSelection", "key_indices", self.key_indices, 4)
        _check_lengths("ClusterSelection", q_len=self.q_len, kv_len=self.kv_len)
        _check_flag("ClusterSelection", "causal", self.causal)
        if self.query_indices.shape[:3] != self.key_indices.shape[:3]:
            raise ValueError(
                "ClusterSelection: query_indices and key_indices must agree in [B, H, C], got "
                f"{tuple(self.query_indices.shape)} and {tuple(self.key_indices.shape)}"
            )
        for name, t, n in (
            ("query_indices", self.query_indices, self.q_len),
            ("key_indices", self.key_indices, self.kv_len),
        ):
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
                raise ValueError(f"ClusterSelection: {name} must lie in [0, {n})")

    @property
    def batch(self) -> int:
        return self.query_indices.shape[0]

    @property
    def heads(self) -> int:
        return self.query_indices.shape[1]

    @property
    def clusters(self) -> int:
        return self.query_indices.shape[2]

    @property
    def device(self) -> torch.device:
        return self.query_indices.device

    def to_dense(self) -> Tensor:
        """bool ``[B, H', Nq, Nk]``: pairs computed in at least one window (tests and plots only)."""
        b, h, c, wq = self.query_indices.shape
        wk = self.key_indices.shape[3]
        pair = torch.ones(b, h, c, wq, wk, dtype=torch.bool, device=self.device)
        if self.causal:
            offset = self.kv_len - self.q_len
            pair = self.key_indices[..., None, :] <= self.query_indices[..., :, None] + offset
        flat = (self.query_indices[..., :, None] * self.kv_len + self.key_indices[..., None, :]).flatten(2)
        dense = torch.zeros(b, h, self.q_len * self.kv_len, dtype=torch.long, device=self.device)
        dense.scatter_reduce_(-1, flat, pair.expand(b, h, c, wq, wk).flatten(2).long(), reduce="amax")
        return dense.view(b, h, self.q_len, self.kv_len).bool()

    def pair_counts(self) -> Tensor:
        """long ``[B, H', Nq]``: distinct keys each query attends over all its windows.

        Memory ``O(C · wq · wk)`` (the windows' pairs, as the kernel computes them), never ``Nq · Nk``.
        """
        b, h, c, wq = self.query_indices.shape
        wk = self.key_indices.shape[3]
        qi = self.query_indices[..., :, None].expand(b, h, c, wq, wk)
        ki = self.key_indices[..., None, :].expand(b, h, c, wq, wk)
        pair = qi * self.kv_len + ki  # one id per (query, key) pair of a (batch, head)
        if self.causal:
            pair = torch.where(ki <= qi + (self.kv_len - self.q_len), pair, -1)
        counts = torch.zeros(b, h, self.q_len, dtype=torch.long, device=self.device)
        for bi in range(b):
            for hi in range(h):
                ids = pair[bi, hi].flatten().unique()
                ids = ids[ids >= 0]
                counts[bi, hi] = torch.bincount(ids // self.kv_len, minlength=self.q_len)
        return counts

    def density(self) -> float:
        """Fraction of (query, key) pairs computed in at least one window."""
        return _density(self)

    def to_layout(self, block: Optional[int] = None) -> Layout:
        """The pairs computed in at least one window as a block :class:`Layout` (via ``to_dense``;
        the output still differs from a softmax over that union: windows are averaged)."""
        return Layout.from_dense(self.to_dense(), block or 64)
