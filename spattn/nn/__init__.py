"""Modules: attention layers running any registered mechanism."""

from . import routing, seqboat, sqa  # noqa: F401  (register layer-level mechanisms)
from .attention import Attention, build_mechanism
from .block import MLP, TransformerBlock
from .routing import RoutingAttention
from .seqboat import SeqBoat
from .sqa import SparseQueryAttention

__all__ = [
    "Attention",
    "build_mechanism",
    "TransformerBlock",
    "MLP",
    "RoutingAttention",
    "SeqBoat",
    "SparseQueryAttention",
]
