"""Prefill-time dynamic block-sparse selectors for LLMs (training-free), and MInference's per-head
pattern configuration.

* :mod:`.minference` — MInference 1.0 (Jiang et al. 2024): ``vertical_slash``, ``minference_block``.
* :mod:`.xattention` — XAttention (Xu et al. 2025): ``xattention``.
* :mod:`.flexprefill` — FlexPrefill (Lai et al. 2025): ``flexprefill``.
* here: ``minference(config=path, layer=0)``, per-head patterns chosen offline by
  :func:`search_minference_config` (MInference §3.2 "kernel-aware optimal sparse pattern search":
  per head, among A-shape / vertical-slash / block-sparse candidates within a budget, the one that
  keeps the most true attention mass on a sample), saved to / loaded from JSON.

Importing this module registers them all.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from ..layout import Layout
from ..registry import register
from .base import PaddedPattern, check_float, check_int, check_qk
from .flexprefill import FlexPrefill
from .minference import (
    MInferenceBlock, VerticalSlash, _validate_causal, expand_kv, prefill_layout, select_pooled_topk,
    select_vertical_slash,
)
from .xattention import XAttention

__all__ = [
    "FlexPrefill", "MInferenceBlock", "VerticalSlash", "XAttention", "MInference",
    "minference_heads_layout", "attention_mass", "default_candidates", "search_minference_config",
    "save_minference_config", "load_minference_config", "validate_minference_config", "CONFIG_FORMAT",
]

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


def minference_heads_layout(q: Tensor, k: Tensor, heads: Sequence[dict], *, block: int = 64,
                            last_q: int = 64, key_padding_mask: Optional[Tensor] = None) -> Layout:
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
            blocks = select_pooled_topk(q, k, param("k", "block_sparse"), block, causal=True,
                                        key_padding_mask=key_padding_mask)
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
        logits = torch.matmul(q[:, :, r0: r0 + chunk].double(), kk.transpose(-1, -2)) / math.sqrt(dim)
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
            out.append({"pattern": "vertical_slash", "vertical": max(1, int(2 * keys * share)),
                        "slash": max(1, int(2 * keys * (1 - share)))})
        out.append({"pattern": "block_sparse", "k": max(1, round(keys / block))})
    unique = []
    for c in out:
        if c not in unique:
            unique.append(c)
    return unique


def search_minference_config(q: Union[Tensor, Sequence[Tensor]], k: Union[Tensor, Sequence[Tensor]], budget: float, *,
                             candidates: Optional[Sequence[dict]] = None, block: int = 64, last_q: int = 64,
                             chunk: int = 256) -> dict:
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
        raise ValueError(f"search_minference_config: q and k must hold the same number (>= 1) of layers, got {len(qs)} and {len(ks)}")
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
            raise ValueError(f"search_minference_config: no candidate fits budget={budget} for heads {missing}; "
                             "raise the budget or pass smaller candidates")
        layers.append(best)
    return {"format": CONFIG_FORMAT, "version": CONFIG_VERSION, "block": block, "last_q": last_q,
            "budget": budget, "layers": layers}


# ---------------------------------------------------------------------------------------------
# JSON


def _validate_head(head: Any, where: str) -> None:
    if not isinstance(head, dict):
        raise ValueError(f"minference config: {where} must be an object, got {type(head).__name__}")
    kind = head.get("pattern")
    if kind not in HEAD_PATTERNS:
        raise ValueError(f"minference config: {where} has pattern {kind!r}; expected one of {sorted(HEAD_PATTERNS)}")
    for name, low in HEAD_PATTERNS[kind].items():
        val = head.get(name)
        if isinstance(val, bool) or not isinstance(val, int) or val < low:
            raise ValueError(f"minference config: {where} ({kind}) needs integer {name} >= {low}, got {val!r}")


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
        raise ValueError(f"minference config: unsupported version {config.get('version')!r} (expected {CONFIG_VERSION})")
    for name in ("block", "last_q"):
        val = config.get(name)
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"minference config: {name!r} must be an integer >= 1, got {val!r}")
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


@register("minference", kind="dynamic",
          description="MInference: per-head A-shape / vertical-slash / block-sparse from an offline search (JSON)",
          paper="Jiang et al. 2024, MInference 1.0 (NeurIPS 2024)")
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
        _validate_causal("minference", causal)
        return minference_heads_layout(q, k, self._heads, block=self._block, last_q=self._last_q,
                                       key_padding_mask=key_padding_mask)
