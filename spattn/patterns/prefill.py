"""Prefill-time dynamic block-sparse selectors for LLMs (training-free), one module per method.

* :mod:`.minference` — MInference 1.0 (Jiang et al. 2024): ``vertical_slash``, ``minference_block``
  and ``minference(config=...)`` (per-head patterns from the offline search in :mod:`.minference_config`).
* :mod:`.xattention` — XAttention (Xu et al. 2025): ``xattention``.
* :mod:`.flexprefill` — FlexPrefill (Lai et al. 2025): ``flexprefill``.

Importing this module registers them all.
"""

from __future__ import annotations

from .flexprefill import FlexPrefill
from .minference import MInferenceBlock, VerticalSlash
from .xattention import XAttention

__all__ = ["FlexPrefill", "MInferenceBlock", "VerticalSlash", "XAttention"]
