"""Content-based top-k selection: per query (Explicit Sparse Transformer) and per block (top-k / mass).

* :class:`TopK` — ``topk(k=8)``: Explicit Sparse Transformer (Zhao et al. 2019, arXiv 1912.11637).
  Per (batch, query head, query) the scores ``q·k`` of the *allowed* keys (causal mask applied before
  selection) are ranked and the keys whose score is ``>=`` the k-th largest are kept. As in the
  official code (``S.masked_fill(S < topk(S, k).values[..., -1:], -inf)``) every key tied with the
  k-th value is kept, so a row may keep more than k keys; a row with fewer than k allowed keys keeps
  them all. ``ties="first"`` keeps exactly k (lower key index wins a tie), as ``torch.topk`` +
  scatter does in DRSformer. Returns a :class:`~spattn.selection.TokenSelection`.
* :class:`TopP` — ``topp(p=0.95)``: per-query nucleus selection of attention (Twilight, Lin et al.
  2025, arXiv 2502.02770, after top-p sampling, Holtzman et al. 2020): the fewest allowed keys,
  taken in descending softmax weight (lower index first on ties), whose weights sum to at least
  ``p``; the budget adapts to each head and query instead of a fixed k. Exact weights, so it reads
  every score like ``topk``. Returns a :class:`~spattn.selection.TokenSelection` whose width is the
  largest count of any query.
* :class:`BlockTopK` — ``block_topk(k=8, block=64)``: mean-pooled query/key blocks (SLA,
  MInference block-sparse, FlexPrefill's query-aware branch), score ``q̄·k̄``, keep the k best key
  blocks per query block.
* :class:`BlockMass` — ``block_mass(threshold=0.9, block=64)``: softmax of the pooled scores
  (``/sqrt(D)``) over the allowed key blocks of each query block; keep the smallest set of blocks,
  taken in descending score order, whose cumulative probability reaches ``threshold`` (FlexPrefill's
  γ-coverage, XAttention's τ, VSA-style selection).

Block patterns in causal mode follow the prefill family (MInference, XAttention, FlexPrefill): only
key blocks holding at least one visible key compete, and the *diagonal* key blocks (those
overlapping the query block's own aligned positions ``i + Nk - Nq``) are always kept, so every query
sees at least itself; they count towards the k budget / the mass (when Nk - Nq is not a multiple
of the block a query block straddles two diagonal key blocks: both are kept, even beyond k). Non-causal mode forces nothing.
Kept tiles apply the causal predicate, so the layout never computes a future key.

Scores are computed in float32 (float64 for float64 inputs) without the softmax scale (a positive
scale does not change a ranking). Query-level scores are computed in query chunks: memory is
``O(chunk * Nk)``, never ``Nq x Nk``. Ties between blocks go to the lower block index.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layout import Layout, true_positions
from ..registry import register
from ..selection import TokenSelection
from ._padding import masked_block_mean, query_tokens, real_tokens
from ._scoring import pool_mean
from ._tiles import causal_block_maps, selection_layout
from .base import PaddedPattern, Pattern, causal_mask_mod, check_float, check_int, check_qk

__all__ = [
    "TopK",
    "TopP",
    "topp_selection",
    "BlockTopK",
    "BlockMass",
    "topk_selections",
    "selection_layout",
    "pooled_block_scores",
    "causal_block_maps",
]

#: elements of one ``[B, Hq, chunk, Nk]`` score block
SCORE_BUDGET = 1 << 22
TIES = ("keep", "first")


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_topk(s: Tensor, kk: int, ties: str) -> Tensor:
    """Scores ``s [..., Nk]`` (disallowed keys at -inf) -> kept key indices ``[..., W]`` (-1 padded).

    ``torch.topk`` gives the answer for every row whose (k+1)-th score is below the k-th; only rows
    with a tie at the k-th value are redone: all tied keys (``"keep"``) or a stable
    sort (``"first"``: lower index wins).
    """
    probe = min(kk + 1, s.shape[-1])  # the (k+1)-th score reveals a tie at the k-th
    vals, idx = torch.topk(s, probe, dim=-1)
    kth = vals[..., kk - 1 : kk]
    tied = torch.zeros_like(kth[..., 0], dtype=torch.bool)
    if probe > kk:
        tied = torch.isfinite(kth[..., 0]) & (vals[..., kk] == kth[..., 0])
    vals, idx = vals[..., :kk], idx[..., :kk]
    idx = torch.where(torch.isfinite(vals), idx, -1)  # rows with fewer than k allowed keys
    if not bool(tied.any()):
        return idx
    rows = tied.nonzero(as_tuple=True)
    sub = s[rows]
    if ties == "keep":
        redo = true_positions(sub >= kth[rows], fill=-1, min_width=0)[1]
    else:
        redo = torch.sort(sub, dim=-1, descending=True, stable=True).indices[:, :kk]
    width = max(kk, redo.shape[-1])
    out = F.pad(idx, (0, width - kk), value=-1)
    out[rows] = F.pad(redo, (0, width - redo.shape[-1]), value=-1)
    return out


def topk_selections(
    q: Tensor,
    k: Tensor,
    ks: Iterable[int],
    *,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    ties: str = "keep",
) -> list[TokenSelection]:
    """One :class:`TokenSelection` per entry of ``ks``: each query's top-``k`` allowed keys.

    ``q [B, Hq, Nq, D]``, ``k [B, Hkv, Nk, D]`` (GQA: query head h scores kv head ``h // (Hq/Hkv)``).
    Scores are computed once per query chunk and shared by every ``k`` (DRSformer's multi-ratio
    selection). ``key_padding_mask [B, Nk]`` (True = real key) and the causal mask are applied before
    ranking. ``ties``: ``"keep"`` keeps every key tied with the k-th score (Explicit Sparse
    Transformer), ``"first"`` keeps exactly k, lower key index first.
    """
    _, _, _, nq, nk = check_qk(q, k)
    ks = list(ks)
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    for kk in ks:
        check_int("topk", "k", kk, 1)
        if kk > nk:
            raise ValueError(f"topk: k={kk} exceeds the number of keys Nk={nk}")
    parts: list[list[Tensor]] = [[] for _ in ks]
    for s in _score_chunks(q, k, causal, key_padding_mask):
        for slot, kk in enumerate(ks):
            parts[slot].append(_row_topk(s, kk, ties))
    return [_concat_rows(chunks, nq, nk) for chunks in parts]


def _score_chunks(q: Tensor, k: Tensor, causal: bool, key_padding_mask: Optional[Tensor]) -> Iterator[Tensor]:
    """Scores ``q·k`` (no softmax scale) of consecutive query chunks, ``[B, Hq, chunk, Nk]`` of at most
    ``SCORE_BUDGET`` elements, with keys a query may not see (causal, padding) at -inf."""
    batch, hq, hkv, nq, nk = check_qk(q, k)
    group = hq // hkv
    sdt = _score_dtype(q.dtype)
    qs = q.detach().to(sdt).view(batch, hkv, group, nq, -1)
    kt = k.detach().to(sdt).transpose(-1, -2)  # [B, Hkv, D, Nk]
    chunk = max(1, min(nq, SCORE_BUDGET // max(1, batch * hq * nk)))
    keys = torch.arange(nk, device=q.device)
    for c0 in range(0, nq, chunk):
        c1 = min(nq, c0 + chunk)
        qc = qs[:, :, :, c0:c1].reshape(batch, hkv, group * (c1 - c0), -1)
        s = torch.matmul(qc, kt).view(batch, hq, c1 - c0, nk)
        if causal or key_padding_mask is not None:
            allowed = torch.ones(1, 1, 1, nk, dtype=torch.bool, device=q.device)
            if causal:
                allowed = (keys <= (torch.arange(c0, c1, device=q.device) + nk - nq)[:, None])[None, None]
            if key_padding_mask is not None:
                allowed = allowed & key_padding_mask[:, None, None, :]
            s.masked_fill_(~allowed, float("-inf"))
        yield s


def _concat_rows(chunks: list[Tensor], nq: int, nk: int) -> TokenSelection:
    """Per-chunk index lists ``[B, Hq, chunk, W_c]`` (-1 padded) -> one TokenSelection (width >= 1)."""
    width = max(1, max(t.shape[-1] for t in chunks))
    return TokenSelection(torch.cat([F.pad(t, (0, width - t.shape[-1]), value=-1) for t in chunks], dim=2), nq, nk)


def _row_nucleus(s: Tensor, p: float, scale: float) -> Tensor:
    """Scores ``s [..., Nk]`` (disallowed keys at -inf) -> bool ``[..., Nk]``: the keys whose
    softmax weight, ranked descending (stable: lower index first), has less than ``p`` of the mass
    ahead of it (``p = 1``: every allowed key). Rows with no allowed key keep nothing."""
    if p >= 1.0:  # the whole mass: every allowed key, also those whose weight rounds to 0
        return torch.isfinite(s)
    probs = torch.softmax(s * scale, dim=-1).nan_to_num_(nan=0.0)
    ranked, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    ahead = ranked.cumsum(-1) - ranked
    take = (ahead < p) & (ranked > 0)
    return torch.zeros_like(take).scatter_(-1, order, take)


def topp_selection(
    q: Tensor,
    k: Tensor,
    p: float,
    *,
    scale: Optional[float] = None,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
) -> TokenSelection:
    """Each query's nucleus: the fewest allowed keys holding ``>= p`` of its softmax weight.

    ``q [B, Hq, Nq, D]``, ``k [B, Hkv, Nk, D]`` (GQA as in :func:`topk_selections`); weights are
    ``softmax(scale · q·k)`` over the allowed keys (causal mask and ``key_padding_mask [B, Nk]``
    applied first), ``scale`` defaults to ``1/sqrt(D)``. Computed in query chunks of
    ``SCORE_BUDGET`` scores; the selection is ``[B, Hq, Nq, W]`` with W the largest kept count.
    With ``Nq == Nk`` and a ``key_padding_mask``, padded queries keep no key (their output is zero).
    """
    batch, _, _, nq, nk = check_qk(q, k)
    check_float("topp", "p", p, 0.0, 1.0, low_open=True)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    # padded queries (self-attention) keep no key: their nuclei, hence the selection's width and the
    # real rows' arithmetic, would otherwise depend on padded values
    real_q = query_tokens(real_tokens("topp", key_padding_mask, batch, nk, q.device), nq, nk)
    chunks, row = [], 0
    for s in _score_chunks(q, k, causal, key_padding_mask):
        take = _row_nucleus(s, p, scale)
        if real_q is not None:
            take &= real_q[:, None, row : row + s.shape[2], None]
        row += s.shape[2]
        chunks.append(true_positions(take, fill=-1, min_width=0)[1])
    return _concat_rows(chunks, nq, nk)


@register(
    "topk",
    kind="dynamic",
    description="Explicit Sparse Transformer: each query keeps its k highest-scoring keys",
    paper="Zhao et al. 2019, Explicit Sparse Transformer (arXiv 1912.11637)",
)
class TopK(Pattern):
    """Per-query top-k keys (see module docstring); ``select`` -> TokenSelection ``[B, Hq, Nq, K']``.

    ``K'`` is k, or more where keys tie with the k-th score under ``ties="keep"``.
    """

    name = "topk"
    content_based = True

    def __init__(self, k: int = 8, ties: str = "keep", block: int = 64):
        check_int("topk", "k", k, 1)
        check_int("topk", "block", block, 1)
        if ties not in TIES:
            raise ValueError(f"topk: ties must be one of {TIES}, got {ties!r}")
        self.k, self.ties, self.block = k, ties, block

    def select(
        self, q: Tensor, k: Tensor, causal: bool = False, *, key_padding_mask: Optional[Tensor] = None, state=None
    ) -> TokenSelection:
        """Top-k keys per query; ``key_padding_mask [B, Nk]`` (True = real key) is applied before the
        ranking, as in the official code, so padded keys never take a slot."""
        return topk_selections(q, k, [self.k], causal=causal, key_padding_mask=key_padding_mask, ties=self.ties)[0]

    def layout(self, q: Tensor, k: Tensor, causal: bool = False) -> Layout:
        """The selection as a Layout with tiles of ``block`` (inspection; the kernel runs ``select``)."""
        return selection_layout(self.select(q, k, causal=causal), self.block)


@register(
    "topp",
    kind="dynamic",
    description="Twilight top-p: each query keeps the fewest keys holding p of its attention weight",
    paper="Lin et al. 2025, Twilight: Adaptive Attention Sparsity with Hierarchical Top-p Pruning (arXiv 2502.02770)",
)
class TopP(Pattern):
    """Per-query nucleus of the attention weights (see :func:`topp_selection`); ``select`` ->
    TokenSelection ``[B, Hq, Nq, W]``. ``scale``: the softmax scale of the attention (None = 1/sqrt(D)).

    Twilight prunes the candidates of another selector this way; here the candidates are all
    allowed keys with their exact weights, so the pattern measures how far adaptive budgets go,
    not a fast selection.
    """

    name = "topp"
    content_based = True

    def __init__(self, p: float = 0.95, scale: Optional[float] = None, block: int = 64):
        check_float("topp", "p", p, 0.0, 1.0, low_open=True)
        if scale is not None:
            check_float("topp", "scale", scale, 0.0, math.inf, low_open=True)
        check_int("topp", "block", block, 1)
        self.p, self.scale, self.block = p, scale, block

    def select(
        self, q: Tensor, k: Tensor, causal: bool = False, *, key_padding_mask: Optional[Tensor] = None, state=None
    ) -> TokenSelection:
        return topp_selection(q, k, self.p, scale=self.scale, causal=causal, key_padding_mask=key_padding_mask)

    def layout(self, q: Tensor, k: Tensor, causal: bool = False) -> Layout:
        """The selection as a Layout with tiles of ``block`` (inspection; the kernel runs ``select``)."""
        return selection_layout(self.select(q, k, causal=causal), self.block)


# ------------------------------------------------------------------------------------------ blocks


def pooled_block_scores(q: Tensor, k: Tensor, block: int, key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """``mean_pool(q) · mean_pool(k)ᵀ`` per query head: ``[B, Hq, NQB, NKB]`` (fp32, fp64 for fp64).

    ``key_padding_mask [B, Nk]`` (True = real): blocks pool their real tokens only (the queries too
    when ``Nq == Nk``), and key blocks without a real token score ``-inf``.
    """
    batch, hq, hkv, nq, nk = check_qk(q, k)
    sdt = _score_dtype(q.dtype)
    real = real_tokens("pooled_block_scores", key_padding_mask, batch, nk, k.device)
    if real is None:
        qp = pool_mean(q.detach().to(sdt), block)
        kp = pool_mean(k.detach().to(sdt), block)
    else:
        qp = masked_block_mean(q.detach().to(sdt), block, query_tokens(real, nq, nk))[0]
        kp, k_real = masked_block_mean(k.detach().to(sdt), block, real)
    s = torch.matmul(qp.view(batch, hkv, hq // hkv, qp.shape[2], -1), kp.transpose(-1, -2).unsqueeze(2))
    s = s.view(batch, hq, qp.shape[2], kp.shape[2])
    return s if real is None else s.masked_fill(~k_real[:, :, None, :], float("-inf"))


def _block_candidates(q: Tensor, k: Tensor, block: int, causal: bool, key_padding_mask: Optional[Tensor] = None):
    """Pooled scores with disallowed tiles at -inf, the forced tiles, and the Layout arguments.

    Key blocks without a real key (``key_padding_mask``) are never allowed, not even when forced."""
    _, _, _, nq, nk = check_qk(q, k)
    scores = pooled_block_scores(q, k, block, key_padding_mask)
    has_key = torch.isfinite(scores) if key_padding_mask is not None else torch.ones_like(scores, dtype=torch.bool)
    if not causal:
        forced = torch.zeros_like(scores, dtype=torch.bool)
        return scores, has_key, forced, dict(q_len=nq, kv_len=nk, block_q=block)
    allowed, diagonal, full = causal_block_maps(nq, nk, block, q.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    allowed = allowed & has_key
    forced = diagonal & allowed
    kwargs = dict(q_len=nq, kv_len=nk, block_q=block, mask_mod=causal_mask_mod(nq, nk), full_map=full.expand_as(scores))
    return scores, allowed, forced, kwargs


def _descending_order(scores: Tensor, forced: Tensor) -> Tensor:
    """Key-block order per row: forced blocks first, then by score, lower index first on ties."""
    key = scores.masked_fill(forced, float("inf"))
    return torch.sort(key, dim=-1, descending=True, stable=True).indices


@register(
    "block_topk",
    kind="dynamic",
    description="Top-k key blocks per query block from mean-pooled q/k scores",
    paper="Block top-k selection as in MInference block-sparse (Jiang et al. 2024), SLA (Zhang et al. 2025)",
)
class BlockTopK(PaddedPattern):
    """Keep the ``k`` key blocks with the highest pooled score per query block (causal: diagonal forced)."""

    name = "block_topk"
    content_based = True

    def __init__(self, k: int = 8, block: int = 64):
        check_int("block_topk", "k", k, 1)
        check_int("block_topk", "block", block, 1)
        self.k, self.block = k, block

    def layout(self, q: Tensor, k: Tensor, causal: bool = False, key_padding_mask: Optional[Tensor] = None) -> Layout:
        _, _, _, _, nk = check_qk(q, k)
        nkb = -(-nk // self.block)
        if self.k > nkb:
            raise ValueError(
                f"block_topk: k={self.k} exceeds the number of key blocks {nkb} (Nk={nk}, block={self.block})"
            )
        scores, allowed, forced, kwargs = _block_candidates(q, k, self.block, causal, key_padding_mask)
        order = _descending_order(scores, forced)[..., : self.k]
        keep = torch.zeros_like(allowed).scatter_(-1, order, True) | forced
        return Layout.from_block_map(keep & allowed, **kwargs)


@register(
    "block_mass",
    kind="dynamic",
    description="Smallest set of key blocks per query block whose pooled softmax mass reaches a threshold",
    paper="Cumulative-mass block selection as in FlexPrefill (Lai et al. 2025), XAttention (Xu et al. 2025)",
)
class BlockMass(PaddedPattern):
    """Per query block: softmax of pooled scores ``/sqrt(D)`` over allowed key blocks, keep the
    shortest prefix in descending order (forced diagonal first in causal mode) with mass ``>= threshold``."""

    name = "block_mass"
    content_based = True

    def __init__(self, threshold: float = 0.9, block: int = 64):
        check_float("block_mass", "threshold", threshold, 0.0, 1.0, low_open=True)
        check_int("block_mass", "block", block, 1)
        self.threshold, self.block = threshold, block

    def layout(self, q: Tensor, k: Tensor, causal: bool = False, key_padding_mask: Optional[Tensor] = None) -> Layout:
        scores, allowed, forced, kwargs = _block_candidates(q, k, self.block, causal, key_padding_mask)
        probs = torch.softmax(scores / math.sqrt(q.shape[-1]), dim=-1)
        probs = torch.nan_to_num(probs, nan=0.0)  # a query block with no visible key
        order = _descending_order(scores, forced)
        sorted_mass = torch.gather(probs, -1, order)
        before = sorted_mass.cumsum(-1) - sorted_mass  # mass of the blocks ranked ahead
        take = (before < self.threshold) | torch.gather(forced, -1, order)
        keep = torch.zeros_like(allowed).scatter_(-1, order, take)
        return Layout.from_block_map(keep & allowed, **kwargs)
