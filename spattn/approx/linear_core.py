"""Shared kernels of the linear-attention family: chunked causal scan and its recurrent step.

Everything here computes the (optionally decayed) *unnormalised* linear attention

    o_t = sum_{s <= t} (q_t * exp(G_t - G_s)) . k_s  v_s          G_t = sum_{r <= t} log_decay_r

with ``q, k [B, H, N, Dk]``, ``v [B, H, N, Dv]`` and ``log_decay`` ``<= 0`` either ``None`` (plain
linear attention, Katharopoulos et al. 2020), ``[B|1, H, N|1, 1]`` (one decay per head, Lightning
Attention / TransNormerLLM, Qin et al. 2024) or ``[B, H, N, Dk]`` (data-dependent gates on the key
dimension, GLA, Yang et al. 2024). The equivalent recurrence is

    S_t = diag(exp(log_decay_t)) S_{t-1} + k_t^T v_t,     o_t = q_t S_t,     S in R^{Dk x Dv}.

The chunked form (Lightning Attention-2 / GLA's chunkwise form) splits the sequence into chunks of
``chunk`` tokens: inside a chunk the pairs are computed explicitly ("intra", left product), across
chunks through the state ("inter", right product). Only the O(N / chunk) state hand-off is a Python
loop. Cumulative gates are kept in fp32 log space, measured from the chunk start; the inter-chunk
terms only use ``exp(G_t - G_s) <= 1`` (``s <= t``). Inside a chunk, per-dimension gates use the
factored matmul ``(q e^G)(k e^-G)^T`` while ``e^-G`` stays below ``e^30``, and the exact elementwise
form (all exponents ``<= 0``) in chunks that decay more: nothing overflows however strong the decay.

Normalised linear attention (elu+1, Performer) appends a column of ones to ``v``: the last output
column is then the denominator ``q_t . sum_s k_s``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["chunked_causal", "recurrent_step", "noncausal", "compute_dtype", "check_qkv"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """States and cumulative gates are kept in at least fp32 (fp16 prefix sums overflow)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_qkv(
    name: str, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], causal: bool = False
) -> None:
    """Validate ``q [B, Hq, N, D]``, ``k, v [B, Hkv, N, D]``, ``Hq % Hkv == 0``, mask ``[B, N]`` bool, ``causal`` a bool."""
    if not isinstance(causal, bool):
        raise TypeError(f"{name}: causal must be a bool, got {causal!r}")
    for arg, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: {arg} must have shape [B, H, N, D], got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: {arg} must be floating point, got {t.dtype}")
    if k.shape != v.shape[:3] + k.shape[3:] or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"{name}: k {tuple(k.shape)} and v {tuple(v.shape)} must share [B, Hkv, N]")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{name}: q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and head_dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{name}: query heads {q.shape[1]} must be a multiple of key/value heads {k.shape[1]}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"{name}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError(f"{name}: key_padding_mask must be a bool tensor [B, N] (True = real token)")
        if tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
            raise ValueError(
                f"{name}: key_padding_mask must have shape [B, N] = {(k.shape[0], k.shape[2])}, "
                f"got {tuple(key_padding_mask.shape)}"
            )


def noncausal(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``o_i = q_i (sum_j k_j^T v_j)``: ``q, k [B, H, N, Dk]``, ``v [B, H, N, Dv]`` -> ``[B, H, N, Dv]``."""
    return q @ (k.transpose(-1, -2) @ v)


def recurrent_step(
    q_t: Tensor, k_t: Tensor, v_t: Tensor, state: Tensor, log_decay_t: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """One decoding step: ``S = diag(exp(log_decay_t)) S + k_t^T v_t``, ``o_t = q_t S``.

    ``q_t, k_t [B, H, Dk]``, ``v_t [B, H, Dv]``, ``state [B, H, Dk, Dv]``, ``log_decay_t`` broadcastable
    to ``[B, H, Dk]`` or None. Returns ``(o_t [B, H, Dv], new state)``.
    """
    if log_decay_t is not None:
        state = state * torch.exp(log_decay_t.to(state.dtype)).unsqueeze(-1)
    state = state + k_t.to(state.dtype).unsqueeze(-1) * v_t.to(state.dtype).unsqueeze(-2)
    out = (q_t.to(state.dtype).unsqueeze(-2) @ state).squeeze(-2)
    return out, state


def _gated_scores(qc: Tensor, kc: Tensor, G: Tensor, causal_mask: Tensor, budget: int = 1 << 23) -> Tensor:
    """``A_ts = sum_d q_td k_sd exp(G_td - G_sd)`` for ``s <= t`` inside each chunk, ``[B, H, C, L, L]``.

    The ``[L, L, Dk]`` decay tensor is built for a slab of chunks at a time, so that each temporary
    holds about ``budget`` values whatever the sequence length.
    """
    B, H, _, L, Dk = qc.shape
    step = max(1, budget // (B * H * L * L * Dk))
    keep = causal_mask.unsqueeze(-1)
    parts = []
    for c0 in range(0, qc.shape[2], step):
        g = G[:, :, c0 : c0 + step]
        decay = torch.exp((g.unsqueeze(-2) - g.unsqueeze(-3)).masked_fill(~keep, float("-inf")))
        parts.append(
            ((qc[:, :, c0 : c0 + step].unsqueeze(-2) * decay) * kc[:, :, c0 : c0 + step].unsqueeze(-3)).sum(-1)
        )
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


#: largest in-chunk cumulative log-decay for which the factored form is used (exp(30) ~ 1e13)
FACTOR_LIMIT = 30.0


def _factored_gated_scores(qc: Tensor, kc: Tensor, G: Tensor, causal_mask: Tensor) -> Tensor:
    """:func:`_gated_scores` as one matmul, ``(q_t e^{G_t}) . (k_s e^{-G_s})``, where that is safe.

    ``e^{-G_s}`` grows with the decay accumulated inside the chunk; chunks where it exceeds
    ``e^FACTOR_LIMIT`` anywhere are recomputed with the exact elementwise form (never overflows).
    The exponent is clamped so unused entries stay finite and their zero gradient stays zero.
    """
    neg = torch.clamp(-G, max=FACTOR_LIMIT)
    scores = (qc * torch.exp(G)) @ (kc * torch.exp(neg)).transpose(-1, -2)
    scores = scores.masked_fill(~causal_mask, 0.0)
    span = (-G[:, :, :, -1]).amax(dim=(0, 1, 3))  # [C]: deepest decay reached in each chunk
    unsafe = torch.nonzero(span > FACTOR_LIMIT).flatten()
    if unsafe.numel():
        exact = _gated_scores(qc[:, :, unsafe], kc[:, :, unsafe], G[:, :, unsafe], causal_mask)
        scores = scores.index_copy(2, unsafe, exact)
    return scores


def chunked_causal(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Optional[Tensor] = None,
    *,
    chunk: int = 64,
    state: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Causal (decayed) linear attention in chunked intra/inter form.

    ``q, k [B, H, N, Dk]``, ``v [B, H, N, Dv]``, ``log_decay`` None, ``[B|1, H, N|1, 1]`` or
    ``[B, H, N, Dk]`` (values ``<= 0``), ``state [B, H, Dk, Dv]`` the state before the first token.
    Returns ``(o [B, H, N, Dv], state after the last token)``, computed in fp32 (fp64 for fp64 input).
    """
    B, H, N, Dk = q.shape
    Dv = v.shape[-1]
    ct = compute_dtype(q.dtype)
    q, k, v = q.to(ct), k.to(ct), v.to(ct)
    if state is None:
        state = q.new_zeros(B, H, Dk, Dv)
    state = state.to(ct)
    L = max(1, min(int(chunk), N))
    C = -(-N // L)
    pad = C * L - N
    if pad:  # zero tokens at the end: no contribution, no decay (log 0 = 0), earlier outputs unchanged
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    qc, kc, vc = (x.reshape(B, H, C, L, x.shape[-1]) for x in (q, k, v))
    causal_mask = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()

    if log_decay is None:
        scores = (qc @ kc.transpose(-1, -2)).masked_fill(~causal_mask, 0.0)
        intra = scores @ vc
        local = kc.transpose(-1, -2) @ vc  # [B, H, C, Dk, Dv]: each chunk's own contribution
        before = torch.cumsum(local, dim=2) - local + state.unsqueeze(2)  # state entering each chunk
        out = intra + qc @ before
        final = before[:, :, -1] + local[:, :, -1]
    else:
        g = log_decay.to(ct).expand(B, H, N, log_decay.shape[-1])
        if pad:
            g = F.pad(g, (0, 0, 0, pad))
        G = torch.cumsum(g.reshape(B, H, C, L, -1), dim=3)  # cumulative log-decay from the chunk start
        last = G[:, :, :, -1:]  # [B, H, C, 1, Dg]
        if G.shape[-1] == 1:  # one decay per head: [L, L] decay matrix per chunk
            diff = (G - G.transpose(-1, -2)).masked_fill(~causal_mask, float("-inf"))
            scores = (qc @ kc.transpose(-1, -2)) * torch.exp(diff)
        else:  # a decay per key dimension: sum_d q_td k_sd exp(G_td - G_sd), s <= t
            scores = _factored_gated_scores(qc, kc, G, causal_mask)
        intra = scores @ vc
        # contribution of the chunk to the state at its end, keys decayed to the chunk's last token
        local = (kc * torch.exp(last - G)).transpose(-1, -2) @ vc  # [B, H, C, Dk, Dv]
        chunk_decay = torch.exp(last.squeeze(3)).unsqueeze(-1)  # [B, H, C, Dg, 1]
        befores = []
        for c in range(C):  # O(N / chunk) hand-off of a [Dk, Dv] state
            befores.append(state)
            state = chunk_decay[:, :, c] * state + local[:, :, c]
        before = torch.stack(befores, dim=2)
        out = intra + (qc * torch.exp(G)) @ before
        final = state
    out = out.reshape(B, H, C * L, Dv)[:, :, :N]
    return out, final
