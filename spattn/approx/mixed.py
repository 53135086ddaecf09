"""Sparse + low-rank / linear hybrids: Scatterbrain, SLA (and SEA, in :mod:`spattn.approx.sea`).

* **Scatterbrain** (Chen et al., NeurIPS 2021): an unbiased low-rank (Performer FAVOR+) estimate of
  the whole attention matrix, corrected on a sparse support ``S`` where the exact scores replace
  the estimate, with ONE normaliser::

      num_i = sum_{j in S_i} exp(s_ij) v_j + phi(q_i) . sum_{j not in S_i} phi(k_j) v_j^T
      den_i = sum_{j in S_i} exp(s_ij)     + phi(q_i) . sum_{j not in S_i} phi(k_j)
      out_i = num_i / den_i                      (s_ij = q_i . k_j / sqrt(D))

  The exact sparse sums come from the core kernels (``spattn.attention(..., return_lse=True)`` gives
  ``out_s`` and ``lse_s``: ``sum exp(s) v = exp(lse_s) out_s``); the low-rank sums are all keys
  minus the support (:func:`~spattn.approx.sparse_support.support_bilinear`), and the two are
  merged in log space (feature stabilisers are carried as a log-scale, so nothing overflows).
  Causal: causal linear attention (chunked scan) plus the causal support.

* **SLA** (Zhang et al. 2025, Sparse-Linear Attention): per query block the top-k key blocks by
  mean-pooled ``Q . (K - mean K)`` ("smooth-k") are *critical* and get block-sparse softmax
  attention ``o_s`` (own normaliser); every other key goes to linear attention
  ``o_l = phi(q) S_rest / (phi(q) z_rest)`` with ``phi = softmax`` over the head dimension, normalised
  separately; ``o = o_s + proj_l(o_l)`` with ``proj_l = Linear(D, D)`` zero-initialised. SLA has no
  causal form (it is a DiT method): ``causal=True`` raises ``ValueError``.

Shapes: ``q [B, Hq, N, D]``, ``k, v [B, Hkv, N, D]`` (grouped-query), ``key_padding_mask`` bool
``[B, N]`` (True = real). Outputs ``[B, Hq, N, D]`` in the dtype of ``q``.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._heads import expand_kv
from .. import registry
from .._checks import check_kind, int_at_least
from ..functional import attention, is_selection
from ..layout import Layout
from ..patterns import Pattern
from ..patterns.base import PaddedPattern
from ..registry import register
from .base import ApproxAttention
from .featuremaps import FavorProjection, favor_pair  # noqa: F401  (re-exported: spattn.approx.mixed.favor_pair)
from .linear_core import check_qkv, chunked_causal, compute_dtype, noncausal
from .sparse_support import support_bilinear

__all__ = ["Scatterbrain", "SLA", "scatterbrain_attention", "sla_attention", "FavorProjection", "favor_pair"]


def _zero_padded(key_padding_mask: Optional[Tensor], *xs: Tensor) -> tuple[Tensor, ...]:
    """``xs [B, H, N, D]`` with padded positions (``key_padding_mask [B, N]`` False) set to zero, so
    that no value of a padded token reaches any arithmetic (self-attention: queries are padded too)."""
    if key_padding_mask is None:
        return xs
    keep = key_padding_mask[:, None, :, None]
    return tuple(torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)) for x in xs)


def _support(
    pattern: Union[str, Pattern, Layout],
    q: Tensor,
    k: Tensor,
    causal: bool,
    key_padding_mask: Optional[Tensor],
    owner: str,
) -> Layout:
    """The sparse support as a Layout; content-based patterns see the padding mask."""
    if is_selection(pattern):  # precomputed: the support must be block pairs (a softmax over them)
        return check_kind(f"{owner}: pattern", pattern, Layout, "Layout, a Pattern or a pattern spec")
    pat = _as_pattern(pattern, owner)
    if isinstance(pat, PaddedPattern):
        return pat.layout(q, k, causal=causal, key_padding_mask=key_padding_mask)
    return pat.layout(q, k, causal=causal)


def _as_pattern(pattern: Union[str, Pattern], owner: str) -> Pattern:
    if isinstance(pattern, str):
        try:
            pattern = registry.build(pattern)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{owner}: pattern {pattern!r}: {err}") from None
    if not isinstance(pattern, Pattern):
        raise TypeError(
            f"{owner}: pattern must be a Pattern or a pattern spec such as 'window(size=64)', "
            f"got {type(pattern).__name__}"
        )
    return pattern


def scatterbrain_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Union[str, Pattern, Layout],
    projection: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    chunk: int = 64,
) -> Tensor:
    """Scatterbrain (see module docstring). ``projection [M, D]`` is the FAVOR+ matrix.

    ``pattern`` gives the sparse support (a Pattern, spec string or a precomputed Layout).
    """
    check_qkv("scatterbrain", q, k, v, key_padding_mask)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"scatterbrain: self-attention only, q has {q.shape[2]} tokens and k {k.shape[2]}")
    k, v = _zero_padded(key_padding_mask, k, v)  # a padded query's values only reach its own row
    layout = _support(pattern, q, k, causal, key_padding_mask, "scatterbrain")
    B, Hq, N, D = q.shape
    ct = compute_dtype(q.dtype)
    out_s, lse_s = attention(q, k, v, layout, key_padding_mask=key_padding_mask, return_lse=True)
    qf, kf, vf = q.to(ct), expand_kv(k, Hq).to(ct), expand_kv(v, Hq).to(ct)
    phi_q, phi_k, log_scale = favor_pair(qf, kf, projection.to(ct), key_padding_mask)
    w = torch.cat([vf, torch.ones_like(vf[..., :1])], -1)  # last column: the normaliser
    if causal:
        lowrank, _ = chunked_causal(phi_q, phi_k, w, chunk=chunk)
    else:
        lowrank = noncausal(phi_q, phi_k, w)
    lowrank = lowrank - support_bilinear(layout, phi_q, phi_k, w, key_padding_mask)  # keys outside S
    lse_s = lse_s.to(ct)
    top = torch.maximum(lse_s, log_scale)
    e_s = torch.exp(lse_s - top).unsqueeze(-1)  # 0 where the support is empty
    e_l = torch.exp(log_scale - top).unsqueeze(-1)
    num = e_s * out_s.to(ct) + e_l * lowrank[..., :D]
    den = e_s + e_l * lowrank[..., D:]
    ok = den > 0
    out = torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))
    return out.to(q.dtype)


@register(
    "scatterbrain",
    kind="hybrid",
    description="Scatterbrain: sparse (pattern) + Performer low-rank with one normaliser and the sparse-support correction",
    paper="Chen et al. 2021, Scatterbrain: Unifying Sparse and Low-rank Attention Approximation",
)
class Scatterbrain(ApproxAttention):
    """``scatterbrain(features=128, pattern="window(size=32)", seed=0, redraw=None)``."""

    name = "scatterbrain"
    supports_causal = True

    def __init__(
        self, features: int = 128, pattern: str = "window(size=32)", seed: int = 0, redraw: Optional[int] = None
    ):
        super().__init__()
        self.features, self.seed, self.redraw = features, seed, redraw
        self.projection = FavorProjection(features, seed, redraw, owner="scatterbrain")
        self.pattern = pattern
        self._pattern = _as_pattern(pattern, "scatterbrain")

    def forward(self, q, k, v, *, causal: bool = False, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        check_qkv("scatterbrain", q, k, v, key_padding_mask)
        proj = self.projection(q.shape[-1], q.device)
        return scatterbrain_attention(q, k, v, self._pattern, proj, causal=causal, key_padding_mask=key_padding_mask)


# ----------------------------------------------------------------------------------------- SLA
def _block_mean(x: Tensor, block: int, real: Tensor) -> Tensor:
    """Mean of ``x [B, H, N, D]`` over the real tokens (``real [B|1, 1, N]``) of each block -> ``[B, H, NB, D]``."""
    B, H, N, D = x.shape
    nb = -(-N // block)
    w = F.pad(real.to(x.dtype), (0, nb * block - N)).view(real.shape[0], 1, nb, block, 1)
    s = (F.pad(x, (0, 0, 0, nb * block - N)).view(B, H, nb, block, D) * w).sum(3)
    return s / w.sum(3).clamp(min=1)


def sla_critical_blocks(
    q: Tensor, k: Tensor, block: int, topk: int, key_padding_mask: Optional[Tensor] = None
) -> Tensor:
    """SLA's block map ``[B, Hq, NQB, NKB]``: per query block the ``topk`` key blocks with the highest
    ``meanpool(Q) . meanpool(K - mean_seq K)`` (scored in fp32, no gradient); pools and the mean
    use real tokens only, key blocks without a real key are never chosen."""
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    sdt = compute_dtype(q.dtype)
    real = (
        torch.ones(1, 1, N, dtype=torch.bool, device=q.device)
        if key_padding_mask is None
        else key_padding_mask[:, None, :]
    )
    kd, qd = _zero_padded(key_padding_mask, k.detach().to(sdt), q.detach().to(sdt))
    kmean = kd.sum(2, keepdim=True) / real.sum(-1, keepdim=True)[..., None].clamp(min=1)
    qbar = _block_mean(qd, block, real)  # self-attention: padded queries are padded keys
    kbar = _block_mean(kd - kmean, block, real)
    scores = qbar.view(B, Hkv, Hq // Hkv, qbar.shape[2], D) @ kbar.transpose(-1, -2).unsqueeze(2)
    scores = scores.view(B, Hq, qbar.shape[2], kbar.shape[2])
    nkb = kbar.shape[2]
    kb_real = F.pad(real, (0, nkb * block - N)).view(real.shape[0], 1, 1, nkb, block).any(-1)
    scores = scores.masked_fill(~kb_real, float("-inf"))
    top = scores.topk(min(topk, nkb), dim=-1).indices
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
    return chosen & kb_real


def sla_attention(
    q, k, v, block_map: Tensor, block: int, proj_l: nn.Module, key_padding_mask: Optional[Tensor] = None
) -> Tensor:
    """SLA given the critical ``block_map [B, Hq, NQB, NKB]``: sparse softmax + projected linear branch."""
    B, Hq, N, D = q.shape
    ct = compute_dtype(q.dtype)
    layout = Layout.from_block_map(block_map, q_len=N, kv_len=N, block_q=block)
    o_s = attention(q, k, v, layout, key_padding_mask=key_padding_mask)
    nqb, nkb = block_map.shape[2], block_map.shape[3]
    phi_q = torch.softmax(q.to(ct), -1)
    phi_k = torch.softmax(expand_kv(k, Hq).to(ct), -1)
    vf = expand_kv(v, Hq).to(ct)
    if key_padding_mask is not None:
        phi_k = torch.where(key_padding_mask[:, None, :, None], phi_k, torch.zeros((), dtype=ct, device=phi_k.device))
    pad = nkb * block - N
    phi_kb = F.pad(phi_k, (0, 0, 0, pad)).view(B, Hq, nkb, block, D)
    kv = phi_kb.transpose(-1, -2) @ F.pad(vf, (0, 0, 0, pad)).view(B, Hq, nkb, block, D)  # [B,H,NKB,D,D]
    z = phi_kb.sum(3)  # [B, H, NKB, D]
    rest = (~block_map).to(ct)
    s_rest = torch.einsum("bhqk,bhkde->bhqde", rest, kv)
    z_rest = torch.einsum("bhqk,bhkd->bhqd", rest, z)
    qb = F.pad(phi_q, (0, 0, 0, nqb * block - N)).view(B, Hq, nqb, block, D)
    num = qb @ s_rest
    den = qb @ z_rest.unsqueeze(-1)
    ok = den > 0
    o_l = torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))
    o_l = o_l.reshape(B, Hq, nqb * block, D)[:, :, :N]
    out = o_s.to(ct) + proj_l(o_l.to(proj_l.weight.dtype)).to(ct)
    if key_padding_mask is not None:  # a sequence without real keys: zeros, not proj_l's bias
        out = out * key_padding_mask.any(-1).view(B, 1, 1, 1).to(ct)
    return out.to(q.dtype)


@register(
    "sla",
    kind="hybrid",
    description="SLA: top-k critical blocks get sparse softmax attention, the rest linear attention (zero-init projection)",
    paper="Zhang et al. 2025, SLA: Beyond Sparsity in Diffusion Transformers via Fine-Tunable Sparse-Linear Attention",
)
class SLA(ApproxAttention):
    """``sla(k=0.2, block=64)``: ``k`` is the fraction of key blocks kept per query block (a float in
    (0, 1], SLA's ``topk`` ratio) or their number (an int >= 1). ``head_dim`` sizes ``proj_l`` (filled
    in by :class:`spattn.nn.Attention`). No causal form."""

    name = "sla"
    supports_causal = False

    def __init__(self, k: Union[int, float] = 0.2, block: int = 64, head_dim: Optional[int] = None):
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, (int, float)):
            raise ValueError(f"sla: k must be a fraction in (0, 1] or an int >= 1, got {k!r}")
        if isinstance(k, float) and not 0.0 < k <= 1.0:
            raise ValueError(f"sla: k as a fraction must lie in (0, 1], got {k!r}")
        if isinstance(k, int) and k < 1:
            raise ValueError(f"sla: k as a count must be >= 1, got {k!r}")
        int_at_least("sla: block", block)
        if head_dim is None:
            raise ValueError(
                "sla: head_dim is required (it sizes the zero-initialised proj_l; spattn.nn.Attention passes it)"
            )
        int_at_least("sla: head_dim", head_dim)
        self.k, self.block, self.head_dim = k, block, head_dim
        self.proj_l = nn.Linear(head_dim, head_dim)
        nn.init.zeros_(self.proj_l.weight)
        nn.init.zeros_(self.proj_l.bias)

    def blocks_kept(self, n: int) -> int:
        nkb = -(-n // self.block)
        return min(nkb, self.k if isinstance(self.k, int) else max(1, math.ceil(self.k * nkb)))

    def forward(self, q, k, v, *, causal: bool = False, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        if causal:
            raise ValueError(
                "sla: SLA has no causal form (it is defined for bidirectional DiT attention); use causal=False"
            )
        check_qkv("sla", q, k, v, key_padding_mask)
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"sla: self-attention only, q has {q.shape[2]} tokens and k {k.shape[2]}")
        if q.shape[-1] != self.head_dim:
            raise ValueError(f"sla: head_dim is {self.head_dim} but q has D={q.shape[-1]}")
        k, v = _zero_padded(key_padding_mask, k, v)  # a padded query's values only reach its own row
        block_map = sla_critical_blocks(q, k, self.block, self.blocks_kept(q.shape[2]), key_padding_mask)
        return sla_attention(q, k, v, block_map, self.block, self.proj_l, key_padding_mask)
