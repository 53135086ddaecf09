"""spattn on torch.distributed: sequence-parallel attention and DDP training helpers.

Sits beside ``nn``/``models`` in the layer order (imports layout, patterns, kernels, functional,
nn); nothing lower imports it. Works with gloo (CPU) and NCCL (CUDA) process groups.
"""

from ._comm import CommStats, record_comm
from .sequence import SUPPORTED_SELECTORS, sequence_parallel_attention

__all__ = ["sequence_parallel_attention", "record_comm", "CommStats", "SUPPORTED_SELECTORS"]
