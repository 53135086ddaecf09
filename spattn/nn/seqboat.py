"""SeqBoat: Sparse Modular Activation of a GAU over a damped-EMA state (Ren et al., NeurIPS 2023).

For ``x [B, N, dim]`` (pre-norm by default)::

    mx = SiLU(EMA(LN(x)))                                   Mega multi-dimensional damped EMA
    u, hx = split(Linear(dim, 2 + dim)(mx))                 router logits and the base branch
    px = softmax(u / T), T = exp(t) learnable               tempered 2-way router
    p, choice = max(px); act = (choice == 1) & real         which tokens activate the GAU
    mx_c, pos_c = compress(mx, pos; act)                    activated tokens packed, ORIGINAL positions kept
    z, r, v = split(SiLU(Linear(dim, zdim + 2 hdim)(mx_c)));  q = z g0 + b0;  k = z g1 + b1
    h_c = local attention (exact window w over the compressed sequence, bias by original positions)
    h = extract(Linear(hdim, dim)(h_c * r)) * (p * act)      zeros for inactive tokens; p is the
                                                            router's ONLY gradient path
    out = SiLU(hx + h + x)                                  (post-norm instead when prenorm=False)

The window runs over *activated* tokens, so in original positions the span is unbounded; cost is
``O(N log N)`` for the EMA (FFT) plus ``O(N_act * w)`` for attention. After each forward the
layer reports ``activation_rate`` (fraction of real tokens that activated the GAU) and
``active`` (bool ``[B, N]``). Causal: causal EMA, per-token router, causal window, so output ``i``
depends on tokens ``<= i`` only.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import int_at_least
from ..approx.base import AttentionLayer
from ..registry import register
from .ema import MultiHeadEMA
from .gau import ATTENTION_FUNCTIONS, RelativeBias, compress, extract, local_attention

__all__ = ["SeqBoat"]


@register(
    "seqboat",
    kind="layer",
    description="SeqBoat: EMA state + tempered router activating a local-window GAU on the compressed sequence",
    paper="Ren et al. 2023, Sparse Modular Activation for Efficient Sequence Modeling",
)
class SeqBoat(AttentionLayer):
    """``seqboat(window=256, zdim=96, hdim=None, ndim=16, attn_fn="softmax", max_positions=None,
    init_temp_scale=1.0, prenorm=True, dropout=0.0)``; ``dim``, ``causal``, ``max_len`` come from
    :class:`spattn.nn.Attention`. ``hdim`` defaults to ``2 * dim`` and ``max_positions`` (relative
    bias range) to ``max_len`` or 1024, as in the released standalone model."""

    name = "seqboat"

    def __init__(
        self,
        dim: Optional[int] = None,
        window: int = 256,
        zdim: int = 96,
        hdim: Optional[int] = None,
        ndim: int = 16,
        attn_fn: str = "softmax",
        max_positions: Optional[int] = None,
        init_temp_scale: float = 1.0,
        prenorm: bool = True,
        dropout: float = 0.0,
        causal: bool = False,
        max_len: Optional[int] = None,
    ):
        super().__init__()
        if dim is None:
            raise ValueError("seqboat: dim is required (spattn.nn.Attention passes it)")
        int_at_least("seqboat: dim", dim)
        int_at_least("seqboat: window", window)
        int_at_least("seqboat: zdim", zdim)
        int_at_least("seqboat: ndim", ndim)
        hdim = 2 * dim if hdim is None else hdim
        int_at_least("seqboat: hdim", hdim)
        max_positions = (max_len or 1024) if max_positions is None else max_positions
        int_at_least("seqboat: max_positions", max_positions)
        if attn_fn not in ATTENTION_FUNCTIONS:
            raise ValueError(f"seqboat: attn_fn must be one of {ATTENTION_FUNCTIONS}, got {attn_fn!r}")
        if (
            isinstance(init_temp_scale, bool)
            or not isinstance(init_temp_scale, (int, float))
            or not math.isfinite(init_temp_scale)
            or init_temp_scale <= 0
        ):
            raise ValueError(f"seqboat: init_temp_scale must be a positive finite number, got {init_temp_scale!r}")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"seqboat: dropout must lie in [0, 1), got {dropout!r}")
        if not isinstance(causal, bool) or not isinstance(prenorm, bool):
            raise TypeError("seqboat: causal and prenorm must be bools")
        self.dim, self.window, self.zdim, self.hdim, self.ndim = dim, window, zdim, hdim, ndim
        self.attn_fn, self.max_positions, self.init_temp_scale = attn_fn, max_positions, init_temp_scale
        self.prenorm, self.dropout, self.causal = prenorm, dropout, causal

        self.norm = nn.LayerNorm(dim)
        self.ema = MultiHeadEMA(dim, ndim, bidirectional=not causal)
        self.hx_proj = nn.Linear(dim, 2 + dim)
        self.log_temp = nn.Parameter(torch.tensor(math.log(init_temp_scale * math.sqrt(dim))))
        self.mx_proj = nn.Linear(dim, zdim + 2 * hdim)
        self.gamma = nn.Parameter(torch.empty(2, zdim))
        self.beta = nn.Parameter(torch.zeros(2, zdim))
        self.h_proj = nn.Linear(hdim, dim)
        self.rel_bias = RelativeBias(max_positions)
        self.drop = nn.Dropout(dropout)
        for lin in (self.hx_proj, self.mx_proj, self.h_proj):
            nn.init.trunc_normal_(lin.weight, std=0.02, a=-0.04, b=0.04)
            nn.init.zeros_(lin.bias)
        nn.init.trunc_normal_(self.gamma, std=0.02, a=-0.04, b=0.04)
        self.activation_rate: Tensor = torch.zeros(())
        self.active: Optional[Tensor] = None

    def route(self, mx: Tensor, real: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(hx [B, N, dim], act bool [B, N], gate [B, N])``: gate = max router probability on activated tokens."""
        u, hx = torch.split(self.hx_proj(mx), [2, self.dim], dim=-1)
        ct = torch.float64 if u.dtype == torch.float64 else torch.float32  # router in >= fp32
        px = torch.softmax(u.to(ct) / self.log_temp.exp().to(ct), dim=-1).to(mx.dtype)
        p, choice = px.max(-1)
        act = (choice == 1) & real
        return hx, act, p * act.to(p.dtype)

    def gau(self, mx_c: Tensor, valid: Tensor, pos: Tensor) -> Tensor:
        """The GAU on the compressed sequence ``[B, L, dim]`` -> ``[B, L, dim]``."""
        z, r, v = torch.split(F.silu(self.mx_proj(mx_c)), [self.zdim, self.hdim, self.hdim], dim=-1)
        zz = z.unsqueeze(-2) * self.gamma + self.beta
        q, k = zz.unbind(-2)
        if self.attn_fn == "softmax":
            q = q * self.zdim**-0.5
        else:
            q = q / (self.window if self.causal else 2 * self.window)
        h = local_attention(q, k, self.drop(v), valid, pos, self.rel_bias, self.window, self.causal, self.attn_fn)
        return self.h_proj(h * r)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """``x [B, N, dim]``, ``key_padding_mask`` bool ``[B, N]`` (True = real) -> ``[B, N, dim]``."""
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(
                f"seqboat: x must have shape [B, N, {self.dim}], got "
                f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
            )
        B, N, _ = x.shape
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
                raise TypeError("seqboat: key_padding_mask must be a bool tensor [B, N] (True = real token)")
            if tuple(key_padding_mask.shape) != (B, N):
                raise ValueError(
                    f"seqboat: key_padding_mask must have shape {(B, N)}, got {tuple(key_padding_mask.shape)}"
                )
            real = key_padding_mask
        else:
            real = torch.ones(B, N, dtype=torch.bool, device=x.device)
        residual = x
        h_in = self.norm(x) if self.prenorm else x
        mx = self.drop(F.silu(self.ema(h_in, real)))
        hx, act, gate = self.route(mx, real)
        slot = act.long() * act.long().cumsum(1)  # 1-based slot of each activated token, 0 otherwise
        length = int(act.sum(1).max()) if N else 0
        out_h = torch.zeros_like(x)
        if length > 0:
            mx_c = compress(mx, slot, length)
            pos_c = compress(torch.arange(N, device=x.device).expand(B, N), slot, length)
            valid = torch.arange(length, device=x.device) < act.sum(1, keepdim=True)
            h = self.gau(mx_c, valid, pos_c)
            out_h = extract(h, slot) * gate.unsqueeze(-1)
        if self.causal:
            out = F.silu(self.drop(hx + out_h) + residual)
        else:
            out = F.silu(hx + self.drop(out_h) + residual)
        if not self.prenorm:
            out = self.norm(out)
        self.active = act.detach()
        self.activation_rate = (act.sum() / real.sum().clamp(min=1)).detach().float()
        return out
