"""Decayed linear attention: ``lightning`` (TransNormerLLM / Lightning Attention-2) and ``gla``.

``lightning``: Qin et al., "TransNormerLLM" (arXiv 2307.14995) and "Lightning Attention-2"
(arXiv 2401.04658): ``O = [(Q K^T) . M] V`` with ``M_ts = lambda_h^(t-s)`` for ``s <= t``, no softmax
and no 1/sqrt(d); ``lambda_h = exp(-slope_h)`` with ALiBi slopes. Computed blockwise: intra-block left
product plus inter-block right product through a decayed ``[d, d]`` state.

``gla``: Yang, Wang, Shen, Panda, Kim, "Gated Linear Attention Transformers with Hardware-Efficient
Training", ICML 2024: ``S_t = Diag(alpha_t) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t`` with
data-dependent gates ``log alpha_t = logsigmoid(W2 W1 k_t + b) / 16`` (low rank 16). The official layer
computes the gates from the layer input x; an :class:`~spattn.approx.base.ApproxAttention` only sees
q, k, v, so the gate projection here reads the key ``k_t`` of the same head (shared across heads).
Chunked form with cumulative gates in fp32 log space (see :mod:`.linear_core`).

Both are causal mechanisms. With ``causal=False`` they run the *bidirectional* extension: a forward
scan plus a backward scan (sequence reversed, gates included) minus the diagonal counted twice, i.e.
``M_ts = lambda^|t-s|`` for lightning. Both RMS-normalise each head's output by default (``norm=True``,
no gain; TransNormerLLM's SRMSNorm, GLA's output RMSNorm), since unnormalised decayed sums grow with
the effective window; the output gates of the original layers need x and belong to the layer.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import int_at_least
from .._heads import expand_kv
from ..registry import register
from .base import ApproxAttention
from .linear_core import check_qkv, chunked_causal, compute_dtype, recurrent_step

__all__ = ["LightningAttention", "GatedLinearAttention", "alibi_slopes", "rms_normalise"]


def alibi_slopes(heads: int) -> Tensor:
    """ALiBi head slopes (Press et al. 2022): ``2^(-8 i / n)`` for a power of two ``n``, interleaved otherwise."""

    def pow2(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if heads & (heads - 1) == 0:
        return torch.tensor(pow2(heads), dtype=torch.float64)
    closest = 2 ** math.floor(math.log2(heads))
    extra = pow2(2 * closest)[0::2][: heads - closest]
    return torch.tensor(pow2(closest) + extra, dtype=torch.float64)


def rms_normalise(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``x / sqrt(mean(x^2) + eps)`` over the last dimension (no learned gain)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _bidirectional(q: Tensor, k: Tensor, v: Tensor, log_decay: Optional[Tensor], chunk: int) -> Tensor:
    """Forward scan + reversed scan - diagonal: every pair (t, s) counted once, decayed by the gates between them."""
    fwd, _ = chunked_causal(q, k, v, log_decay, chunk=chunk)
    g_rev = log_decay.flip(2) if log_decay is not None and log_decay.shape[2] > 1 else log_decay
    bwd, _ = chunked_causal(q.flip(2), k.flip(2), v.flip(2), g_rev, chunk=chunk)
    ct = fwd.dtype
    diag = (q.to(ct) * k.to(ct)).sum(-1, keepdim=True) * v.to(ct)
    return fwd + bwd.flip(2) - diag


class _DecayedAttention(ApproxAttention):
    """Shared forward / prefill / step; subclasses give the feature transform and the log decays."""

    chunk: int
    norm: bool

    def _inputs(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor]):
        """-> (q, k, v, log_decay) with k, v, log_decay repeated to the query heads."""
        raise NotImplementedError

    def _finish(self, out: Tensor, dtype: torch.dtype) -> Tensor:
        return (rms_normalise(out) if self.norm else out).to(dtype)

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, key_padding_mask: Optional[Tensor] = None
    ) -> Tensor:
        """``q [B, Hq, N, D]``, ``k, v [B, Hkv, N, D]`` -> ``[B, Hq, N, D]``."""
        check_qkv(self.name, q, k, v, key_padding_mask, causal)
        if q.shape[2] != k.shape[2]:
            raise ValueError(
                f"{self.name}: needs as many queries as keys (self-attention), got {q.shape[2]} and {k.shape[2]}"
            )
        q2, k2, v2, g = self._inputs(q, k, v, key_padding_mask)
        if causal:
            out, _ = chunked_causal(q2, k2, v2, g, chunk=self.chunk)
        else:
            out = _bidirectional(q2, k2, v2, g, self.chunk)
        return self._finish(out, q.dtype)

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Causal attention over a block continuing from ``state [B, Hq, D, Dv]``; returns ``(out, state)``."""
        check_qkv(self.name, q, k, v, None)
        q2, k2, v2, g = self._inputs(q, k, v, None)
        out, state = chunked_causal(q2, k2, v2, g, chunk=self.chunk, state=state)
        return self._finish(out, q.dtype), state

    def step(self, q_t: Tensor, k_t: Tensor, v_t: Tensor, state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """One token: ``q_t [B, Hq, D]``, ``k_t, v_t [B, Hkv, D]``; returns ``(out [B, Hq, D], state)``."""
        q2, k2, v2, g = self._inputs(q_t.unsqueeze(2), k_t.unsqueeze(2), v_t.unsqueeze(2), None)
        if state is None:
            state = q2.new_zeros(q2.shape[0], q2.shape[1], q2.shape[-1], v2.shape[-1], dtype=compute_dtype(q_t.dtype))
        out, state = recurrent_step(q2[:, :, 0], k2[:, :, 0], v2[:, :, 0], state, None if g is None else g[:, :, 0])
        return self._finish(out, q_t.dtype), state


@register(
    "lightning",
    kind="approximation",
    description="Lightning Attention / TransNormerLLM decayed linear attention (per-head decay), chunked intra/inter",
    paper="Qin et al., Lightning Attention-2 (arXiv 2401.04658); TransNormerLLM (arXiv 2307.14995)",
)
class LightningAttention(_DecayedAttention):
    """Per-head decay ``lambda_h = exp(-slope_h)`` (ALiBi slopes over the query heads; the layer
    factor of TransNormerLLM is 1 for a single layer). ``activation="silu"`` applies SiLU to q, k, v
    as TransNormerLLM's projections do (``"none"`` to skip). Recurrent state ``[B, Hq, D, Dv]``."""

    name = "lightning"

    def __init__(self, chunk: int = 64, activation: str = "silu", norm: bool = True, heads: Optional[int] = None):
        super().__init__()
        self.chunk = int_at_least("lightning: chunk", chunk)
        if activation not in ("silu", "none"):
            raise ValueError(f"lightning: activation must be 'silu' or 'none', got {activation!r}")
        if not isinstance(norm, bool):
            raise TypeError(f"lightning: norm must be a bool, got {norm!r}")
        self.activation, self.norm = activation, norm
        self.heads = None if heads is None else int_at_least("lightning: heads", heads)
        slopes = alibi_slopes(heads) if heads else torch.empty(0, dtype=torch.float64)
        self.register_buffer("log_decay", (-slopes).to(torch.float32))

    def params(self):
        return {"chunk": self.chunk, "activation": self.activation, "norm": self.norm}

    def _inputs(self, q, k, v, key_padding_mask):
        hq = q.shape[1]
        if self.log_decay.numel() == 0:
            self.log_decay = (-alibi_slopes(hq)).to(torch.float32).to(q.device)
        elif self.log_decay.numel() != hq:
            raise ValueError(f"lightning: built for {self.log_decay.numel()} heads, got q with {hq} heads")
        if self.activation == "silu":
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        if key_padding_mask is not None:
            k = k * key_padding_mask[:, None, :, None].to(k.dtype)
        return q, expand_kv(k, hq), expand_kv(v, hq), self.log_decay.view(1, hq, 1, 1)


@register(
    "gla",
    kind="approximation",
    description="gated linear attention: data-dependent low-rank key gates, chunked log-space form, recurrent decoding",
    paper="Yang et al., Gated Linear Attention Transformers with Hardware-Efficient Training, ICML 2024 (arXiv 2312.06635)",
)
class GatedLinearAttention(_DecayedAttention):
    """GLA with ``log alpha_t = logsigmoid(W2 W1 k_t + b) / normalizer`` (rank ``rank``), q scaled by
    ``d^-1/2``. Padded keys are dropped from the recurrence entirely (no contribution, no decay).

    ``head_dim`` (given by :class:`spattn.nn.Attention`) sizes the gate projection. Inside a chunk the
    decayed scores are one matmul of ``q e^G`` and ``k e^-G`` unless the chunk decays by more than
    ``e^-30``, where the exact elementwise form takes over (see :mod:`.linear_core`).
    """

    name = "gla"

    def __init__(
        self,
        rank: int = 16,
        normalizer: float = 16.0,
        chunk: int = 64,
        norm: bool = True,
        head_dim: Optional[int] = None,
    ):
        super().__init__()
        self.rank = int_at_least("gla: rank", rank)
        if (
            isinstance(normalizer, bool)
            or not isinstance(normalizer, (int, float))
            or not math.isfinite(normalizer)
            or normalizer <= 0
        ):
            raise ValueError(f"gla: normalizer must be a positive finite number, got {normalizer!r}")
        self.normalizer = float(normalizer)
        self.chunk = int_at_least("gla: chunk", chunk)
        if not isinstance(norm, bool):
            raise TypeError(f"gla: norm must be a bool, got {norm!r}")
        self.norm = norm
        if head_dim is None:
            raise ValueError(
                "gla: head_dim is required to size the gate projection "
                "(spattn.nn.Attention passes it; or give gla(head_dim=64))"
            )
        self.head_dim = int_at_least("gla: head_dim", head_dim)
        self.gate_down = nn.Linear(head_dim, rank, bias=False)
        self.gate_up = nn.Linear(rank, head_dim, bias=True)

    def params(self):
        return {"rank": self.rank, "normalizer": self.normalizer, "chunk": self.chunk, "norm": self.norm}

    def log_gates(self, k: Tensor) -> Tensor:
        """``log alpha [B, Hkv, N, D]`` (fp32, ``<= 0``) from ``k [B, Hkv, N, D]``."""
        if k.shape[-1] != self.head_dim:
            raise ValueError(f"gla: built for head_dim {self.head_dim}, got {k.shape[-1]}")
        gate = self.gate_up(self.gate_down(k.to(self.gate_down.weight.dtype)))
        return F.logsigmoid(gate.to(compute_dtype(k.dtype))) / self.normalizer

    def _inputs(self, q, k, v, key_padding_mask):
        hq = q.shape[1]
        g = self.log_gates(k)
        if key_padding_mask is not None:
            real = key_padding_mask[:, None, :, None]
            k = k * real.to(k.dtype)
            g = g * real.to(g.dtype)
        return q * q.shape[-1] ** -0.5, expand_kv(k, hq), expand_kv(v, hq), expand_kv(g, hq)
