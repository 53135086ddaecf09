"""Approximations and hybrids: linear attention family, low-rank, Combiner, sparse + linear."""

from . import combiner, drsformer, linear, lowrank, mixed  # noqa: F401  (register the approximations)
from .base import ApproxAttention, AttentionLayer
from .combiner import Combiner
from .drsformer import DRSformerTopK
from .gla import GatedLinearAttention, LightningAttention
from .linear import LinearAttention, Performer, PerformerState
from .lowrank import Linformer, Nystromformer
from .mixed import SLA, Scatterbrain
from .sea import SEA
from .soft import SOFT

__all__ = [
    "ApproxAttention",
    "AttentionLayer",
    "LinearAttention",
    "Performer",
    "PerformerState",
    "LightningAttention",
    "GatedLinearAttention",
    "SOFT",
    "Linformer",
    "Nystromformer",
    "Combiner",
    "Scatterbrain",
    "SLA",
    "SEA",
    "DRSformerTopK",
]
