"""Landmarks by segment means (Nyströmformer, Xiong et al. 2021; SOFT's pooling variant).

The sequence is cut into ``ceil(N / s)`` consecutive segments of ``s = ceil(N / m)`` tokens (the last
one may be shorter) and each landmark is the mean of the *real* tokens of its segment.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["segment_means"]


def segment_means(x: Tensor, landmarks: int, key_padding_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``x [B, H, N, d]`` -> ``(means [B, H, S, d], valid [B, 1, S] bool)`` with ``S <= landmarks`` segments.

    ``key_padding_mask [B, N]`` (True = real) excludes padded tokens; a segment without a real token
    gets a zero landmark and ``valid = False`` (callers drop it).
    """
    B, H, N, d = x.shape
    seg = -(-N // landmarks)
    count = -(-N // seg)
    pad = count * seg - N
    real = (
        torch.ones(B, N, dtype=x.dtype, device=x.device) if key_padding_mask is None else key_padding_mask.to(x.dtype)
    )
    xs = F.pad(x * real[:, None, :, None], (0, 0, 0, pad)).reshape(B, H, count, seg, d).sum(3)
    n = F.pad(real, (0, pad)).reshape(B, count, seg).sum(-1)  # [B, S] real tokens per segment
    means = xs / n.clamp_min(1.0)[:, None, :, None]
    return means, (n > 0).unsqueeze(1)
