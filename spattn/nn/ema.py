"""Multi-dimensional damped EMA of Mega (Ma et al., ICLR 2023), the state space of SeqBoat.

Per channel ``d`` and EMA dimension ``n`` (``ndim`` of them): ``p = sigmoid(delta)``,
``a = sigmoid(alpha)``, ``q = 1 - p a`` (damping), and the recurrence

    h_t[d, n] = p[d, n] beta[d, n] x_t[d] + q[d, n] h_{t-1}[d, n],
    y_t[d]    = sum_n gamma[d, n] / sqrt(ndim) h_t[d, n] + omega[d] x_t[d],

which is a causal convolution with kernel ``K_d[l] = sum_n gamma/sqrt(N) p beta q^l``, computed
with FFTs in ``O(N log N)``. Bidirectional (non-causal) use adds a second, independently
parameterised kernel applied backwards in time: ``y_t += sum_{s >= t} K'_d[s - t] x_s``.
``x [B, N, D]`` -> ``[B, N, D]``; padded positions (``padding_mask`` False) contribute nothing.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .._checks import int_at_least
from .attention import check_sequence

__all__ = ["MultiHeadEMA"]


def _fft_causal_conv(x: Tensor, kernel: Tensor) -> Tensor:
    """``y[b, d, t] = sum_{s <= t} kernel[d, t - s] x[b, d, s]`` for ``x [B, D, N]``, ``kernel [D, N]``."""
    n = x.shape[-1]
    xf = torch.fft.rfft(x, n=2 * n)
    kf = torch.fft.rfft(kernel, n=2 * n)
    return torch.fft.irfft(xf * kf, n=2 * n)[..., :n]


class MultiHeadEMA(nn.Module):
    """Mega's multi-dimensional damped EMA over ``dim`` channels with ``ndim`` EMA dimensions each."""

    def __init__(self, dim: int, ndim: int = 16, bidirectional: bool = False):
        super().__init__()
        for name, val in (("dim", dim), ("ndim", ndim)):
            int_at_least(f"MultiHeadEMA: {name}", val)
        if not isinstance(bidirectional, bool):
            raise TypeError(f"MultiHeadEMA: bidirectional must be a bool, got {bidirectional!r}")
        self.dim, self.ndim, self.bidirectional = dim, ndim, bidirectional
        kdim = 2 * dim if bidirectional else dim
        self.delta = nn.Parameter(torch.empty(kdim, ndim, 1))
        self.alpha = nn.Parameter(torch.empty(kdim, ndim, 1))
        self.beta = nn.Parameter(torch.empty(kdim, ndim, 1))
        self.gamma = nn.Parameter(torch.empty(kdim, ndim))
        self.omega = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.trunc_normal_(self.delta, std=0.2, a=-0.4, b=0.4)
            nn.init.trunc_normal_(self.alpha, std=0.2, a=-0.4, b=0.4)
            signs = torch.ones(self.ndim, 1)
            signs[1::2] = -1.0  # alternating +-1 expansion (Mega's stable initialisation)
            nn.init.trunc_normal_(self.beta, std=0.02, a=-0.04, b=0.04)
            self.beta.add_(signs)
            nn.init.trunc_normal_(self.gamma, std=1.0, a=-2.0, b=2.0)
            nn.init.trunc_normal_(self.omega, std=1.0, a=-2.0, b=2.0)

    def coefficients(self) -> tuple[Tensor, Tensor]:
        """``(p, q)`` each ``[K, ndim, 1]`` (K = dim, or 2 dim when bidirectional)."""
        p = torch.sigmoid(self.delta)
        return p, 1.0 - p * torch.sigmoid(self.alpha)

    def kernel(self, length: int) -> Tensor:
        """``[K, length]``: ``K_d[l] = sum_n gamma_dn / sqrt(ndim) p_dn beta_dn q_dn^l``."""
        p, q = self.coefficients()
        powers = torch.exp(torch.arange(length, device=p.device, dtype=p.dtype).view(1, 1, -1) * torch.log(q))
        return torch.einsum("dnl,dn->dl", p * self.beta * powers, self.gamma / math.sqrt(self.ndim))

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """``x [B, N, dim]``, ``padding_mask`` bool ``[B, N]`` (True = real) -> ``[B, N, dim]``."""
        check_sequence("MultiHeadEMA", x, self.dim)
        if padding_mask is not None:
            m = padding_mask
            if not isinstance(m, Tensor) or m.dtype != torch.bool or tuple(m.shape) != tuple(x.shape[:2]):
                got = f"{m.dtype} {tuple(m.shape)}" if isinstance(m, Tensor) else type(m).__name__
                raise ValueError(
                    f"MultiHeadEMA: padding_mask must be a bool tensor [B, N] = {tuple(x.shape[:2])}, got {got}"
                )
        B, N, D = x.shape
        residual = x * self.omega
        if padding_mask is not None:
            x = x * padding_mask.unsqueeze(-1).to(x.dtype)
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32
        xt = x.transpose(1, 2).to(ct)  # [B, D, N]
        k = self.kernel(N).to(ct)
        y = _fft_causal_conv(xt, k[:D])
        if self.bidirectional:
            y = y + _fft_causal_conv(xt.flip(-1), k[D:]).flip(-1)
        return y.transpose(1, 2).to(x.dtype) + residual

    def recurrent(self, x: Tensor, state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """The causal recurrence token by token (decoding): ``x [B, N, dim]``, ``state [B, dim, ndim]``.

        Returns ``(y [B, N, dim], state after the last token)``; equals :meth:`forward` when causal.
        """
        if self.bidirectional:
            raise ValueError("MultiHeadEMA: a bidirectional EMA has no recurrent (decoding) form")
        check_sequence("MultiHeadEMA", x, self.dim)
        if state is not None and (
            not isinstance(state, Tensor) or tuple(state.shape) != (x.shape[0], self.dim, self.ndim)
        ):
            got = tuple(state.shape) if isinstance(state, Tensor) else type(state).__name__
            raise ValueError(
                f"MultiHeadEMA: state must have shape [B, dim, ndim] = {(x.shape[0], self.dim, self.ndim)}, got {got}"
            )
        p, q = self.coefficients()
        pb, q = (p * self.beta).squeeze(-1), q.squeeze(-1)  # [D, n]
        h = x.new_zeros(x.shape[0], self.dim, self.ndim) if state is None else state
        ys = []
        for t in range(x.shape[1]):
            h = pb * x[:, t, :, None] + q * h
            ys.append((h * self.gamma).sum(-1) / math.sqrt(self.ndim) + self.omega * x[:, t])
        return torch.stack(ys, 1), h
