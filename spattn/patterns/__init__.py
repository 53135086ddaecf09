"""Patterns: which (query, key) pairs are computed. ``spattn.pattern(spec)`` builds one by name."""

from __future__ import annotations

from typing import Any

from .. import registry
from .base import Pattern
from .biformer import BiFormer
from .decode import DoubleSparsity, Quest, TidalDecode
from .flexprefill import FlexPrefill
from .minference import (  # noqa: F401  (the per-head config tools, re-exported by the deprecated .prefill)
    CONFIG_FORMAT,
    MInference,
    MInferenceBlock,
    VerticalSlash,
    attention_mass,
    default_candidates,
    load_minference_config,
    minference_heads_layout,
    save_minference_config,
    search_minference_config,
    validate_minference_config,
)
from .neighborhood import Neighborhood
from .routing import Routing
from .seer import SeerGate
from .static import AShape, Axial, BigBird, Dense, DilatedWindow, Fixed, GlobalTokens, Strided, Window
from .topk import BlockMass, BlockTopK, TopK, TopP
from .xattention import XAttention

__all__ = [
    "Pattern",
    "pattern",
    "Dense",
    "Window",
    "DilatedWindow",
    "GlobalTokens",
    "BigBird",
    "Strided",
    "Fixed",
    "Axial",
    "AShape",
    "Neighborhood",
    "Routing",
    "TopK",
    "TopP",
    "BlockTopK",
    "BlockMass",
    "BiFormer",
    "VerticalSlash",
    "MInferenceBlock",
    "MInference",
    "XAttention",
    "FlexPrefill",
    "SeerGate",
    "Quest",
    "DoubleSparsity",
    "TidalDecode",
]


def pattern(spec: "str | Pattern", /, **kwargs: Any) -> Pattern:
    """Build a pattern: ``pattern("window", size=256)`` or ``pattern("window(size=256)")``.

    A :class:`Pattern` instance is returned unchanged (keyword overrides are then an error).
    """
    if isinstance(spec, Pattern):
        if kwargs:
            raise ValueError("keyword parameters cannot be combined with a Pattern instance")
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"pattern must be a spec string or a Pattern, got {type(spec).__name__}")
    obj = registry.build(spec, **kwargs)
    if not isinstance(obj, Pattern):
        name = registry.parse_spec(spec)[0]
        raise ValueError(
            f"{name!r} is a {registry.lookup(name).kind} mechanism, not a pattern of (query, key) pairs; "
            "use it through spattn.nn.Attention(attention=...)"
        )
    return obj
