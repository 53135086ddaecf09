"""Approximations and hybrids: linear attention family, low-rank, Combiner, sparse + linear."""

from . import combiner, drsformer, linear, lowrank, mixed  # noqa: F401  (register the approximations)
from .base import ApproxAttention, AttentionLayer

__all__ = ["ApproxAttention", "AttentionLayer"]
