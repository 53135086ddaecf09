"""Kernelised linear attention: ``linear`` (elu+1) and ``performer`` (FAVOR+).

``linear``: Katharopoulos, Vyas, Pappas, Fleuret, "Transformers are RNNs: Fast Autoregressive
Transformers with Linear Attention", ICML 2020. ``performer``: Choromanski et al., "Rethinking
Attention with Performers", ICLR 2021.

Both compute ``o_i = phi(q_i) sum_j phi(k_j) v_j^T / (phi(q_i) . sum_j phi(k_j))`` over the visible keys
``j`` (all real keys, or ``j <= i`` when causal) in O(N m d) time and O(m d) state. The causal form is
the chunked intra/inter form of :mod:`spattn.approx.linear_core`; :meth:`prefill` and :meth:`step`
expose the recurrent form for decoding (explicit state in, state out).

This module also imports the other members of the family so they register with it:
:mod:`.gla` (``lightning``, ``gla``) and :mod:`.soft` (``soft``).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .._checks import int_at_least
from .._heads import expand_kv
from ..registry import register
from .base import ApproxAttention
from .featuremaps import elu_feature_map, favor_features_, favor_logits, orthogonal_gaussian
from .linear_core import check_qkv, chunked_causal, compute_dtype, noncausal, recurrent_step

__all__ = ["LinearAttention", "Performer", "PerformerState"]


def _normalise(out: Tensor, eps: float) -> Tensor:
    """Split ``[num, den]`` (den = last column) and divide; a row with no visible key gives zeros."""
    num, den = out[..., :-1], out[..., -1:]
    if eps > 0:
        return num / (den + eps)
    return num / torch.where(den > 0, den, torch.ones_like(den))


def _with_ones(v: Tensor, ct: torch.dtype) -> Tensor:
    """``[..., Dv]`` -> ``[..., Dv + 1]`` in the compute dtype: the last column accumulates the denominator."""
    return torch.cat([v.to(ct), v.new_ones(v.shape[:-1] + (1,), dtype=ct)], dim=-1)


class _KernelAttention(ApproxAttention):
    """Shared forward / prefill / step of normalised kernelised attention (subclasses give phi)."""

    chunk: int
    eps: float

    def _features(self, q: Tensor, k: Tensor, key_padding_mask: Optional[Tensor], causal: bool):
        raise NotImplementedError

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, key_padding_mask: Optional[Tensor] = None
    ) -> Tensor:
        """``q [B, Hq, N, D]``, ``k, v [B, Hkv, N, D]`` -> ``[B, Hq, N, D]``."""
        check_qkv(self.name, q, k, v, key_padding_mask, causal)
        if q.shape[2] != k.shape[2] and causal:
            raise ValueError(
                f"{self.name}: causal attention needs as many queries as keys, got {q.shape[2]} and {k.shape[2]}"
            )
        fq, fk = self._features(q, k, key_padding_mask, causal)
        ct = compute_dtype(q.dtype)
        fk, va = expand_kv(fk, q.shape[1]), expand_kv(_with_ones(v, ct), q.shape[1])
        if causal:
            out, _ = chunked_causal(fq, fk, va, chunk=self.chunk)
        else:
            out = noncausal(fq.to(ct), fk.to(ct), va)
        return _normalise(out, self.eps).to(q.dtype)


@register(
    "linear",
    kind="approximation",
    description="linear attention with the elu+1 feature map; causal by chunked prefix sums, recurrent decoding",
    paper="Katharopoulos et al., Transformers are RNNs, ICML 2020 (arXiv 2006.16236)",
)
class LinearAttention(_KernelAttention):
    """``phi(x) = elu(x) + 1``; ``eps`` is added to the denominator as in the paper's code.

    Recurrent state: ``[B, Hq, D, Dv + 1]`` (the key-value sum with the key sum as its last column).
    """

    name = "linear"

    def __init__(self, chunk: int = 64, eps: float = 1e-6):
        super().__init__()
        self.chunk = int_at_least("linear: chunk", chunk)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"linear: eps must be a finite float >= 0, got {eps!r}")
        self.eps = float(eps)

    def _features(self, q, k, key_padding_mask, causal):
        fq, fk = elu_feature_map(q), elu_feature_map(k)
        if key_padding_mask is not None:
            fk = fk * key_padding_mask[:, None, :, None].to(fk.dtype)
        return fq, fk

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Causal attention over a block of tokens continuing from ``state``; returns ``(out, state)``."""
        check_qkv(self.name, q, k, v, None)
        fq, fk = self._features(q, k, None, True)
        ct = compute_dtype(q.dtype)
        va = expand_kv(_with_ones(v, ct), q.shape[1])
        out, state = chunked_causal(fq, expand_kv(fk, q.shape[1]), va, chunk=self.chunk, state=state)
        return _normalise(out, self.eps).to(q.dtype), state

    def step(self, q_t: Tensor, k_t: Tensor, v_t: Tensor, state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """One token: ``q_t [B, Hq, D]``, ``k_t, v_t [B, Hkv, D]``, ``state [B, Hq, D, Dv + 1]`` or None."""
        ct = compute_dtype(q_t.dtype)
        hq = q_t.shape[1]
        if state is None:
            state = q_t.new_zeros(q_t.shape[0], hq, q_t.shape[-1], v_t.shape[-1] + 1, dtype=ct)
        fk = expand_kv(elu_feature_map(k_t), hq)
        va = expand_kv(_with_ones(v_t, ct), hq)
        out, state = recurrent_step(elu_feature_map(q_t), fk, va, state)
        return _normalise(out, self.eps).to(q_t.dtype), state


class PerformerState(NamedTuple):
    """Recurrent state of causal FAVOR+: ``kv [B, Hq, m, Dv + 1]`` scaled by ``exp(-stabilizer)``,
    ``stabilizer [B, Hkv, 1, 1]`` the running maximum key logit (online rescaling keeps it exact)."""

    kv: Tensor
    stabilizer: Tensor


@register(
    "performer",
    kind="approximation",
    description="Performer FAVOR+: positive orthogonal random features, stabilised, feature redraw, causal prefix sums",
    paper="Choromanski et al., Rethinking Attention with Performers, ICLR 2021 (arXiv 2009.14794)",
)
class Performer(_KernelAttention):
    """FAVOR+ with ``features`` positive orthogonal random features shared by all heads of a layer.

    * Stabilised as in the official code: queries subtract their row maximum logit, keys one maximum
      per (batch, head) over the real keys; ``eps`` (1e-4) is added to the features. In the causal form
      the key ``eps`` is left out and the key maximum is detached: the per-(batch, head) constant then
      cancels exactly between numerator and denominator, so no output depends on a later token.
    * The projection is a buffer drawn from ``torch.Generator().manual_seed(seed + draw_index)``;
      in training mode it is redrawn every ``redraw`` forward calls (``redraw=0``: never).
    * ``head_dim`` comes from :class:`spattn.nn.Attention`; without it the projection is drawn on the
      first forward.
    """

    name = "performer"

    def __init__(
        self,
        features: int = 256,
        redraw: int = 1000,
        seed: int = 0,
        chunk: int = 64,
        eps: float = 1e-4,
        head_dim: Optional[int] = None,
    ):
        super().__init__()
        self.features = int_at_least("performer: features", features)
        self.redraw = int_at_least("performer: redraw", redraw, minimum=0)
        self.seed = int_at_least("performer: seed", seed, minimum=0)
        self.chunk = int_at_least("performer: chunk", chunk)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"performer: eps must be a finite float >= 0, got {eps!r}")
        self.feature_eps = float(eps)
        self.eps = 0.0  # the denominator needs no eps: features are positive, empty rows give 0/1
        self.head_dim = None if head_dim is None else int_at_least("performer: head_dim", head_dim)
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))
        self.register_buffer("calls_since_redraw", torch.zeros((), dtype=torch.long))
        self.register_buffer("projection", torch.empty(0, 0))
        if self.head_dim is not None:
            self.redraw_features(self.head_dim)

    def params(self):
        return {
            "features": self.features,
            "redraw": self.redraw,
            "seed": self.seed,
            "chunk": self.chunk,
            "eps": self.feature_eps,
        }

    @torch.no_grad()
    def redraw_features(self, head_dim: Optional[int] = None) -> None:
        """Draw a new projection ``[features, head_dim]`` (deterministic in ``seed`` and the draw count)."""
        d = head_dim or self.projection.shape[1]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.draws))
        w = orthogonal_gaussian(self.features, d, generator=gen)
        self.projection = w.to(self.projection.device)
        self.draws += 1
        self.calls_since_redraw.zero_()

    def _maybe_redraw(self, d: int) -> None:
        if self.projection.numel() == 0:
            self.redraw_features(d)
        elif self.projection.shape[1] != d:
            raise ValueError(f"performer: head_dim is {self.projection.shape[1]}, got inputs with head_dim {d}")
        if self.training and self.redraw:
            if int(self.calls_since_redraw) >= self.redraw:
                self.redraw_features()
            self.calls_since_redraw += 1

    def _query_features(self, q: Tensor) -> Tensor:
        lq = favor_logits(q.to(compute_dtype(q.dtype)), self.projection)
        return favor_features_(lq, lq.amax(-1, keepdim=True).detach(), self.feature_eps)

    def _key_logits(self, k: Tensor, key_padding_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """Key logits and their maximum per (batch, head) over real keys (0 when there is none)."""
        lk = favor_logits(k.to(compute_dtype(k.dtype)), self.projection)
        if key_padding_mask is not None:
            lk = lk.masked_fill(~key_padding_mask[:, None, :, None], float("-inf"))
        stab = lk.detach().amax(dim=(-1, -2), keepdim=True)
        return lk, torch.where(torch.isfinite(stab), stab, torch.zeros_like(stab))

    def _features(self, q, k, key_padding_mask, causal):
        self._maybe_redraw(q.shape[-1])
        lk, stab = self._key_logits(k, key_padding_mask)
        fk = favor_features_(lk, stab, 0.0 if causal else self.feature_eps)
        if key_padding_mask is not None:  # exp(-inf) = 0 already; the eps must not revive padded keys
            fk = fk * key_padding_mask[:, None, :, None].to(fk.dtype)
        return self._query_features(q), fk

    def prefill(
        self, q: Tensor, k: Tensor, v: Tensor, state: Optional[PerformerState] = None
    ) -> tuple[Tensor, PerformerState]:
        """Causal FAVOR+ over a block of tokens continuing from ``state``; returns ``(out, state)``.

        The key stabiliser is the running maximum; the carried state is rescaled when it grows
        (as an online softmax), so prefill + steps equal one causal forward up to rounding.
        """
        check_qkv(self.name, q, k, v, None)
        self._maybe_redraw(q.shape[-1])
        ct = compute_dtype(q.dtype)
        hq = q.shape[1]
        lk, stab = self._key_logits(k, None)
        kv = None
        if state is not None:
            stab = torch.maximum(stab, state.stabilizer)
            kv = state.kv * expand_kv(torch.exp(state.stabilizer - stab), hq)
        fk = favor_features_(lk, stab, 0.0)
        va = expand_kv(_with_ones(v, ct), hq)
        out, kv = chunked_causal(self._query_features(q), expand_kv(fk, hq), va, chunk=self.chunk, state=kv)
        return _normalise(out, 0.0).to(q.dtype), PerformerState(kv, stab)

    def step(
        self, q_t: Tensor, k_t: Tensor, v_t: Tensor, state: Optional[PerformerState] = None
    ) -> tuple[Tensor, PerformerState]:
        """One token: ``q_t [B, Hq, D]``, ``k_t, v_t [B, Hkv, D]``; returns ``(out [B, Hq, D], state)``."""
        if state is None:
            out, state = self.prefill(q_t.unsqueeze(2), k_t.unsqueeze(2), v_t.unsqueeze(2))
            return out.squeeze(2), state
        ct = compute_dtype(q_t.dtype)
        hq = q_t.shape[1]
        lk, stab = self._key_logits(k_t.unsqueeze(2), None)
        stab = torch.maximum(stab, state.stabilizer)
        kv = state.kv * expand_kv(torch.exp(state.stabilizer - stab), hq)
        fk = favor_features_(lk, stab, 0.0).squeeze(2)
        out, kv = recurrent_step(self._query_features(q_t), expand_kv(fk, hq), expand_kv(_with_ones(v_t, ct), hq), kv)
        return _normalise(out, 0.0).to(q_t.dtype), PerformerState(kv, stab)


from . import gla, soft  # noqa: E402,F401  (register lightning, gla, soft with the family)
