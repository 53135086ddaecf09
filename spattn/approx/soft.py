"""``soft``: Softmax-free attention with a Gaussian kernel (Lu et al., "SOFT: Softmax-free Transformer
with Linear Complexity", NeurIPS 2021, arXiv 2110.11945).

With *tied* queries and keys (the paper's Q = K; the key input is ignored) and ``q~ = q / d^{1/4}``,

    S_ij = exp(-|q~_i - q~_j|^2 / 2),       S ~= S(Q, Q_l) S(Q_l, Q_l)^+ S(Q_l, Q),       out = S V

where ``Q_l [m, d]`` are landmarks pooled from Q (the paper's average-pooling variant; its vision
models use a strided convolution, which needs a 2-D token grid) and the pseudo-inverse is computed
by Newton–Schulz iterations ``A+_{k+1} = 2 A+_k - A+_k A A+_k`` from ``A+_0 = 2 * 0.9 / |A|_inf^2 * A``.
There is no row normalisation. Cost O(N m d + m^3); no causal form. Gradients flow through the
iterations by autograd (the official code uses the analytic gradient of the exact inverse instead).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._checks import int_at_least
from .._heads import expand_kv
from ..registry import register
from .base import ApproxAttention
from .landmarks import segment_means
from .linear_core import check_qkv

__all__ = ["SOFT", "gaussian_kernel", "newton_schulz_pinv"]


def gaussian_kernel(a: Tensor, b: Tensor) -> Tensor:
    """``exp(-|a_i - b_j|^2 / 2)`` for ``a [..., N, d]``, ``b [..., M, d]`` -> ``[..., N, M]``."""
    sq = (a * a).sum(-1, keepdim=True) + (b * b).sum(-1).unsqueeze(-2) - 2.0 * (a @ b.transpose(-1, -2))
    return torch.exp(-0.5 * sq.clamp_min(0.0))


def newton_schulz_pinv(a: Tensor, iters: int = 20) -> Tensor:
    """Pseudo-inverse of symmetric PSD ``a [..., m, m]`` by Newton–Schulz (converges for the scaled start)."""
    norm = a.abs().sum(-1).amax(-1, keepdim=True).unsqueeze(-1)  # max row sum >= spectral norm
    x = a * (2.0 * 0.9 / norm.pow(2))
    for _ in range(iters):
        x = 2.0 * x - x @ a @ x
    return x


@register(
    "soft",
    kind="approximation",
    description="SOFT: softmax-free Gaussian-kernel attention (tied Q=K), pooled landmarks, Newton-Schulz pseudo-inverse",
    paper="Lu et al., SOFT: Softmax-free Transformer with Linear Complexity, NeurIPS 2021 (arXiv 2110.11945)",
)
class SOFT(ApproxAttention):
    """``landmarks`` segment-mean landmarks of the (real) queries; ``iters`` Newton–Schulz steps."""

    name = "soft"
    supports_causal = False

    def __init__(self, landmarks: int = 64, iters: int = 20):
        super().__init__()
        for arg, val in (("landmarks", landmarks), ("iters", iters)):
            int_at_least(f"soft: {arg}", val)
        self.landmarks, self.iters = landmarks, iters

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, key_padding_mask: Optional[Tensor] = None
    ) -> Tensor:
        """``q [B, Hq, N, D]``, ``v [B, Hkv, N, D]`` -> ``[B, Hq, N, D]`` (``k`` is unused: Q = K)."""
        if causal:
            raise ValueError("soft: SOFT has no causal form; use causal=False")
        check_qkv(self.name, q, k, v, key_padding_mask)
        if q.shape[2] != k.shape[2]:
            raise ValueError(
                f"soft: ties queries and keys, so needs as many queries as keys, got {q.shape[2]}, {k.shape[2]}"
            )
        ct = torch.float64 if q.dtype == torch.float64 else torch.float32
        x = q.to(ct) * q.shape[-1] ** -0.25
        v = expand_kv(v, q.shape[1]).to(ct)
        lm, valid = segment_means(x, self.landmarks, key_padding_mask)
        valid = valid.to(ct)  # [B, 1, m]: landmarks of segments without a real token are dropped
        left = gaussian_kernel(x, lm) * valid.unsqueeze(-2)  # S(Q, Q_l) [B, H, N, m]
        right = left.transpose(-1, -2)  # S(Q_l, Q): tied Q = K makes it the transpose
        if key_padding_mask is not None:
            right = right * key_padding_mask[:, None, None, :].to(ct)
        core = gaussian_kernel(lm, lm) * valid.unsqueeze(-1) * valid.unsqueeze(-2)
        out = left @ (newton_schulz_pinv(core, self.iters) @ (right @ v))
        return out.to(q.dtype)
