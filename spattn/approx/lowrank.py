"""Low-rank approximations of softmax attention: ``linformer`` and ``nystrom``.

``linformer``: Wang, Li, Khabsa, Fang, Ma, "Linformer: Self-Attention with Linear Complexity"
(arXiv 2006.04768). Keys and values are projected along the *sequence* by learned ``E, F [k, max_len]``:
``softmax(Q (E K)^T / sqrt(d)) (F V)``, O(N k d).

``nystrom``: Xiong et al., "Nyströmformer: A Nyström-Based Algorithm for Approximating
Self-Attention", AAAI 2021 (arXiv 2102.03902). With segment-mean landmarks ``Q_l, K_l [m, d]``,

    softmax(Q K^T / sqrt(d)) ~= softmax(Q K_l^T) pinv(softmax(Q_l K_l^T)) softmax(Q_l K^T)

(each logit scaled by 1/sqrt(d)), the pseudo-inverse by the paper's 6 iterations of
``Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4`` from ``Z_0 = A^T / (|A|_1 |A|_inf)``, and an
optional depthwise convolution of V along the sequence added as a residual (the official code's
``conv_kernel_size``). Neither has a causal form.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .._checks import int_at_least, is_int
from .._heads import expand_kv
from ..registry import register
from .base import ApproxAttention
from .landmarks import segment_means
from .linear_core import check_qkv

__all__ = ["Linformer", "Nystromformer", "nystrom_pinv", "masked_softmax"]


def masked_softmax(logits: Tensor, keep: Optional[Tensor]) -> Tensor:
    """Softmax over the last dimension restricted to ``keep`` (broadcastable bool); all-masked rows -> 0."""
    if keep is None:
        return torch.softmax(logits, -1)
    logits = logits.masked_fill(~keep, float("-inf"))
    top = logits.amax(-1, keepdim=True)
    e = torch.exp(logits - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
    s = e.sum(-1, keepdim=True)
    return e / torch.where(s > 0, s, torch.ones_like(s))


def nystrom_pinv(a: Tensor, iters: int = 6) -> Tensor:
    """Iterative pseudo-inverse of Nyströmformer for ``a [..., m, m]``; the start is scaled per matrix."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    col = a.abs().sum(-2).amax(-1)[..., None, None]
    row = a.abs().sum(-1).amax(-1)[..., None, None]
    z = a.transpose(-1, -2) / (col * row).clamp_min(torch.finfo(a.dtype).tiny)
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


@register(
    "linformer",
    kind="approximation",
    description="Linformer: learned sequence projections E, F of keys/values to k slots (needs max_len)",
    paper="Wang et al., Linformer: Self-Attention with Linear Complexity, 2020 (arXiv 2006.04768)",
)
class Linformer(ApproxAttention):
    """``E, F [k, max_len]`` shared by the heads of a layer (``share_kv=True``: F = E).

    Inputs shorter than ``max_len`` are zero-padded, which equals using the first N columns of E, F;
    padded and masked keys are zeroed before projecting, so they contribute nothing.
    """

    name = "linformer"
    supports_causal = False

    def __init__(self, k: int = 256, max_len: Optional[int] = None, share_kv: bool = False):
        super().__init__()
        self.k = int_at_least("linformer: k", k)
        if max_len is None:
            raise ValueError(
                "linformer: max_len is required (the projections E, F have max_len columns); "
                "pass Attention(..., max_len=N) or linformer(k=..., max_len=N)"
            )
        self.max_len = int_at_least("linformer: max_len", max_len)
        if self.k > self.max_len:
            raise ValueError(f"linformer: k={k} must be <= max_len={max_len}")
        if not isinstance(share_kv, bool):
            raise TypeError(f"linformer: share_kv must be a bool, got {share_kv!r}")
        self.share_kv = share_kv
        bound = 1.0 / math.sqrt(self.k)
        self.E = nn.Parameter(torch.empty(self.k, self.max_len).uniform_(-bound, bound))
        self.F = None if share_kv else nn.Parameter(torch.empty(self.k, self.max_len).uniform_(-bound, bound))

    def params(self):
        return {"k": self.k, "max_len": self.max_len, "share_kv": self.share_kv}

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, key_padding_mask: Optional[Tensor] = None
    ) -> Tensor:
        """``q [B, Hq, Nq, D]``, ``k, v [B, Hkv, N, D]`` with ``N <= max_len`` -> ``[B, Hq, Nq, D]``."""
        if causal:
            raise ValueError("linformer: Linformer has no causal form (E mixes all positions); use causal=False")
        check_qkv(self.name, q, k, v, key_padding_mask)
        n = k.shape[2]
        if n > self.max_len:
            raise ValueError(f"linformer: sequence length {n} exceeds max_len={self.max_len}")
        if key_padding_mask is not None:
            real = key_padding_mask[:, None, :, None].to(k.dtype)
            k, v = k * real, v * real
        e = self.E[:, :n].to(k.dtype)
        f = e if self.F is None else self.F[:, :n].to(k.dtype)
        kp = expand_kv(torch.einsum("kn,bhnd->bhkd", e, k), q.shape[1])
        vp = expand_kv(torch.einsum("kn,bhnd->bhkd", f, v), q.shape[1])
        attn = torch.softmax(q @ kp.transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
        return attn @ vp


@register(
    "nystrom",
    kind="approximation",
    description="Nyströmformer: segment-mean landmarks, iterative pseudo-inverse (6 iterations), optional conv residual",
    paper="Xiong et al., Nyströmformer, AAAI 2021 (arXiv 2102.03902)",
)
class Nystromformer(ApproxAttention):
    """``landmarks`` segment means of q and k (real tokens only), ``iters`` pseudo-inverse iterations,
    ``conv`` > 0 adds a depthwise conv (kernel ``conv`` along the sequence, one filter per head) of V.

    When ``landmarks >= N`` every token is its own landmark and, as in the official code, exact
    softmax attention is computed (an m x m problem). ``heads`` (from :class:`spattn.nn.Attention`)
    sizes the convolution.
    """

    name = "nystrom"
    supports_causal = False

    def __init__(self, landmarks: int = 64, iters: int = 6, conv: int = 0, heads: Optional[int] = None):
        super().__init__()
        self.landmarks = int_at_least("nystrom: landmarks", landmarks)
        self.iters = int_at_least("nystrom: iters", iters)
        if not is_int(conv) or conv < 0 or (conv and conv % 2 == 0):
            raise ValueError(f"nystrom: conv must be 0 (no conv residual) or an odd kernel size, got {conv!r}")
        self.conv = conv
        self.heads = heads
        self.conv_layer = None
        if conv:
            if heads is None:
                raise ValueError("nystrom: conv > 0 needs heads (spattn.nn.Attention passes it)")
            self.conv_layer = nn.Conv2d(heads, heads, (conv, 1), padding=(conv // 2, 0), groups=heads, bias=False)

    def params(self):
        return {"landmarks": self.landmarks, "iters": self.iters, "conv": self.conv}

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, key_padding_mask: Optional[Tensor] = None
    ) -> Tensor:
        """``q [B, Hq, N, D]``, ``k, v [B, Hkv, N, D]`` -> ``[B, Hq, N, D]``."""
        if causal:
            raise ValueError(
                "nystrom: Nyströmformer has no causal form (landmarks mix all positions); use causal=False"
            )
        check_qkv(self.name, q, k, v, key_padding_mask)
        hq, n = q.shape[1], k.shape[2]
        if q.shape[2] != n:
            raise ValueError(f"nystrom: needs as many queries as keys (self-attention), got {q.shape[2]} and {n}")
        k, v = expand_kv(k, hq), expand_kv(v, hq)
        scale = q.shape[-1] ** -0.25
        qs, ks = q * scale, k * scale
        keep = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        if self.landmarks >= n:
            out = masked_softmax(qs @ ks.transpose(-1, -2), keep) @ v
        else:
            q_l, valid = segment_means(qs, self.landmarks, key_padding_mask)
            k_l, _ = segment_means(ks, self.landmarks, key_padding_mask)
            col = valid.unsqueeze(-2)  # [B, 1, 1, m]: landmarks without a real token are dropped
            row = valid.unsqueeze(-1).to(q.dtype)
            k1 = masked_softmax(qs @ k_l.transpose(-1, -2), col)
            k2 = masked_softmax(q_l @ k_l.transpose(-1, -2), col) * row
            k3 = masked_softmax(q_l @ ks.transpose(-1, -2), keep) * row
            out = k1 @ (nystrom_pinv(k2, self.iters) @ (k3 @ v))
        if self.conv_layer is not None:
            if self.conv_layer.in_channels != hq:
                raise ValueError(f"nystrom: conv built for {self.conv_layer.in_channels} heads, got {hq}")
            vm = v if key_padding_mask is None else v * key_padding_mask[:, None, :, None].to(v.dtype)
            out = out + self.conv_layer(vm.to(self.conv_layer.weight.dtype)).to(out.dtype)
        return out
