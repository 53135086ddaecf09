"""SeerAttention gate (Gao et al. 2024, arXiv 2410.13276; microsoft/SeerAttention ``attn_gate.py``).

A small learned gate predicts which ``block × block`` tiles of the attention map matter:

* pool the queries of each block by **average** -> ``[B, Hq, NQB, D]``, the keys of each block by
  **max and min** concatenated -> ``[B, Hkv, NKB, 2D]`` (the official default ``Qavg_Kmaxmin``;
  a last partial block pools over its real tokens);
* per-head linear maps to ``hidden`` (=128) channels: ``Wq [Hq, D, hidden]``, ``Wk [Hkv, 2D, hidden]``
  (the official ``MultiHeadLinear``, xavier-initialised; key heads are repeated for GQA);
* block logits ``Qp Kpᵀ / sqrt(hidden)`` with the block-causal mask, softmax over key blocks = the gate.

Inference keeps, per query block, the key blocks whose gate probability exceeds ``threshold``
(official default 2e-3) or the ``topk`` blocks of largest logit. With ``causal`` only blocks holding
at least one visible pair count, and the **diagonal blocks** (those overlapping the query block's own
positions) are always kept so no query is left without keys; the tiles go to a
:class:`~spattn.layout.Layout` with the token-level causal predicate. (The official prefill code
applies ``tril`` to the gate mask and, by default, makes the last two query-block rows dense; it
does not force the diagonal. We force it because a causal row with no key would otherwise be empty;
we do not add the prompt-specific dense last rows.) Differences from the official gate: no RoPE on
block positions (spattn's patterns see q/k after any position encoding the model applied), and
both the query and the key maps always exist (the official code drops the query map when
``hidden == head_dim`` with one query pooling).

Training (:func:`distill_seer_gate`): the base model is frozen; the target is its attention map
max-pooled over tiles and row-normalised (:func:`seer_block_target`, computed by query-block chunks:
memory ``O(chunk · Nk)``, never ``N²`` at once), the loss ``KL(target ‖ gate)`` per query block.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layout import Layout, ceil_div
from ..registry import register
from ._padding import masked_block_extrema, masked_block_mean, query_tokens, real_tokens
from ._tiles import causal_block_maps
from .base import PaddedPattern, causal_mask_mod, check_float, check_int, check_qk

__all__ = ["SeerGate", "seer_block_target", "distill_seer_gate", "block_pool"]

DEFAULT_THRESHOLD = 2e-3
DEFAULT_HIDDEN = 128


def block_pool(x: Tensor, block: int) -> tuple[Tensor, Tensor, Tensor]:
    """Average, max and min of ``x [B, H, N, D]`` over consecutive blocks of ``block`` positions.

    Returns three ``[B, H, ceil(N / block), D]`` tensors; a last partial block uses its real tokens only.
    """
    b, h, n, d = x.shape
    nb = -(-n // block)
    pad = nb * block - n
    tiles = (F.pad(x, (0, 0, 0, pad)) if pad else x).view(b, h, nb, block, d)
    count = torch.full((nb,), block, dtype=x.dtype, device=x.device)
    count[-1] = block - pad
    mean = tiles.sum(3) / count[:, None]
    if pad:
        real = (torch.arange(nb * block, device=x.device) < n).view(nb, block)[..., None]
        hi = tiles.masked_fill(~real, -math.inf).amax(3)
        lo = tiles.masked_fill(~real, math.inf).amin(3)
    else:
        hi, lo = tiles.amax(3), tiles.amin(3)
    return mean, hi, lo


def _block_visibility(q_len: int, kv_len: int, block: int, causal: bool, device) -> tuple[Tensor, Tensor, Tensor]:
    """``(valid, full, diagonal)`` bool ``[NQB, NKB]``: tiles with >= 1 visible pair, tiles entirely
    visible, and tiles overlapping the query block's own aligned positions (causal alignment ``i' = i + Nk - Nq``)."""
    if not causal:
        ones = torch.ones(ceil_div(q_len, block), ceil_div(kv_len, block), dtype=torch.bool, device=device)
        return ones, ones, torch.zeros_like(ones)
    valid, diagonal, full = causal_block_maps(q_len, kv_len, block, device)
    return valid, full, diagonal


@register(
    "seer",
    kind="dynamic",
    description="SeerAttention gate: pooled Q (avg) / K (max+min), per-head linear maps, block softmax; top-k or threshold",
    paper="Gao et al. 2024, SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs (arXiv 2410.13276)",
)
class SeerGate(PaddedPattern, nn.Module):
    """Learned block gate (see module docstring).

    Args:
        block: tile size (queries and keys), official 64.
        topk: keep this many key blocks per query block; or
        threshold: keep blocks with gate probability > threshold (default 2e-3 when neither is given).
        hidden: gate channels (official 128).
        heads, kv_heads, head_dim: create the linear maps now; otherwise on the first call (create
            the optimizer after that call).

    Parameters: ``q_weight [Hq, D, hidden]``, ``k_weight [Hkv, 2D, hidden]``.
    """

    name = "seer"
    content_based = True

    def __init__(
        self,
        block: int = 64,
        topk: Optional[int] = None,
        threshold: Optional[float] = None,
        hidden: int = DEFAULT_HIDDEN,
        heads: Optional[int] = None,
        kv_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
    ):
        nn.Module.__init__(self)
        check_int("seer", "block", block, 1)
        check_int("seer", "topk", topk, 1, allow_none=True)
        if topk is not None and threshold is not None:
            raise ValueError("seer: give exactly one of topk and threshold, got both")
        if threshold is not None:
            check_float("seer", "threshold", threshold, 0.0, 1.0, high_open=True)
        check_int("seer", "hidden", hidden, 1)
        for name, val in (("heads", heads), ("kv_heads", kv_heads), ("head_dim", head_dim)):
            check_int("seer", name, val, 1, allow_none=True)
        if (heads is None) != (head_dim is None):
            raise ValueError("seer: give both heads and head_dim (to create the gate now) or neither")
        kv = heads if kv_heads is None else kv_heads
        if heads is not None and heads % kv:
            raise ValueError(f"seer: heads={heads} must be a multiple of kv_heads={kv}")
        self.block, self.topk, self.threshold, self.hidden = block, topk, threshold, hidden
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.register_parameter("q_weight", None)
        self.register_parameter("k_weight", None)
        if heads is not None:
            self._create(heads, kv, head_dim, torch.device("cpu"), torch.float32)

    @property
    def effective_threshold(self) -> Optional[float]:
        return DEFAULT_THRESHOLD if self.topk is None and self.threshold is None else self.threshold

    # ------------------------------------------------------------------ parameters
    def _create(self, hq: int, hkv: int, d: int, device, dtype) -> None:
        wq = torch.empty(hq, d, self.hidden, device=device, dtype=dtype)
        wk = torch.empty(hkv, 2 * d, self.hidden, device=device, dtype=dtype)
        for w in (wq, wk):  # xavier per head: fan_in = input channels, fan_out = hidden
            bound = math.sqrt(6.0 / (w.shape[1] + w.shape[2]))
            nn.init.uniform_(w, -bound, bound)
        self.q_weight = nn.Parameter(wq)
        self.k_weight = nn.Parameter(wk)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        qk, kk = prefix + "q_weight", prefix + "k_weight"
        if self.q_weight is None and qk in state_dict and kk in state_dict:
            hq, d, _ = state_dict[qk].shape
            self._create(hq, state_dict[kk].shape[0], d, state_dict[qk].device, state_dict[qk].dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check_params(self, q: Tensor, k: Tensor) -> None:
        hq, hkv, d = q.shape[1], k.shape[1], q.shape[3]
        if self.q_weight is None:
            self._create(hq, hkv, d, q.device, torch.float32)
        if tuple(self.q_weight.shape[:2]) != (hq, d) or tuple(self.k_weight.shape[:2]) != (hkv, 2 * d):
            raise ValueError(
                f"seer: the gate is for {self.q_weight.shape[0]} query / {self.k_weight.shape[0]} key heads of dim "
                f"{self.q_weight.shape[1]}, but q has {hq} heads, k {hkv} heads, dim {d}"
            )

    # ------------------------------------------------------------------ gate
    def gate_logits(
        self, q: Tensor, k: Tensor, causal: bool = False, key_padding_mask: Optional[Tensor] = None
    ) -> Tensor:
        """Block logits ``[B, Hq, NQB, NKB]`` (fp32 or fp64), ``-inf`` on blocks with no visible pair.

        Differentiable in the gate weights; ``q``, ``k`` of the frozen model are not detached here.
        ``key_padding_mask [B, Nk]`` (True = real): blocks pool their real tokens only (queries too
        when ``Nq == Nk``); key blocks without a real key get ``-inf``.
        """
        b, hq, hkv, nq, nk = check_qk(q, k)
        if not isinstance(causal, bool):
            raise TypeError(f"seer: causal must be a bool, got {causal!r}")
        self._check_params(q, k)
        dtype = torch.promote_types(q.dtype, torch.float32)
        real = real_tokens("seer", key_padding_mask, b, nk, k.device)
        if real is None:
            qmean, _, _ = block_pool(q.to(dtype), self.block)
            _, kmax, kmin = block_pool(k.to(dtype), self.block)
        else:
            qmean = masked_block_mean(q.to(dtype), self.block, query_tokens(real, nq, nk))[0]
            kmax, kmin, has_key = masked_block_extrema(k.to(dtype), self.block, real)
        qp = torch.einsum("bhnd,hdc->bhnc", qmean, self.q_weight.to(dtype))
        kp = torch.einsum("bhnd,hdc->bhnc", torch.cat([kmax, kmin], -1), self.k_weight.to(dtype))
        kp = kp.repeat_interleave(hq // hkv, dim=1)
        logits = qp @ kp.transpose(-1, -2) / math.sqrt(self.hidden)
        valid, _, _ = _block_visibility(nq, nk, self.block, causal, q.device)
        if real is not None:
            valid = valid & has_key[:, :, None, :]
        return logits.masked_fill(~valid, -math.inf)

    def gate(self, q: Tensor, k: Tensor, causal: bool = False, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """Gate probabilities: softmax of :meth:`gate_logits` over key blocks, ``[B, Hq, NQB, NKB]``."""
        return torch.softmax(self.gate_logits(q, k, causal, key_padding_mask), dim=-1)

    def block_map(
        self, q: Tensor, k: Tensor, causal: bool = False, key_padding_mask: Optional[Tensor] = None
    ) -> Tensor:
        """bool ``[B, Hq, NQB, NKB]``: the tiles kept at inference (top-k or threshold; causal diagonal forced)."""
        nq, nk = q.shape[2], k.shape[2]
        with torch.no_grad():
            logits = self.gate_logits(q, k, causal, key_padding_mask)
        valid, _, diagonal = _block_visibility(nq, nk, self.block, causal, q.device)
        if self.topk is not None:
            kk = min(self.topk, logits.shape[-1])
            idx = logits.topk(kk, dim=-1).indices
            keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, idx, True)
        else:
            keep = torch.softmax(logits, dim=-1) > self.effective_threshold
        has_key = ~torch.isneginf(logits)  # False on key blocks without a real key (key_padding_mask)
        return (keep | diagonal) & valid & has_key

    def layout(self, q: Tensor, k: Tensor, causal: bool = False, key_padding_mask: Optional[Tensor] = None) -> Layout:
        nq, nk = q.shape[2], k.shape[2]
        bm = self.block_map(q, k, causal, key_padding_mask)
        _, full, _ = _block_visibility(nq, nk, self.block, causal, q.device)
        if not causal:
            return Layout.from_block_map(bm, q_len=nq, kv_len=nk, block_q=self.block)
        return Layout.from_block_map(
            bm, q_len=nq, kv_len=nk, block_q=self.block, full_map=bm & full, mask_mod=causal_mask_mod(nq, nk)
        )


# --------------------------------------------------------------------------------- distillation


@torch.no_grad()
def seer_block_target(
    q: Tensor, k: Tensor, block: int, causal: bool = False, scale: Optional[float] = None, chunk_blocks: int = 8
) -> Tensor:
    """Distillation target ``[B, Hq, NQB, NKB]``: the softmax attention map max-pooled over
    ``block × block`` tiles, each row normalised to sum 1 (SeerAttention's ground truth).

    Computed ``chunk_blocks`` query blocks at a time (memory ``O(chunk_blocks · block · Nk)``).
    """
    b, hq, hkv, nq, nk = check_qk(q, k)
    check_int("seer_block_target", "block", block, 1)
    check_int("seer_block_target", "chunk_blocks", chunk_blocks, 1)
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kx = k.to(dtype).repeat_interleave(hq // hkv, dim=1)
    nkb = -(-nk // block)
    rows = []
    for start in range(0, nq, chunk_blocks * block):
        stop = min(nq, start + chunk_blocks * block)
        logits = (q[:, :, start:stop].to(dtype) @ kx.transpose(-1, -2)) * scale
        if causal:
            pos = torch.arange(start, stop, device=q.device)[:, None] + (nk - nq)
            logits = logits.masked_fill(torch.arange(nk, device=q.device)[None, :] > pos, -math.inf)
        probs = torch.softmax(logits, dim=-1)  # every causal row sees key 0 at least (Nk >= Nq)
        probs = F.pad(probs, (0, nkb * block - nk)).view(b, hq, stop - start, nkb, block).amax(-1)
        nqb = -(-(stop - start) // block)
        probs = F.pad(probs, (0, 0, 0, nqb * block - (stop - start))).view(b, hq, nqb, block, nkb).amax(3)
        rows.append(probs)
    target = torch.cat(rows, 2)
    return target / target.sum(-1, keepdim=True)


def gate_kl(gate_logits: Tensor, target: Tensor) -> Tensor:
    """Mean over (batch, head, query block) of ``KL(target ‖ softmax(gate_logits))``."""
    logp = torch.log_softmax(gate_logits, dim=-1)
    kl = torch.special.xlogy(target, target) - target * logp.masked_fill(target == 0, 0.0)
    return kl.sum(-1).mean()


def distill_seer_gate(
    gate: SeerGate,
    q: Tensor,
    k: Tensor,
    steps: int = 100,
    lr: float = 1e-3,
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
) -> list[float]:
    """Train ``gate`` to predict the frozen attention of ``q [B, Hq, N, D]``, ``k [B, Hkv, N, D]``.

    ``q``/``k`` may also be lists of tensors (one batch per step, cycled). Adam (``lr``) unless an
    ``optimizer`` over the gate's parameters is given. Returns the loss of every step.
    """
    if not isinstance(gate, SeerGate):
        raise TypeError(f"distill_seer_gate: gate must be a SeerGate, got {type(gate).__name__}")
    check_int("distill_seer_gate", "steps", steps, 1)
    check_float("distill_seer_gate", "lr", lr, 0.0, math.inf, low_open=True)
    qs = list(q) if isinstance(q, (list, tuple)) else [q]
    ks = list(k) if isinstance(k, (list, tuple)) else [k]
    if len(qs) != len(ks):
        raise ValueError(f"distill_seer_gate: got {len(qs)} query batches and {len(ks)} key batches")
    qs, ks = [x.detach() for x in qs], [x.detach() for x in ks]  # the base model is frozen
    targets = [seer_block_target(a, b, gate.block, causal, scale) for a, b in zip(qs, ks)]
    gate._check_params(qs[0], ks[0])
    opt = optimizer if optimizer is not None else torch.optim.Adam(gate.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        i = step % len(qs)
        opt.zero_grad()
        loss = gate_kl(gate.gate_logits(qs[i], ks[i], causal), targets[i])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses
