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
from torch import Tensor, nn

from .._checks import int_at_least, is_int

__all__ = [
    "elu_feature_map",
    "orthogonal_gaussian",
    "favor_logits",
    "favor_features",
    "favor_features_",
    "FavorProjection",
    "favor_pair",
]


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
    xs = (x * d**-0.25).reshape(-1, x.shape[-2], d)
    half_sq = -0.5 * (xs * xs).sum(-1, keepdim=True)
    w = projection.to(x.dtype).T.expand(xs.shape[0], d, projection.shape[0])
    return torch.baddbmm(half_sq, xs, w).reshape(*x.shape[:-1], projection.shape[0])  # one [N, m] buffer


def favor_features(logits: Tensor, stabilizer: Tensor, eps: float) -> Tensor:
    """``m^{-1/2} (exp(logits - stabilizer) + eps)``; the stabilizer must be constant where it has to cancel.

    For queries a per-row maximum (it cancels between numerator and denominator of each row); for
    keys one constant per (batch, head), so it scales every key feature alike.
    """
    m = logits.shape[-1]
    return (torch.exp(logits - stabilizer) + eps) * m**-0.5


def favor_features_(logits: Tensor, stabilizer: Tensor, eps: float) -> Tensor:
    """:func:`favor_features` computed in place in ``logits`` when no gradient is recorded (inference
    saves three ``[N, m]`` temporaries); otherwise out of place."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return favor_features(logits, stabilizer, eps)
    return logits.sub_(stabilizer).exp_().add_(eps).mul_(logits.shape[-1] ** -0.5)


class FavorProjection(nn.Module):
    """The FAVOR+ random projection ``W [features, D]`` (orthogonal blocks), drawn from ``seed``.

    Drawn at the first forward for the head size seen (a buffer, not a parameter). With
    ``redraw=n`` a new projection is drawn every ``n`` training-mode calls (Performer's feature
    redrawing); ``redraw=None`` keeps it fixed.
    """

    def __init__(self, features: int, seed: int = 0, redraw: Optional[int] = None, owner: str = "favor"):
        super().__init__()
        int_at_least(f"{owner}: features", features)
        if redraw is not None:
            int_at_least(f"{owner}: redraw", redraw)
        if not is_int(seed):
            raise ValueError(f"{owner}: seed must be an int, got {seed!r}")
        self.features, self.seed, self.redraw = features, seed, redraw
        self.register_buffer("weight", torch.empty(0), persistent=True)
        self.draws = 0
        self._calls = 0

    def _draw(self, dim: int, device) -> None:
        gen = torch.Generator().manual_seed(self.seed + 7919 * self.draws)
        self.weight = orthogonal_gaussian(self.features, dim, generator=gen).to(device)
        self.draws += 1

    def forward(self, dim: int, device) -> Tensor:
        if self.weight.numel() == 0 or self.weight.shape[1] != dim:
            self._draw(dim, device)
        elif self.training and self.redraw is not None and self._calls and self._calls % self.redraw == 0:
            self._draw(dim, device)
        if self.training:
            self._calls += 1
        return self.weight


def favor_pair(q: Tensor, k: Tensor, projection: Tensor, key_real: Optional[Tensor] = None):
    """Stabilised positive random features of queries and keys (Choromanski et al. 2021).

    ``q [B, H, Nq, D]``, ``k [B, H, Nk, D]``, ``projection [M, D]``, ``key_real`` bool ``[B, Nk]``.
    Returns ``(phi_q [B,H,Nq,M], phi_k [B,H,Nk,M], log_scale [B,H,Nq])`` such that
    ``exp(log_scale_i) * phi_q_i . phi_k_j`` is the unbiased estimate of ``exp(q_i . k_j / sqrt(D))``.
    Padded keys get zero features. Stabilisers are detached: they cancel exactly through ``log_scale``.
    """
    m = projection.shape[0]
    lq = favor_logits(q, projection)
    lk = favor_logits(k, projection)
    stab_q = lq.detach().amax(-1, keepdim=True)
    lk_m = lk.detach() if key_real is None else lk.detach().masked_fill(~key_real[:, None, :, None], float("-inf"))
    stab_k = lk_m.amax(dim=(-2, -1), keepdim=True)
    stab_k = torch.where(torch.isfinite(stab_k), stab_k, torch.zeros_like(stab_k))
    phi_q = torch.exp(lq - stab_q) * m**-0.5
    phi_k = torch.exp(lk - stab_k) * m**-0.5
    if key_real is not None:
        phi_k = torch.where(key_real[:, None, :, None], phi_k, torch.zeros((), dtype=phi_k.dtype, device=phi_k.device))
    return phi_q, phi_k, (stab_q + stab_k).squeeze(-1)
