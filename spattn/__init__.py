"""spattn: sparse and efficient attention for PyTorch.

A *pattern* picks the (query, key) pairs, a :class:`Layout` records them, a *kernel* computes
softmax attention on them. See ``spattn.attention`` and ``spattn.pattern``.
"""

from . import approx, integrations, kvcache, nn, registry
from .functional import attention
from .layout import Layout
from .selection import ClusterSelection, PageSelection, TokenSelection
from .patterns import Pattern, pattern

__all__ = [
    "Layout",
    "Pattern",
    "TokenSelection",
    "PageSelection",
    "ClusterSelection",
    "attention",
    "pattern",
    "mechanisms",
    "approx",
    "nn",
    "registry",
    "integrations",
    "kvcache",
]
__version__ = "0.1.0"


def mechanisms():
    """Every registered mechanism (patterns, approximations, hybrids) with kind, description, paper."""
    return registry.mechanisms()
