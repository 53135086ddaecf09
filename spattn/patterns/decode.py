"""Decode-time KV selection: which cached tokens a new query attends to.

* :class:`Quest` (Tang et al., ICML 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context
  LLM Inference"): pages of ``page`` tokens summarised by elementwise key max/min; the page score
  ``U_p = sum_d max(q_d M_pd, q_d m_pd)`` upper-bounds ``q . k_t`` for every token of the page;
  the top pages (with rule="kernel", the default, the query's own page always included) are attended exactly.
* :class:`DoubleSparsity` (Yang et al. 2024, arXiv 2408.07092): offline calibration ranks the
  channels of each head by ``mean_t |q_t ⊙ k_t|``; at run time approximate scores use only the top
  ``channels`` channels of q and of a "label cache" of the keys; the top ``budget`` tokens are attended.
* :class:`TidalDecode` (Yang et al., ICLR 2025, arXiv 2410.05076): layers before the first
  selection layer are dense; a selection layer computes full attention and records its top-``budget``
  token positions per head; every following layer attends only to the latest recorded positions.

Quest returns a :class:`~spattn.selection.PageSelection` from :meth:`select` (whole pages, executed
by the page-sparse kernel), Double Sparsity and TidalDecode a :class:`~spattn.selection.TokenSelection`
(executed by the token-sparse kernel). Queries ``q [B, Hq, Nq, D]``, keys ``k [B, Hkv, Nk, D]`` (GQA: query head
``h`` reads kv head ``h // (Hq/Hkv)``); decoding has ``Nq = 1`` but any ``Nq`` works, with causal
queries aligned to the end of the keys. Selection is per query head (Quest's ``group_pages``: per kv
head), masks are applied before top-k, scoring runs in float32 (float64 inputs stay float64).

Padding: ``key_padding_mask [B, Nk]`` (True = real key, e.g. left padding of a batch) keeps
padded keys out of every selection: they score ``-inf`` (Quest: pages are bounded by their real
keys only, a page without one is never chosen), so their values never influence the result.
With padding Quest computes the page bounds from ``k`` directly instead of the incremental
summary in ``state``.

Stateful use (decoding loops, the Hugging Face integration) passes ``state=state.at(layer)`` (a
:class:`~spattn.kvcache.LayerState`: a :class:`~spattn.kvcache.SelectorState` and the layer
index): Quest and Double Sparsity then keep their page summaries / label caches incrementally,
and TidalDecode shares positions across layers. Where plain dense attention is exact (budget
covering every key, TidalDecode's dense and selection layers) :meth:`select` returns an
:class:`AllKeys` selection (``every_visible_key`` is True), so a caller can use a dense kernel there.
``plan(q, k, causal, state=, layer=)`` is a deprecated alias (``None`` where ``select`` returns all keys).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any, Optional, Union

import torch
from torch import Tensor

from .. import _compiled
from .._checks import int_at_least, is_int
from ..kvcache import LabelCache, LayerState, PageSummary, SelectorState
from ..layout import Layout
from ..registry import register
from ..selection import PageSelection, TokenSelection
from ._padding import masked_block_extrema, real_tokens
from .base import Pattern, check_int, check_qk

__all__ = ["Quest", "DoubleSparsity", "TidalDecode", "AllKeys", "quest_page_bounds", "resolve_budget", "QUEST_RULES"]

#: Double Sparsity label cache precisions (None: the keys' dtype)
_LABEL_DTYPES = {None: None, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: Quest's selection rules: the official kernel path or the official evaluation path
QUEST_RULES = ("kernel", "evaluation")

#: elements of one chunk of approximate scores ``[B, Hq, chunk, Nk]``
_SCORE_BUDGET = 1 << 24


def check_budget(owner: str, budget: Any) -> None:
    """A token budget is an int >= 1 (tokens) or a float in (0, 1] (fraction of the keys)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"{owner}: budget must be an int >= 1 (tokens) or a float in (0, 1] (fraction), got {budget!r}")
    if isinstance(budget, int):
        if budget < 1:
            raise ValueError(f"{owner}: budget must be >= 1 token, got {budget}")
    elif not (0.0 < budget <= 1.0) or math.isnan(budget):
        raise ValueError(f"{owner}: a fractional budget must lie in (0, 1], got {budget}")


def resolve_budget(budget: Union[int, float], kv_len: int) -> int:
    """Tokens allowed for ``kv_len`` keys: the int itself, or ``ceil(fraction * kv_len)``."""
    if isinstance(budget, float):
        return max(1, math.ceil(budget * kv_len))
    return budget


def _score_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _limits(nq: int, nk: int, causal: bool, device) -> Tensor:
    """int64 ``[Nq]``: the last key each query may see."""
    if causal:
        return torch.arange(nq, device=device) + (nk - nq)
    return torch.full((nq,), nk - 1, dtype=torch.long, device=device)


def _grouped(q: Tensor, hkv: int) -> Tensor:
    """``[B, Hq, Nq, D]`` -> ``[B, Hkv, G*Nq, D]`` (query heads of one kv head side by side)."""
    b, hq, nq, d = q.shape
    return q.reshape(b, hkv, (hq // hkv) * nq, d)


class AllKeys(TokenSelection):
    """A decode selector's answer where its budget covers the cache: every key each query may see
    (shared over batch and heads). Exactly dense attention, so callers may run a dense kernel."""

    #: marks the selection of every visible key (plain dense attention is exact)
    every_visible_key = True


def _all_keys(q: Tensor, k: Tensor, causal: bool) -> AllKeys:
    """Every key each query may see (the dense selection), shared over batch and heads."""
    nq, nk = q.shape[2], k.shape[2]
    pos = torch.arange(nk, device=q.device)
    last = _limits(nq, nk, causal, q.device)
    idx = torch.where(pos[None, :] <= last[:, None], pos[None, :], -1)
    return AllKeys(idx[None, None], q_len=nq, kv_len=nk)


def _store_and_layer(owner: str, state: Any) -> tuple[Optional[SelectorState], Any]:
    """``select``'s ``state``: None, a :class:`LayerState` or (layer None) a bare :class:`SelectorState`."""
    if state is None:
        return None, None
    if isinstance(state, LayerState):
        return state.store, state.layer
    if isinstance(state, SelectorState):
        return state, None
    raise TypeError(
        f"{owner}: state must be a spattn.kvcache.LayerState (state.at(layer)), a SelectorState or None, "
        f"got {type(state).__name__}"
    )


def _topk_tokens(scores: Tensor, count: int) -> Tensor:
    """Top ``count`` keys of ``scores [..., Nk]`` (``-inf`` = not allowed) -> indices, ``-1`` for unused slots."""
    count = min(count, scores.shape[-1])
    val, idx = scores.topk(count, dim=-1, sorted=False)
    idx = torch.where(torch.isneginf(val), -1, idx)
    return idx.sort(dim=-1).values  # ascending positions (-1 first) for gather locality


class _DecodeSelector(Pattern):
    """Shared plumbing: :meth:`select` from each selector's ``_plan``, :meth:`layout` for inspection."""

    content_based = True
    decode_time = True

    def _plan(
        self,
        q: Tensor,
        k: Tensor,
        causal: bool,
        store: Optional[SelectorState],
        layer: Any,
        key_padding_mask: Optional[Tensor],
    ) -> Optional[Union[TokenSelection, PageSelection]]:
        """The selection, or None where plain dense attention is exact."""
        raise NotImplementedError  # pragma: no cover - abstract

    def select(
        self,
        q: Tensor,
        k: Tensor,
        causal: bool = False,
        *,
        key_padding_mask: Optional[Tensor] = None,
        state: Union[None, LayerState, SelectorState] = None,
    ) -> Union[TokenSelection, PageSelection]:
        """The keys each query attends to: Quest's pages or the others' token indices ``[B, Hq, Nq, K]``
        (:class:`AllKeys`, broadcast ``[1, 1, Nq, Nk]``, when the budget covers the cache).
        ``key_padding_mask [B, Nk]`` (True = real key): padded keys are never selected.
        ``state``: ``selector_state.at(layer)`` in a decoding loop (incremental summaries, the layer's
        calibration, TidalDecode's shared positions), or None."""
        store, layer = _store_and_layer(self.name, state)
        sel = self._plan(q, k, causal, store, layer, key_padding_mask)
        return _all_keys(q, k, causal) if sel is None else sel

    def plan(
        self,
        q: Tensor,
        k: Tensor,
        causal: bool = False,
        *,
        state: Optional[SelectorState] = None,
        layer: Any = None,
        key_padding_mask: Optional[Tensor] = None,
    ) -> Optional[Union[TokenSelection, PageSelection]]:
        """Deprecated: ``select(q, k, causal, key_padding_mask=..., state=state.at(layer))``, with None
        where that returns every visible key (:class:`AllKeys`)."""
        warnings.warn(
            f"{type(self).__name__}.plan(..., state=, layer=) is deprecated; use "
            "select(q, k, causal, state=state.at(layer)) (every_visible_key marks a dense answer)",
            DeprecationWarning,
            stacklevel=2,
        )
        if state is not None and not isinstance(state, SelectorState):
            raise TypeError(
                f"{self.name}: state must be a spattn.kvcache.SelectorState or None, got {type(state).__name__}"
            )
        sel = self.select(
            q,
            k,
            causal,
            key_padding_mask=key_padding_mask,
            state=None if state is None and layer is None else LayerState(state, layer),
        )
        return None if isinstance(sel, AllKeys) else sel

    def layout(self, q: Tensor, k: Tensor, causal: bool = False, key_padding_mask: Optional[Tensor] = None) -> Layout:
        """The selection as a block Layout (``O(Nq * Nk)``: for inspection and the reference backend)."""
        return self.select(q, k, causal, key_padding_mask=key_padding_mask).to_layout()

    @staticmethod
    def _check(owner: str, q: Tensor, k: Tensor, causal: bool, state, layer) -> tuple[int, int, int, int, int]:
        dims = check_qk(q, k)
        if dims[1] % dims[2]:
            raise ValueError(f"{owner}: query heads ({dims[1]}) must be a multiple of kv heads ({dims[2]})")
        if not isinstance(causal, bool):
            raise TypeError(f"{owner}: causal must be a bool, got {type(causal).__name__}")
        if state is not None and not isinstance(state, SelectorState):
            raise TypeError(
                f"{owner}: state must be a spattn.kvcache.SelectorState or None, got {type(state).__name__}"
            )
        if causal and dims[3] > dims[4]:
            raise ValueError(f"{owner}: causal decoding needs Nq <= Nk, got Nq={dims[3]}, Nk={dims[4]}")
        return dims


def quest_page_bounds(q: Tensor, kmax: Tensor, kmin: Optional[Tensor] = None) -> Tensor:
    """Quest's per-page upper bound of ``q . k``: ``U[b, h, i, p] = sum_d max(q_d M_pd, q_d m_pd)``.

    ``q [B, Hq, Nq, D]``, ``kmax/kmin [B, Hkv, P, D]`` -> ``[B, Hq, Nq, P]`` (float32/float64); or
    ``kmin=None`` and ``kmax`` the packed ``[kmax | kmin]`` of :attr:`PageSummary.bounds` (``[..., 2D]``).
    Since ``M >= m``, the max picks ``M`` where ``q_d >= 0`` and ``m`` elsewhere: one matmul of
    ``[q+ | q-]`` with ``[M | m]``.
    """
    b, hq, nq, d = q.shape
    packed = kmax if kmin is None else torch.cat([kmax, kmin], dim=-1)
    hkv, pages = packed.shape[1], packed.shape[2]
    dt = _score_dtype(q)
    qg = _grouped(q.to(dt), hkv)
    split = torch.cat([qg.clamp(min=0), qg.clamp(max=0)], dim=-1)
    return torch.matmul(split, packed.to(dt).transpose(-1, -2)).reshape(b, hq, nq, pages)


@register(
    "quest",
    kind="dynamic",
    description="Quest decode selection: pages of keys bounded by elementwise max/min, top pages by the q.k upper bound",
    paper="Tang et al. 2024, Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference (ICML)",
)
class Quest(_DecodeSelector):
    """Quest page selection (Tang et al., ICML 2024).

    Args:
        page: tokens per page (paper: 16).
        budget: token budget, int tokens or float fraction of the cache (Sparse Frontier default 1024).
        min_pages: lower bound on the number of pages kept (the evaluation code keeps at least 3).
        group_pages: with grouped-query attention, keep one page set per kv head (scored by the max of
            its query heads' bounds) instead of one per query head (the paper, written for multi-head
            attention). Each kept page is then read once per group: the memory read per step, which
            bounds decoding speed, is that of Quest on an MHA model with the same budget.
        rule: which of Quest's two official references the selection follows (they disagree):

            * ``"kernel"`` (default): the CUDA kernel path (``quest/utils/controller.py`` and
              ``quest/models/llama.py``): the page holding the query's own position (the newest,
              partially filled page) is always kept and the other pages compete for the rest of
              the budget. Pages kept: ``max(min_pages, ceil(budget / page))`` (the kernel path uses
              ``budget // page`` and no minimum: the same for a budget that is a multiple of the
              page and at least ``min_pages`` pages).
            * ``"evaluation"``: the accuracy-evaluation path (``evaluation/quest_attention.py``,
              ``local_heavy_hitter_mask``), which produced the paper's accuracy numbers: the top
              ``min(#pages, max(min_pages, min(Nk, budget) // page))`` pages by the bound, the
              query's own page is *not* forced.

    Pages entirely in the query's future (causal) are never kept. Only the keys the query may see are
    attended inside kept pages. ``key_padding_mask [B, Nk]``: pages are bounded by their real keys
    only and a page without one is never kept.
    """

    name = "quest"

    def __init__(
        self,
        page: int = 16,
        budget: Union[int, float] = 1024,
        min_pages: int = 3,
        group_pages: bool = False,
        rule: str = "kernel",
    ):
        check_int("quest", "page", page, minimum=1)
        check_budget("quest", budget)
        check_int("quest", "min_pages", min_pages, minimum=1)
        if not isinstance(group_pages, bool):
            raise TypeError(f"quest: group_pages must be a bool, got {group_pages!r}")
        if rule not in QUEST_RULES:
            raise ValueError(f"quest: rule must be one of {QUEST_RULES}, got {rule!r}")
        self.page, self.budget, self.min_pages, self.group_pages, self.rule = page, budget, min_pages, group_pages, rule

    def pages_kept(self, kv_len: int) -> int:
        pages = -(-kv_len // self.page)
        tokens = resolve_budget(self.budget, kv_len)
        if self.rule == "evaluation":
            return min(pages, max(self.min_pages, min(kv_len, tokens) // self.page))
        return min(pages, max(self.min_pages, -(-tokens // self.page)))

    def summary(self, k: Tensor, state: Optional[SelectorState] = None, layer: Any = None) -> PageSummary:
        """The page bounds of ``k`` (kept incrementally in ``state`` when given)."""
        if state is None:
            return PageSummary(self.page).update(k)
        return state.layer(layer).setdefault(f"quest_pages_{self.page}", PageSummary(self.page)).update(k)

    def page_scores(
        self,
        q: Tensor,
        k: Tensor,
        causal: bool = False,
        summary: Optional[PageSummary] = None,
        key_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """Page bounds with the selection rule's masks: ``[B, Hq, Nq, P]``, ``+inf`` for each query's own
        page (rule ``"kernel"``), ``-inf`` for pages it may not see or without a real key."""
        nq, nk = q.shape[2], k.shape[2]
        real = real_tokens("quest", key_padding_mask, k.shape[0], nk, k.device)
        if real is None:
            summary = summary or PageSummary(self.page).update(k)
            bound = quest_page_bounds(q, summary.bounds)
        else:  # bounds over the real keys of each page
            kmax, kmin, has_key = masked_block_extrema(k, self.page, real)
            bound = quest_page_bounds(q, kmax, kmin)
            bound = bound.masked_fill(~has_key[:, :, None, :], float("-inf"))
        own_forced = self.rule == "kernel"
        if not causal or nq == 1:  # every query sees every page; its own page is the last one
            if own_forced:
                bound[..., -1] = float("inf")
            return bound
        last = _limits(nq, nk, causal, q.device)  # [Nq]
        own = last // self.page
        first_tok = torch.arange(bound.shape[-1], device=q.device) * self.page
        visible = first_tok[None, :] <= last[:, None]  # [Nq, P]
        bound = bound.masked_fill(~visible, float("-inf"))
        if not own_forced:
            return bound
        is_own = torch.arange(bound.shape[-1], device=q.device)[None, :] == own[:, None]
        return bound.masked_fill(is_own, float("inf"))

    def _plan(self, q, k, causal, state, layer, key_padding_mask):
        self._check("quest", q, k, causal, state, layer)
        nq, nk = q.shape[2], k.shape[2]
        count = self.pages_kept(nk)
        if count * self.page >= nk:
            return None  # every page fits in the budget: exactly dense
        real = real_tokens("quest", key_padding_mask, k.shape[0], nk, k.device)
        summary = self.summary(k, state, layer) if real is None else None
        scores = self.page_scores(q, k, causal, summary, key_padding_mask=real)
        b, hq, hkv = q.shape[0], q.shape[1], k.shape[1]
        group = hq // hkv if self.group_pages else 1
        if group > 1:
            scores = scores.view(b, hkv, group, nq, -1).amax(dim=2)  # [B, Hkv, Nq, P]
        val, pages = scores.topk(min(count, scores.shape[-1]), dim=-1, sorted=False)  # page ids
        if (causal and nq > 1) or real is not None:  # fewer visible (real) pages than the budget: unused slots are -1
            pages = torch.where(torch.isneginf(val), -1, pages)
        if group > 1:
            pages = pages.repeat_interleave(group, dim=1)  # [B, Hq, Nq, n]
        return PageSelection(pages, self.page, q_len=nq, kv_len=nk, causal=causal, shared_by=group)


def _q_at_channels(q: Tensor, channels: Tensor) -> Tensor:
    """``q [B, Hq, Nq, D]``, ``channels [Hq, r]`` -> ``[B, Hq, Nq, r]``."""
    b, hq, nq, _ = q.shape
    return torch.gather(q, 3, channels.to(q.device)[None, :, None, :].expand(b, hq, nq, channels.shape[1]))


@register(
    "double_sparsity",
    kind="dynamic",
    description="Double Sparsity decode selection: approximate scores on calibrated outlier channels, top tokens",
    paper="Yang et al. 2024, Post-Training Sparse Attention with Double Sparsity (arXiv 2408.07092)",
)
class DoubleSparsity(_DecodeSelector):
    """Double Sparsity token selection (Yang et al. 2024).

    Args:
        channels: channels ``r`` kept per head for the approximate scores (reference: ``D / 8``).
        budget: tokens attended per query, int or float fraction (reference examples: 256 or 1/16).
        calibration: path of a saved calibration (:meth:`save`), or None to calibrate with :meth:`calibrate`.
        group_tokens: with grouped-query attention, keep one token set per kv head instead of one per
            query head (the paper, written for multi-head attention): the group shares one channel set
            (the top channels of its heads' summed importance), one label cache row per kv head, and
            a token's group score is the max of its heads' approximate scores. Each kept token is then
            read once per group (a :class:`~spattn.selection.PageSelection` of one-token pages, run by
            the page-sparse kernel's shared fetch), as Quest's ``group_pages``.
        label_dtype: precision of the label cache: None (the keys' dtype) or ``"bfloat16"`` /
            ``"float16"`` (half the bytes read per step; the paper keeps 16-bit labels, optionally 4-bit).
            Labels only rank tokens: attention runs on the full-precision keys.

    Calibration (offline, on text like the deployment data): for every layer and query head,
    ``importance[h, d] = mean_t |q[t, d] * k[t, d]|`` over positions ``t`` of the calibration
    sequences (post-RoPE q and the key at the same position, "qk" mode of the reference code).
    The ``channels`` largest form the head's channel set. Selection needs a calibration for the layer.
    """

    name = "double_sparsity"

    def __init__(
        self,
        channels: int = 16,
        budget: Union[int, float] = 256,
        calibration: Optional[str] = None,
        group_tokens: bool = False,
        label_dtype: Optional[str] = None,
    ):
        check_int("double_sparsity", "channels", channels, minimum=1)
        check_budget("double_sparsity", budget)
        if calibration is not None and not isinstance(calibration, (str, os.PathLike)):
            raise TypeError(f"double_sparsity: calibration must be a file path or None, got {calibration!r}")
        if not isinstance(group_tokens, bool):
            raise TypeError(f"double_sparsity: group_tokens must be a bool, got {group_tokens!r}")
        if label_dtype not in _LABEL_DTYPES:
            raise ValueError(
                f"double_sparsity: label_dtype must be one of {sorted(_LABEL_DTYPES, key=str)}, got {label_dtype!r}"
            )
        self.channels, self.budget, self.calibration = channels, budget, calibration
        self.group_tokens, self.label_dtype = group_tokens, label_dtype
        self._sums: dict[Any, Tensor] = {}
        self._counts: dict[Any, int] = {}
        self._channel_maps: dict[Any, Tensor] = {}  # per (layer, device): cleared when statistics change
        if calibration is not None:
            try:
                self.load_state_dict(_read_calibration(calibration))
            except ValueError as err:
                message = str(err).removeprefix("double_sparsity: ")
                raise ValueError(f"double_sparsity: calibration file {os.fspath(calibration)!r}: {message}") from None

    # -- calibration ---------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, q: Tensor, k: Tensor, layer: Any = None) -> None:
        """Accumulate ``|q ⊙ k|`` statistics of one batch for ``layer``.

        ``q [B, Hq, Nq, D]``, ``k [B, Hkv, Nk, D]`` with ``Nq <= Nk``: query ``i`` is paired with the key
        at its own position, ``Nk - Nq + i`` (queries aligned to the end of the keys).
        """
        b, hq, hkv, nq, nk = check_qk(q, k)
        if hq % hkv:
            raise ValueError(f"double_sparsity: query heads ({hq}) must be a multiple of kv heads ({hkv})")
        if nq > nk:
            raise ValueError(f"double_sparsity.calibrate: needs Nq <= Nk, got Nq={nq}, Nk={nk}")
        k_same = k[:, :, nk - nq :].to(torch.float64).repeat_interleave(hq // hkv, dim=1)
        stat = (q.to(torch.float64) * k_same).abs().sum(dim=(0, 2))  # [Hq, D]
        if layer in self._sums:
            if self._sums[layer].shape != stat.shape:
                raise ValueError(
                    f"double_sparsity.calibrate: layer {layer!r} was calibrated with [Hq, D] = "
                    f"{tuple(self._sums[layer].shape)}, got {tuple(stat.shape)}"
                )
            self._sums[layer] += stat.cpu()
            self._counts[layer] += b * nq
        else:
            self._sums[layer] = stat.cpu()
            self._counts[layer] = b * nq
        self._channel_maps.clear()

    def calibrated_layers(self) -> list:
        return list(self._sums)

    def importance(self, layer: Any = None) -> Tensor:
        """float64 ``[Hq, D]``: mean ``|q_d k_d|`` per head and channel for ``layer``."""
        key = self._layer_key(layer)
        return self._sums[key] / self._counts[key]

    def channel_map(self, layer: Any = None, device=None, group: int = 1) -> Tensor:
        """int64 ``[Hq / group, channels]``: the top channels by importance of each head (``group > 1``:
        of each run of ``group`` consecutive heads, by their summed importance), ascending channel order."""
        key = (self._layer_key(layer), str(device), group)
        if key not in self._channel_maps:  # decoding asks once per layer and step
            imp = self.importance(layer)
            if imp.shape[0] % group:
                raise ValueError(
                    f"double_sparsity: {imp.shape[0]} calibrated query heads do not form groups of {group}"
                )
            imp = imp.view(imp.shape[0] // group, group, imp.shape[1]).sum(1)
            if self.channels > imp.shape[1]:
                raise ValueError(f"double_sparsity: channels={self.channels} exceeds the head dim {imp.shape[1]}")
            top = imp.topk(self.channels, dim=1).indices.sort(dim=1).values
            self._channel_maps[key] = top if device is None else top.to(device)
        return self._channel_maps[key]

    def _layer_key(self, layer: Any) -> Any:
        if layer in self._sums:
            return layer
        if None in self._sums and len(self._sums) == 1:
            return None
        if not self._sums:
            raise ValueError(
                "double_sparsity: not calibrated; call .calibrate(q, k, layer=...) on calibration data "
                "(spattn.integrations.hf.calibrate_double_sparsity for a transformers model) or pass calibration=path"
            )
        raise ValueError(
            f"double_sparsity: no calibration for layer {layer!r}; calibrated: {sorted(map(str, self._sums))}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "layers": [
                {"layer": layer, "sum": self._sums[layer].tolist(), "count": self._counts[layer]}
                for layer in self._sums
            ]
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load :meth:`state_dict` output; every field is checked (ValueError naming it otherwise)."""
        form = "{'layers': [{'layer': int or null, 'sum': [[float, ...] per head], 'count': int >= 1}, ...]}"
        if not isinstance(state, dict) or not isinstance(state.get("layers"), list):
            raise ValueError(f"double_sparsity: a calibration state is {form}")
        sums, counts = {}, {}
        for i, entry in enumerate(state["layers"]):
            if not isinstance(entry, dict) or not {"layer", "sum", "count"} <= set(entry):
                raise ValueError(
                    f"double_sparsity: layers[{i}] must be a dict with 'layer', 'sum' and 'count'; "
                    f"a calibration state is {form}"
                )
            layer, count = entry["layer"], entry["count"]
            if layer is not None and not is_int(layer):
                raise ValueError(f"double_sparsity: layers[{i}].layer must be an int or null, got {layer!r}")
            if layer in sums:
                raise ValueError(f"double_sparsity: layers[{i}].layer {layer!r} appears twice")
            int_at_least(f"double_sparsity: layers[{i}].count", count)
            try:
                total = torch.tensor(entry["sum"], dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError):
                total = None
            if (
                total is None
                or total.dim() != 2
                or 0 in total.shape
                or not bool(torch.isfinite(total).all())
                or bool((total < 0).any())
            ):
                raise ValueError(
                    f"double_sparsity: layers[{i}].sum must be a non-empty [Hq, D] list of lists of "
                    "finite numbers >= 0 (sums of |q k|)"
                )
            sums[layer], counts[layer] = total, count
        self._sums, self._counts = sums, counts
        self._channel_maps.clear()

    def save(self, path: "str | os.PathLike") -> None:
        """Write the calibration as JSON (layer keys must be JSON scalars: ints or None)."""
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.state_dict(), fh)

    # -- selection -----------------------------------------------------------------------------
    def approx_scores(self, q: Tensor, labels: Tensor, channels: Tensor) -> Tensor:
        """``q_r . K_r^T / sqrt(r)`` for ``labels [B, Hq, Nk, r]`` -> ``[B, Hq, Nq, Nk]``."""
        dt = _score_dtype(q)
        qr = _q_at_channels(q, channels).to(dt)
        return (qr @ labels.to(dt).transpose(-1, -2)) / math.sqrt(channels.shape[1])

    def _plan(self, q, k, causal, state, layer, key_padding_mask):
        self._check("double_sparsity", q, k, causal, state, layer)
        b, hq, nq, d = q.shape
        hkv, nk = k.shape[1], k.shape[2]
        real = real_tokens("double_sparsity", key_padding_mask, b, nk, k.device)
        count = resolve_budget(self.budget, nk)
        group = hq // hkv if self.group_tokens else 1
        calibrated_heads, calibrated_dim = self._sums[self._layer_key(layer)].shape
        if calibrated_heads != hq:
            raise ValueError(f"double_sparsity: calibrated for {calibrated_heads} query heads, q has {hq}")
        if calibrated_dim != d:
            raise ValueError(f"double_sparsity: calibrated for head dim {calibrated_dim}, q has head dim {d}")
        channels = self.channel_map(layer, device=q.device, group=group)  # [Hq / group, r]
        if count >= nk:
            return None
        if state is None:
            cache_labels = LabelCache(channels, _LABEL_DTYPES[self.label_dtype]).update(k)
        else:
            slot = state.layer(layer)
            cache_labels = slot.get("ds_labels")
            if (
                cache_labels is None
                or cache_labels.dtype != _LABEL_DTYPES[self.label_dtype]
                or (cache_labels.channels is not channels and not torch.equal(cache_labels.channels, channels))
            ):
                cache_labels = slot["ds_labels"] = LabelCache(channels, _LABEL_DTYPES[self.label_dtype])
            cache_labels.update(k)
        if group > 1 and nq == 1 and real is None:
            fused = _group_topk_compiled(q, cache_labels, channels, count)
            if fused is not None:  # [B, Hkv, count], ascending positions
                return _group_token_pages(fused[:, :, None], group, nk, causal)
        labels = cache_labels.labels  # [B, Hq / group, Nk, r]
        last = _limits(nq, nk, causal, q.device)
        pos = torch.arange(nk, device=q.device)
        chunk = max(1, _SCORE_BUDGET // max(1, b * hq * nk))
        parts = []
        for c0 in range(0, nq, chunk):
            c1 = min(nq, c0 + chunk)
            if group > 1:  # per-head scores on the group's labels, max over the group: [B, Hkv, c, Nk]
                qg = q[:, :, c0:c1].reshape(b, hkv, group * (c1 - c0), d)
                scores = self.approx_scores(qg, labels, channels).view(b, hkv, group, c1 - c0, nk).amax(dim=2)
            else:
                scores = self.approx_scores(q[:, :, c0:c1], labels, channels)
            if causal and nq > 1:  # a single (or non-causal) query sees every key
                scores = scores.masked_fill(pos[None, :] > last[c0:c1, None], float("-inf"))
            if real is not None:  # padded keys are never selected
                scores = scores.masked_fill(~real[:, None, None, :], float("-inf"))
            parts.append(_topk_tokens(scores, count))
        indices = torch.cat(parts, dim=2)
        if group > 1:
            return _group_token_pages(indices, group, nk, causal)
        return TokenSelection(indices, q_len=nq, kv_len=nk)


def _group_token_pages(indices: Tensor, group: int, kv_len: int, causal: bool) -> PageSelection:
    """Token positions per kv head ``[B, Hkv, Nq, K]`` as one-token pages shared by each group's query heads."""
    return PageSelection(
        indices.repeat_interleave(group, dim=1),
        1,
        q_len=indices.shape[2],
        kv_len=kv_len,
        causal=causal,
        shared_by=group,
    )


def _group_topk_compiled(q: Tensor, cache: LabelCache, channels: Tensor, count: int) -> Optional[Tensor]:
    """Grouped Double Sparsity selection of single queries by the compiled CPU loop, or None where it
    does not apply (no compiler, GPU, half precision): the eager path computes the same positions
    (up to which of several equal scores is kept: the compiled loop keeps the earliest)."""
    labels = cache.labels_by_channel
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.float64):
        return None
    if labels.dtype != q.dtype and not (q.dtype == torch.float32 and labels.dtype == torch.bfloat16):
        return None
    ext = _compiled.ops()
    if ext is None:
        return None
    return ext.group_topk(q[:, :, 0].contiguous(), labels, channels.contiguous(), count)


def _read_calibration(path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise ValueError(f"double_sparsity: calibration file {os.fspath(path)!r} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"double_sparsity: calibration file {os.fspath(path)!r} is not valid JSON: {err}") from None
    except UnicodeDecodeError as err:
        raise ValueError(
            f"double_sparsity: calibration file {os.fspath(path)!r} is not UTF-8 JSON ({err.reason})"
        ) from None
    except OSError as err:
        raise ValueError(
            f"double_sparsity: calibration file {os.fspath(path)!r} cannot be read: {err.strerror}"
        ) from None


@register(
    "tidal",
    kind="dynamic",
    description="TidalDecode: full attention at a few selection layers picks positions reused by following layers",
    paper="Yang et al. 2025, TidalDecode: Fast and Accurate LLM Decoding with Position Persistent Sparse Attention (ICLR)",
)
class TidalDecode(_DecodeSelector):
    """TidalDecode position-persistent sparse attention (Yang et al., ICLR 2025).

    Args:
        budget: tokens kept per query head (reference default 256), int or float fraction.
        select_layers: the token-selection layers, ascending (reference: 2 and a middle
            re-selection layer, 13 for 32-layer Llama-3-8B).

    With ``state`` and ``layer``: layers before ``select_layers[0]`` are dense; a selection layer is
    dense and records the top-``budget`` positions of its raw scores ``q . k`` per (batch, query
    head); any other layer attends to the positions recorded by the latest selection layer in this
    forward step. Without ``state`` (plain :func:`spattn.attention`) a call is a selection step
    and returns the top-``budget`` keys by exact scores, i.e. what the following layers would use.
    """

    name = "tidal"

    def __init__(self, budget: Union[int, float] = 256, select_layers: tuple = (2, 13)):
        check_budget("tidal", budget)
        if is_int(select_layers):
            select_layers = (select_layers,)
        if not isinstance(select_layers, (tuple, list)) or not select_layers:
            raise TypeError(f"tidal: select_layers must be a non-empty tuple of layer indices, got {select_layers!r}")
        for i in select_layers:
            check_int("tidal", "select_layers entry", i, minimum=0)
        if list(select_layers) != sorted(set(select_layers)):
            raise ValueError(f"tidal: select_layers must be strictly increasing, got {tuple(select_layers)}")
        self.budget, self.select_layers = budget, tuple(select_layers)

    def top_positions(
        self, q: Tensor, k: Tensor, causal: bool, count: int, key_padding_mask: Optional[Tensor] = None
    ) -> Tensor:
        """``[B, Hq, Nq, count]`` top keys by the exact scores ``q . k`` (masked before top-k; padded
        keys, ``key_padding_mask [B, Nk]`` False, are never selected)."""
        b, hq, nq, _ = q.shape
        hkv, nk = k.shape[1], k.shape[2]
        dt = _score_dtype(q)
        last = _limits(nq, nk, causal, q.device)
        pos = torch.arange(nk, device=q.device)
        chunk = max(1, _SCORE_BUDGET // max(1, b * hq * nk))
        parts = []
        for c0 in range(0, nq, chunk):
            c1 = min(nq, c0 + chunk)
            qg = _grouped(q[:, :, c0:c1].to(dt), hkv)
            scores = (qg @ k.to(dt).transpose(-1, -2)).reshape(b, hq, c1 - c0, nk)
            scores = scores.masked_fill(pos[None, :] > last[c0:c1, None], float("-inf"))
            if key_padding_mask is not None:
                scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
            parts.append(_topk_tokens(scores, count))
        return torch.cat(parts, dim=2)

    def _plan(self, q, k, causal, state, layer, key_padding_mask):
        self._check("tidal", q, k, causal, state, layer)
        nq, nk = q.shape[2], k.shape[2]
        count = resolve_budget(self.budget, nk)
        real = real_tokens("tidal", key_padding_mask, q.shape[0], nk, k.device)
        if state is None or layer is None:
            if state is not None or layer is not None:
                raise ValueError("tidal: pass both state= and layer= (or neither)")
            return None if count >= nk else TokenSelection(self.top_positions(q, k, causal, count, real), nq, nk)
        check_int("tidal", "layer", layer, minimum=0)
        if layer < self.select_layers[0]:
            return None
        if layer in self.select_layers:
            if count < nk:
                state.shared["tidal"] = (layer, TokenSelection(self.top_positions(q, k, causal, count, real), nq, nk))
            else:
                state.shared.pop("tidal", None)
            return None
        if count >= nk:
            return None
        recorded = state.shared.get("tidal")
        if recorded is None or recorded[0] > layer:
            raise ValueError(
                f"tidal: layer {layer} reuses positions but no selection layer {self.select_layers} ran before it in this step"
            )
        sel = recorded[1]
        if (sel.q_len, sel.kv_len) != (nq, nk) or sel.heads != q.shape[1] or sel.batch != q.shape[0]:
            raise ValueError(
                f"tidal: positions recorded at layer {recorded[0]} are for [B, Hq, Nq, Nk] = "
                f"{(sel.batch, sel.heads, sel.q_len, sel.kv_len)}; layer {layer} has {(q.shape[0], q.shape[1], nq, nk)}"
            )
        return sel
