"""MInference 1.0 (Jiang et al., NeurIPS 2024, arXiv 2407.02490): the vertical-slash and block-sparse
prefill patterns, and ``minference(config=path, layer=0)``: per-head patterns chosen offline by
:func:`search_minference_config` (MInference §3.2 "kernel-aware optimal sparse pattern search":
per head, among A-shape / vertical-slash / block-sparse candidates within a budget, the one that
keeps the most true attention mass on a sample), saved to / loaded from JSON.

Conventions (shared with ``xattention.py`` and ``flexprefill.py``, whose common helpers live in
``_scoring.py`` and ``_tiles.py``)
* q ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nk, D]``; query head ``h`` reads key head ``h // (Hq / Hkv)``.
  Every selection is per *query* head, so layouts have ``B`` batch and ``Hq`` head entries.
* Causal alignment: query ``i`` sits at key position ``i' = i + Nk - Nq``; a *slash* (diagonal)
  is an offset ``d = i' - j >= 0``; a *vertical* is a key position ``j``.
* Estimation runs in fp32 under ``torch.no_grad`` (selection carries no gradient, as in the papers)
  and never builds an ``Nq x Nk`` tensor: vertical-slash looks at the last ``last_q`` queries only
  (``last_q x Nk``), block-sparse at mean-pooled blocks (``Nq/b x Nk/b``).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from .._checks import int_at_least
from ..layout import Layout, true_positions
from ..registry import register
from ._padding import last_real_query_probs, masked_block_mean, query_tokens, real_tokens
from ._scoring import diagonal_sums, expand_kv, last_query_probs, pool_mean, rank_select
from ._tiles import block_layout, pack_blocks, tile_bounds
from .base import PaddedPattern, causal_mask_mod, check_float, check_int, check_qk, require_causal

__all__ = [
    "VerticalSlash",
    "MInferenceBlock",
    "MInference",
    "vertical_slash_scores",
    "select_vertical_slash",
    "select_pooled_topk",
    "prefill_layout",
    "minference_heads_layout",
    "attention_mass",
    "default_candidates",
    "search_minference_config",
    "save_minference_config",
    "load_minference_config",
    "validate_minference_config",
    "CONFIG_FORMAT",
]


# ---------------------------------------------------------------------------------------------
# estimation and layouts


def prefill_layout(
    q_len: int,
    kv_len: int,
    block: int,
    *,
    vertical: Optional[Tensor] = None,
    slash: Optional[Tensor] = None,
    blocks: Optional[Tensor] = None,
    whole_slash_tiles: bool = False,
) -> Layout:
    """Causal Layout of the union of vertical lines, slash lines and whole tiles.

    ``vertical [B, H, Nk]`` bool (key positions), ``slash [B, H, Nk]`` bool (offsets ``d = i' - j``),
    ``blocks [B, H, NQB, NKB]`` bool (tiles computed whole, causal inside). Query ``i`` attends key
    ``j`` iff ``j <= i'`` and (``vertical[j]`` or ``slash[i' - j]`` or the tile of (i, j) is in ``blocks``).
    Slashes become partial tiles with a table-lookup predicate, verticals become Layout columns.
    With ``whole_slash_tiles`` every tile a selected slash crosses is computed whole instead (causal
    inside), as MInference's kernel computes a block of keys around each slash: more pairs, but the
    only token predicate left is causality, which is far cheaper to run.
    """
    ref = next(t for t in (vertical, slash, blocks) if t is not None)
    dev, (bsz, heads) = ref.device, ref.shape[:2]
    off = kv_len - q_len
    p0, p1, k0, k1 = tile_bounds(q_len, kv_len, block, dev)
    nqb, nkb = p0.shape[0], k0.shape[1]
    touched = k0 <= p1  # [NQB, NKB] tiles holding at least one causal pair
    dmin, dmax = p0 - k1, p1 - k0  # range of offsets d inside each tile
    block_map = torch.zeros(bsz, heads, nqb, nkb, dtype=torch.bool, device=dev)
    full_map = torch.zeros_like(block_map)
    if blocks is not None:
        block_map |= blocks
        full_map |= blocks & (dmin >= 0)
    if slash is not None:
        # how many selected offsets lie in [max(dmin, 0), dmax]: prefix sums, no N x N tensor
        cs = torch.nn.functional.pad(slash.to(torch.int32).cumsum(-1), (1, 0))
        lo = dmin.clamp(min=0, max=kv_len - 1).expand(nqb, nkb)
        hi = dmax.clamp(min=0, max=kv_len - 1).expand(nqb, nkb)
        gather = lambda i: torch.gather(cs, -1, i.reshape(1, 1, -1).expand(bsz, heads, -1)).view(bsz, heads, nqb, nkb)
        hits = gather(hi + 1) - gather(lo)
        block_map |= hits > 0
        full_map |= (dmin >= 0) & ((hits > 0) if whole_slash_tiles else (hits == (dmax - dmin + 1)))
    block_map &= touched
    full_map &= block_map
    num, idx, full = pack_blocks(block_map, full_map)

    col_num = col_idx = None
    if vertical is not None and bool(vertical.any()):
        count, cols = true_positions(vertical)  # [B, H], [B, H, W] ascending, 0-padded
        valid = torch.arange(cols.shape[-1], device=dev) < count[..., None]
        keyed = torch.where(valid, cols, kv_len)
        # a query block sees the verticals up to its last aligned position
        col_num = torch.searchsorted(
            keyed.contiguous(), p1.view(1, 1, -1).expand(bsz, heads, -1).contiguous(), right=True
        )
        col_idx = cols[:, :, None, :].expand(bsz, heads, nqb, cols.shape[-1])

    # Without exact slash lines, every selected tile is whole (causal inside) and every column a
    # selected vertical: causality is the whole predicate.
    if slash is None or whole_slash_tiles or not bool(slash.any()):
        mask_mod = causal_mask_mod(q_len, kv_len)
    else:
        vert_t = vertical if vertical is not None else torch.zeros(bsz, heads, kv_len, dtype=torch.bool, device=dev)

        def mask_mod(b, h, q_idx, kv_idx):
            d = q_idx + off - kv_idx
            hit = slash[b, h, d.clamp(0, kv_len - 1)] | vert_t[b, h, kv_idx]
            if blocks is not None:
                hit = hit | blocks[b, h, q_idx // block, kv_idx // block]
            return (d >= 0) & hit

    return Layout(
        num,
        idx,
        q_len=q_len,
        kv_len=kv_len,
        block_q=block,
        mask_mod=mask_mod,
        full=full,
        col_num=col_num,
        col_indices=col_idx,
    )


def vertical_slash_scores(
    q: Tensor, k: Tensor, last_q: int = 64, key_padding_mask: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """MInference's estimate: column sums and diagonal sums of the last queries' attention.

    Returns ``(vertical [B, Hq, Nk], slash [B, Hq, Nk])``; ``slash[..., d]`` sums offset ``d``.
    With ``key_padding_mask [B, Nk]`` the last real queries attend the real keys only.
    """
    real = real_tokens("vertical_slash", key_padding_mask, k.shape[0], k.shape[2], k.device)
    if real is not None:
        probs, pos, _, _ = last_real_query_probs(q, k, last_q, real)
        return probs.sum(-2), diagonal_sums(probs, pos)
    probs, pos = last_query_probs(q, k, last_q)
    return probs.sum(-2), diagonal_sums(probs, pos)


def select_vertical_slash(
    q: Tensor,
    k: Tensor,
    vertical,
    slash,
    *,
    last_q: int = 64,
    sinks: int = 30,
    local: int = 100,
    key_padding_mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Top ``vertical`` columns and top ``slash`` offsets per head (bool ``[B, Hq, Nk]`` each).

    The first ``sinks`` columns and the ``local`` nearest offsets are forced in (they rank first,
    nearest/first ones first) and count towards the budgets. ``vertical``/``slash`` may be ints or
    per-head ``[Hq]`` tensors.
    """
    v_score, s_score = vertical_slash_scores(q, k, last_q, key_padding_mask)
    nk = k.shape[2]
    inf = torch.tensor(float("inf"), device=q.device)
    v_score[..., : min(sinks, nk)] = inf
    s_score[..., : min(local, nk)] = inf
    vcount = torch.as_tensor(vertical, device=q.device).clamp(max=nk)
    scount = torch.as_tensor(slash, device=q.device).clamp(max=nk)
    if vcount.dim() == 1:
        vcount, scount = vcount[None], scount[None]
    return rank_select(v_score, vcount), rank_select(s_score, scount)


def select_pooled_topk(
    q: Tensor, k: Tensor, topk, block: int, causal: bool, key_padding_mask: Optional[Tensor] = None
) -> Tensor:
    """MInference block-sparse selection: top-``topk`` key blocks per query block by mean-pooled
    ``q̄ k̄ᵀ`` among the causally visible ones. bool ``[B, Hq, NQB, NKB]``; ``topk`` int or ``[Hq]``.
    With ``key_padding_mask [B, Nk]`` blocks pool their real tokens and key blocks without one are never kept."""
    hq, nq, nk = q.shape[1], q.shape[2], k.shape[2]
    real = real_tokens("minference_block", key_padding_mask, k.shape[0], nk, k.device)
    if real is None:
        qp = pool_mean(q.float(), block)
        kp = pool_mean(expand_kv(k, hq).float(), block)
    else:
        qp = masked_block_mean(q.float(), block, query_tokens(real, nq, nk))[0]
        kp, has_key = masked_block_mean(expand_kv(k, hq).float(), block, real)
    scores = torch.matmul(qp, kp.transpose(-1, -2))
    if real is not None:
        scores = scores.masked_fill(~has_key[:, :, None, :], float("-inf"))
    if causal:
        p0, p1, k0, _ = tile_bounds(nq, nk, block, q.device)
        scores = scores.masked_fill(k0 > p1, float("-inf"))
    count = torch.as_tensor(topk, device=q.device)
    count = count[None, :, None] if count.dim() == 1 else count
    chosen = rank_select(scores, count)
    return chosen & torch.isfinite(scores)


# ---------------------------------------------------------------------------------------------
# patterns


@register(
    "vertical_slash",
    kind="dynamic",
    description="MInference vertical-slash: top columns + top diagonals estimated from the last queries",
    paper="Jiang et al. 2024, MInference 1.0 (NeurIPS 2024)",
)
class VerticalSlash(PaddedPattern):
    """MInference's vertical-slash head pattern (Jiang et al. 2024, §3.2; official
    ``gather_last_q_vertical_slash_topk_v4``).

    The last ``last_q`` queries' causal attention ``P = softmax(q_last kᵀ/√D)`` (fp32) is summed per
    key (vertical score) and per diagonal offset ``d = i' - j`` (slash score). The first ``sinks``
    columns and the ``local`` nearest diagonals are forced in; the budgets are raised to at least
    30 verticals / 50 slashes and capped at ``Nk`` as in the official code. Query ``i`` then attends
    key ``j`` iff ``j <= i'`` and (``j`` is a selected vertical or ``i' - j`` a selected slash):
    the exact lines of the paper. ``whole_tiles=True`` executes it as the official GPU kernel does,
    which widens each slash to a block of keys (``convert_vertical_slash_indexes``): every tile a
    selected slash crosses is computed whole, a superset of the pairs that is much cheaper on CPU
    (no per-token lookup). Causal only.
    """

    name = "vertical_slash"
    content_based = True

    def __init__(
        self,
        vertical: int = 1000,
        slash: int = 6096,
        last_q: int = 64,
        sinks: int = 30,
        local: int = 100,
        block: int = 64,
        whole_tiles: bool = False,
    ):
        for pname, val, low in (
            ("vertical", vertical, 1),
            ("slash", slash, 1),
            ("last_q", last_q, 1),
            ("sinks", sinks, 0),
            ("local", local, 0),
            ("block", block, 1),
        ):
            check_int("vertical_slash", pname, val, low)
        if not isinstance(whole_tiles, bool):
            raise TypeError(f"vertical_slash: whole_tiles must be a bool, got {whole_tiles!r}")
        self.vertical, self.slash, self.last_q = vertical, slash, last_q
        self.sinks, self.local, self.block, self.whole_tiles = sinks, local, block, whole_tiles

    def layout(self, q: Tensor, k: Tensor, causal: bool = False, key_padding_mask: Optional[Tensor] = None) -> Layout:
        _, _, _, nq, nk = check_qk(q, k)
        require_causal("vertical_slash", causal)
        with torch.no_grad():
            vert, sl = select_vertical_slash(
                q,
                k,
                max(self.vertical, 30),
                max(self.slash, 50),
                last_q=self.last_q,
                sinks=self.sinks,
                local=self.local,
                key_padding_mask=key_padding_mask,
            )
            return prefill_layout(nq, nk, self.block, vertical=vert, slash=sl, whole_slash_tiles=self.whole_tiles)


@register(
    "minference_block",
    kind="dynamic",
    description="MInference block-sparse: top-k key blocks per query block by mean-pooled q/k scores",
    paper="Jiang et al. 2024, MInference 1.0 (NeurIPS 2024)",
)
class MInferenceBlock(PaddedPattern):
    """MInference's block-sparse head pattern (official ``_build_block_index``): q and k are
    mean-pooled in blocks of ``block`` tokens, ``q̄ k̄ᵀ`` is masked block-causally and each query
    block keeps its top-``k`` key blocks (no block is forced, as in the official code; ties go to
    the lower block). Tiles are computed whole, causal inside. Non-causal: no block mask.
    Deviation: the last, partial block averages its real tokens (the official code zero-pads it).
    """

    name = "minference_block"
    content_based = True

    def __init__(self, k: int = 100, block: int = 64):
        check_int("minference_block", "k", k, 1)
        check_int("minference_block", "block", block, 1)
        self.k, self.block = k, block

    def layout(self, q: Tensor, k: Tensor, causal: bool = False, key_padding_mask: Optional[Tensor] = None) -> Layout:
        _, _, _, nq, nk = check_qk(q, k)
        with torch.no_grad():
            chosen = select_pooled_topk(q, k, self.k, self.block, causal, key_padding_mask)
            return block_layout(chosen, nq, nk, self.block, causal)


# ---------------------------------------------------------------------------------------------
# per-head patterns from an offline search (MInference §3.2)

CONFIG_FORMAT = "spattn-minference-config"
CONFIG_VERSION = 1
#: each head pattern and its integer parameters with their minimum values
HEAD_PATTERNS = {
    "a_shape": {"sinks": 0, "local": 1},
    "vertical_slash": {"vertical": 1, "slash": 1},
    "block_sparse": {"k": 1},
}


# ---------------------------------------------------------------------------------------------
# per-head layouts


def minference_heads_layout(
    q: Tensor,
    k: Tensor,
    heads: Sequence[dict],
    *,
    block: int = 64,
    last_q: int = 64,
    key_padding_mask: Optional[Tensor] = None,
) -> Layout:
    """Causal Layout where query head ``h`` follows ``heads[h]`` (one dict per query head).

    * ``{"pattern": "a_shape", "sinks": s, "local": w}``: ``j < s`` or ``i' - j < w`` (StreamingLLM);
    * ``{"pattern": "vertical_slash", "vertical": v, "slash": s}``: as ``vertical_slash`` (budgets
      raised to 30/50, 30 sink columns and 100 local diagonals forced, estimated from the last
      ``last_q`` queries);
    * ``{"pattern": "block_sparse", "k": n}``: as ``minference_block(k=n, block=block)``.

    ``key_padding_mask [B, Nk]`` (True = real token): padded positions never influence the choice.
    """
    bsz, hq, _, nq, nk = check_qk(q, k)
    if len(heads) != hq:
        raise ValueError(f"minference: the config has {len(heads)} heads but q has {hq} query heads")
    dev = q.device
    kind = [h["pattern"] for h in heads]
    param = lambda name, pat: torch.tensor([int(h[name]) if h["pattern"] == pat else 0 for h in heads], device=dev)
    positions = torch.arange(nk, device=dev)
    # A-shape heads: the first `sinks` columns and the `local` nearest diagonals
    vertical = (positions < param("sinks", "a_shape")[:, None]).expand(bsz, hq, nk).clone()
    slash = (positions < param("local", "a_shape")[:, None]).expand(bsz, hq, nk).clone()
    blocks = None
    with torch.no_grad():
        if "vertical_slash" in kind:
            is_vs = torch.tensor([kd == "vertical_slash" for kd in kind], device=dev)
            nv = param("vertical", "vertical_slash").clamp(min=30) * is_vs
            ns = param("slash", "vertical_slash").clamp(min=50) * is_vs
            v_sel, s_sel = select_vertical_slash(q, k, nv, ns, last_q=last_q, key_padding_mask=key_padding_mask)
            vertical |= v_sel
            slash |= s_sel
        if "block_sparse" in kind:
            blocks = select_pooled_topk(
                q, k, param("k", "block_sparse"), block, causal=True, key_padding_mask=key_padding_mask
            )
    return prefill_layout(nq, nk, block, vertical=vertical, slash=slash, blocks=blocks)


def attention_mass(q: Tensor, k: Tensor, layout: Layout, chunk: int = 256) -> Tensor:
    """Mean over batch and queries of the causal attention probability kept by ``layout``, ``[Hq]``.

    Computed from the true (dense causal) attention in query chunks: memory ``O(chunk · Nk)``.
    """
    bsz, hq, nq, dim = q.shape
    nk = k.shape[2]
    kk = expand_kv(k, hq).double()
    off = nk - nq
    total = torch.zeros(bsz, hq, dtype=torch.float64, device=q.device)
    b_idx = torch.arange(bsz, device=q.device).view(-1, 1, 1, 1)
    h_idx = torch.arange(hq, device=q.device).view(1, -1, 1, 1)
    kv_idx = torch.arange(nk, device=q.device).view(1, 1, 1, -1)
    for r0 in range(0, nq, chunk):
        rows = torch.arange(r0, min(r0 + chunk, nq), device=q.device).view(1, 1, -1, 1)
        logits = torch.matmul(q[:, :, r0 : r0 + chunk].double(), kk.transpose(-1, -2)) / math.sqrt(dim)
        logits = logits.masked_fill(kv_idx > rows + off, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        kept = layout.contains(b_idx, h_idx, rows, kv_idx)
        total += (probs * kept).sum(dim=(2, 3))
    return (total / nq).mean(0)


def _causal_density(layout: Layout, nq: int, nk: int) -> Tensor:
    """Per-head fraction of the causal pairs a layout computes, ``[H]`` (mean over batch)."""
    causal_pairs = int((torch.arange(nq) + (nk - nq) + 1).clamp(min=0, max=nk).sum())
    return layout.pair_counts().sum(-1).double().mean(0) / causal_pairs


def default_candidates(nk: int, budget: float, block: int = 64) -> list[dict]:
    """A-shape, vertical-slash and block-sparse sizes around a causal density ``budget``.

    An average causal row holds about ``nk/2`` keys, so a budget ``b`` is about ``t = b·nk/2`` keys
    per query. Sizes span 0.4–1.6 t; the search keeps those whose measured density fits.
    """
    t = max(1.0, budget * nk / 2)
    out: list[dict] = []
    for f in (0.4, 0.6, 0.8, 1.0, 1.3, 1.6):
        keys = max(1, int(t * f))
        sinks = min(64, max(1, keys // 8))
        out.append({"pattern": "a_shape", "sinks": sinks, "local": max(1, keys - sinks)})
        for share in (0.25, 0.5):
            out.append(
                {
                    "pattern": "vertical_slash",
                    "vertical": max(1, int(2 * keys * share)),
                    "slash": max(1, int(2 * keys * (1 - share))),
                }
            )
        out.append({"pattern": "block_sparse", "k": max(1, round(keys / block))})
    unique = []
    for c in out:
        if c not in unique:
            unique.append(c)
    return unique


def search_minference_config(
    q: Union[Tensor, Sequence[Tensor]],
    k: Union[Tensor, Sequence[Tensor]],
    budget: float,
    *,
    candidates: Optional[Sequence[dict]] = None,
    block: int = 64,
    last_q: int = 64,
    chunk: int = 256,
) -> dict:
    """Offline per-head pattern search (MInference §3.2) on one sample per layer.

    ``q [B, Hq, N, D]`` / ``k [B, Hkv, N, D]``, or sequences of them (one per layer). For every
    candidate head pattern (default :func:`default_candidates`) and every head, measure the causal
    density and the true attention mass kept (:func:`attention_mass`); each head gets the candidate
    with the most mass among those with density ``<= budget`` (ties: the earlier candidate).
    MInference sizes candidates by kernel FLOPs; here the budget is the fraction of causal pairs.
    Returns a config dict (see :func:`validate_minference_config`) with per-head ``mass``/``density``.
    """
    check_float("search_minference_config", "budget", budget, 0.0, 1.0, low_open=True)
    check_int("search_minference_config", "block", block, 1)
    check_int("search_minference_config", "last_q", last_q, 1)
    qs = [q] if isinstance(q, Tensor) else list(q)
    ks = [k] if isinstance(k, Tensor) else list(k)
    if len(qs) != len(ks) or not qs:
        raise ValueError(
            f"search_minference_config: q and k must hold the same number (>= 1) of layers, got {len(qs)} and {len(ks)}"
        )
    layers = []
    for lq, lk in zip(qs, ks):
        _, hq, _, nq, nk = check_qk(lq, lk)
        cands = default_candidates(nk, budget, block) if candidates is None else list(candidates)
        for c in cands:
            _validate_head(c, "candidate")
        best: list[Optional[dict]] = [None] * hq
        for cand in cands:
            layout = minference_heads_layout(lq, lk, [cand] * hq, block=block, last_q=last_q)
            density = _causal_density(layout, nq, nk)
            mass = attention_mass(lq, lk, layout, chunk)
            for h in range(hq):
                if density[h] <= budget + 1e-12 and (best[h] is None or mass[h] > best[h]["mass"]):
                    best[h] = dict(cand, mass=float(mass[h]), density=float(density[h]))
        missing = [h for h in range(hq) if best[h] is None]
        if missing:
            raise ValueError(
                f"search_minference_config: no candidate fits budget={budget} for heads {missing}; "
                "raise the budget or pass smaller candidates"
            )
        layers.append(best)
    return {
        "format": CONFIG_FORMAT,
        "version": CONFIG_VERSION,
        "block": block,
        "last_q": last_q,
        "budget": budget,
        "layers": layers,
    }


# ---------------------------------------------------------------------------------------------
# JSON


def _validate_head(head: Any, where: str) -> None:
    if not isinstance(head, dict):
        raise ValueError(f"minference config: {where} must be an object, got {type(head).__name__}")
    kind = head.get("pattern")
    if kind not in HEAD_PATTERNS:
        raise ValueError(f"minference config: {where} has pattern {kind!r}; expected one of {sorted(HEAD_PATTERNS)}")
    for name, low in HEAD_PATTERNS[kind].items():
        int_at_least(f"minference config: {where} ({kind}) {name}", head.get(name), low)


def validate_minference_config(config: Any) -> dict:
    """Check a config dict; returns it. Raises ``ValueError`` naming the first problem.

    Format: ``{"format": "spattn-minference-config", "version": 1, "block": 64, "last_q": 64,
    "layers": [[head, ...], ...]}`` with one head dict per query head (see
    :func:`minference_heads_layout`); extra keys (``budget``, ``mass``, ``density``) are kept.
    """
    if not isinstance(config, dict):
        raise ValueError(f"minference config must be a JSON object, got {type(config).__name__}")
    if config.get("format") != CONFIG_FORMAT:
        raise ValueError(f"minference config: 'format' must be {CONFIG_FORMAT!r}, got {config.get('format')!r}")
    if config.get("version") != CONFIG_VERSION:
        raise ValueError(
            f"minference config: unsupported version {config.get('version')!r} (expected {CONFIG_VERSION})"
        )
    for name in ("block", "last_q"):
        int_at_least(f"minference config: {name!r}", config.get(name))
    layers = config.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ValueError("minference config: 'layers' must be a non-empty list (one list of heads per layer)")
    for li, heads in enumerate(layers):
        if not isinstance(heads, list) or not heads:
            raise ValueError(f"minference config: layer {li} must be a non-empty list of head patterns")
        for hi, head in enumerate(heads):
            _validate_head(head, f"layer {li} head {hi}")
    return config


def save_minference_config(config: dict, path: Union[str, os.PathLike]) -> None:
    """Validate and write a config as JSON."""
    validate_minference_config(config)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=1)


def load_minference_config(path: Union[str, os.PathLike]) -> dict:
    """Read and validate a config written by :func:`save_minference_config`."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"minference: config must be a path to a JSON file, got {type(path).__name__}")
    if not os.path.isfile(path):
        raise ValueError(f"minference: config file {os.fspath(path)!r} does not exist")
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"minference: config file {os.fspath(path)!r} is not valid JSON: {err}") from None
    return validate_minference_config(config)


@register(
    "minference",
    kind="dynamic",
    description="MInference: per-head A-shape / vertical-slash / block-sparse from an offline search (JSON)",
    paper="Jiang et al. 2024, MInference 1.0 (NeurIPS 2024)",
)
class MInference(PaddedPattern):
    """MInference with per-head patterns read from a JSON config (:func:`search_minference_config`).

    ``layer`` picks which layer's heads of the file to use. Causal only.
    """

    name = "minference"
    content_based = True

    def __init__(self, config: str = "minference.json", layer: int = 0):
        check_int("minference", "layer", layer, 0)
        cfg = load_minference_config(config)
        if layer >= len(cfg["layers"]):
            raise ValueError(f"minference: layer={layer} but the config has {len(cfg['layers'])} layers")
        self.config, self.layer = config, layer
        self._heads = cfg["layers"][layer]
        self._block, self._last_q = cfg["block"], cfg["last_q"]

    def layout(self, q: Tensor, k: Tensor, causal: bool = False, key_padding_mask: Optional[Tensor] = None) -> Layout:
        check_qk(q, k)
        require_causal("minference", causal)
        return minference_heads_layout(
            q, k, self._heads, block=self._block, last_q=self._last_q, key_padding_mask=key_padding_mask
        )
