"""spattn: sparse and efficient attention for PyTorch."""

from . import registry
from .layout import Layout
from .patterns import Pattern, pattern

__all__ = ["Layout", "Pattern", "pattern", "mechanisms", "registry"]
__version__ = "0.1.0"


def mechanisms():
    """Every registered mechanism (patterns, approximations, hybrids) with kind, description, paper."""
    return registry.mechanisms()
