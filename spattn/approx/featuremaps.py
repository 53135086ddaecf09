"""Feature maps of kernelised attention: elu+1 (Katharopoulos et al. 2020) and FAVOR+ (Choromanski et al. 2021).

A feature map phi turns softmax-like attention into ``phi(Q) (phi(K)^T V)``. FAVOR+ uses *positive
orthogonal random features*: with ``x~ = x / d^{1/4}`` and ``W [m, d]`` built from orthogonal blocks,

    phi(x) = m^{-1/2} [exp(w_i . x~ - |x~|^2 / 2)]_{i=1..m},     E[phi(q) . phi(k)] = exp(q . k / sqrt(d)).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["elu_feature_map", "orthogonal_gaussian", "favor_logits", "favor_features", "favor_features_"]


def elu_feature_map(x: Tensor) -> Tensor:
    """``elu(x) + 1 > 0`` (Katharopoulos et al. 2020, eq. 7)."""
    return F.elu(x) + 1.0


def orthogonal_gaussian(
    features: int, dim: int, *, generator: Optional[torch.Generator] = None, scaling: int = 0, dtype=torch.float32
) -> Tensor:
    """Random projection ``W [features, dim]`` of FAVOR+ (``gaussian_orthogonal_random_matrix``).

    Rows come in blocks of ``dim`` exactly orthogonal directions (QR of a Gaussian matrix); the last
    block is truncated. ``scaling=0`` gives each row the norm of an independent Gaussian vector (chi_d),
    so every row is marginally N(0, I) and the estimator stays unbiased; ``scaling=1`` uses ``sqrt(dim)``.
    """
    if scaling not in (0, 1):
        raise ValueError(f"orthogonal_gaussian: scaling must be 0 or 1, got {scaling!r}")
    blocks = []
    for _ in range(-(-features // dim)):
        g = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        qmat, r = torch.linalg.qr(g)
        qmat = qmat * torch.sign(torch.diagonal(r)).unsqueeze(0)  # Haar-distributed, not QR-biased
        blocks.append(qmat.T)
    w = torch.cat(blocks, dim=0)[:features]
    if scaling == 0:
        norms = torch.randn(features, dim, generator=generator, dtype=torch.float64).norm(dim=1)
    else:
        norms = torch.full((features,), math.sqrt(dim), dtype=torch.float64)
    return (norms.unsqueeze(1) * w).to(dtype)


def favor_logits(x: Tensor, projection: Tensor) -> Tensor:
    """``w_i . x~ - |x~|^2 / 2`` for ``x [..., N, d]``, ``projection [m, d]`` -> ``[..., N, m]``."""
    d = x.shape[-1]
    xs = (x * d ** -0.25).reshape(-1, x.shape[-2], d)
    half_sq = -0.5 * (xs * xs).sum(-1, keepdim=True)
    w = projection.to(x.dtype).T.expand(xs.shape[0], d, projection.shape[0])
    return torch.baddbmm(half_sq, xs, w).reshape(*x.shape[:-1], projection.shape[0])  # one [N, m] buffer


def favor_features(logits: Tensor, stabilizer: Tensor, eps: float) -> Tensor:
    """``m^{-1/2} (exp(logits - stabilizer) + eps)``; the stabilizer must be constant where it has to cancel.

    For queries a per-row maximum (it cancels between numerator and denominator of each row); for
    keys one constant per (batch, head), so it scales every key feature alike.
    """
    m = logits.shape[-1]
    return (torch.exp(logits - stabilizer) + eps) * m ** -0.5


def favor_features_(logits: Tensor, stabilizer: Tensor, eps: float) -> Tensor:
    """:func:`favor_features` computed in place in ``logits`` when no gradient is recorded (inference
    saves three ``[N, m]`` temporaries); otherwise out of place."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return favor_features(logits, stabilizer, eps)
    return logits.sub_(stabilizer).exp_().add_(eps).mul_(logits.shape[-1] ** -0.5)
