"""Deprecated module: the prefill selectors live in their own modules and are imported from
:mod:`spattn.patterns` -- MInference (``vertical_slash``, ``minference_block``, ``minference`` and its
per-head config search) in :mod:`.minference`, XAttention in :mod:`.xattention`, FlexPrefill in
:mod:`.flexprefill`. The names below are re-exported from the package for old imports.
"""

from . import (  # the package (not a sibling module): patterns/__init__ has imported them all
    CONFIG_FORMAT,
    FlexPrefill,
    MInference,
    MInferenceBlock,
    VerticalSlash,
    XAttention,
    attention_mass,
    default_candidates,
    load_minference_config,
    minference_heads_layout,
    save_minference_config,
    search_minference_config,
    validate_minference_config,
)

__all__ = [
    "FlexPrefill",
    "MInferenceBlock",
    "VerticalSlash",
    "XAttention",
    "MInference",
    "minference_heads_layout",
    "attention_mass",
    "default_candidates",
    "search_minference_config",
    "save_minference_config",
    "load_minference_config",
    "validate_minference_config",
    "CONFIG_FORMAT",
]
