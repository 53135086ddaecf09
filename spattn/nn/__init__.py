"""Modules: attention layers running any registered mechanism."""

from . import routing, seqboat, sqa  # noqa: F401  (register layer-level mechanisms)
from .attention import Attention, build_mechanism

__all__ = ["Attention", "build_mechanism"]
