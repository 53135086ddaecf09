"""Pieces of SeqBoat's gated attention unit: token compression and local attention with relative bias.

* :func:`compress` / :func:`extract` (Ren et al. 2023, "Sparse Modular Activation"): the tokens a
  router activates are packed to the front of a shorter sequence (slot ``act * cumsum(act)``,
  1-based, slot 0 collects the inactive tokens and is dropped) and results are scattered back,
  inactive tokens receiving zeros.
* :class:`RelativeBias`: Mega's simple learned bias ``b[clamp(j - i)]`` over *original* token
  positions, clipped to ``+-(max_positions - 1)``.
* :func:`local_attention`: exact window ``|i - j| <= w`` (causal ``0 <= i - j <= w``) over the
  compressed indices, computed in chunks of ``w`` with one chunk of look-back (and look-ahead when
  not causal): ``O(L * w)``. Scores ``q.k + bias(pos_i, pos_j)``; ``"softmax"`` or ``"relu2"``
  (``relu(score)^2``, masked entries 0) as in Mega/SeqBoat.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import int_at_least

__all__ = ["compress", "extract", "RelativeBias", "local_attention", "ATTENTION_FUNCTIONS"]

ATTENTION_FUNCTIONS = ("softmax", "relu2")


def compress(x: Tensor, slot: Tensor, length: int) -> Tensor:
    """Pack rows of ``x [B, N, ...]`` with ``slot [B, N]`` (1-based, 0 = dropped) into ``[B, length, ...]``."""
    B, N = slot.shape
    idx = slot.view(B, N, *([1] * (x.dim() - 2))).expand_as(x)
    out = x.new_zeros(B, length + 1, *x.shape[2:]).scatter(1, idx, x)
    return out[:, 1:]


def extract(h: Tensor, slot: Tensor) -> Tensor:
    """Inverse of :func:`compress`: ``h [B, L, ...]`` -> ``[B, N, ...]``, zeros where ``slot == 0``."""
    B, N = slot.shape
    padded = torch.cat([h.new_zeros(B, 1, *h.shape[2:]), h], 1)
    idx = slot.view(B, N, *([1] * (h.dim() - 2))).expand(B, N, *h.shape[2:])
    return torch.gather(padded, 1, idx)


class RelativeBias(nn.Module):
    """Learned scalar bias per relative distance ``j - i``, clipped to ``+-(max_positions - 1)``."""

    def __init__(self, max_positions: int):
        super().__init__()
        self.max_positions = int_at_least("RelativeBias: max_positions", max_positions)
        self.table = nn.Parameter(torch.empty(2 * max_positions - 1))
        nn.init.trunc_normal_(self.table, std=0.02, a=-0.04, b=0.04)

    def forward(self, pos_q: Tensor, pos_k: Tensor) -> Tensor:
        """Bias for broadcastable integer position tensors ``pos_q``, ``pos_k``."""
        m = self.max_positions - 1
        return self.table[(pos_k - pos_q).clamp(-m, m) + m]


def _look_around(x: Tensor, back: int, ahead: int, fill) -> Tensor:
    """``x [B, C, w, ...]`` -> ``[B, C, (back + 1 + ahead) * w, ...]``: neighbouring chunks concatenated."""
    pad = [0, 0] * (x.dim() - 2) + [back, ahead]
    padded = F.pad(x, pad, value=fill)
    C = x.shape[1]
    return torch.cat([padded[:, i : i + C] for i in range(back + 1 + ahead)], dim=2)


def local_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    valid: Tensor,
    pos: Tensor,
    bias: nn.Module,
    window: int,
    causal: bool,
    fn: str = "softmax",
) -> Tensor:
    """Exact-window attention on a (compressed) sequence.

    ``q, k [B, L, Z]`` (already scaled), ``v [B, L, E]``, ``valid`` bool ``[B, L]`` (False = padding
    slot), ``pos [B, L]`` original positions for the relative bias. Returns ``[B, L, E]``; rows with
    no valid key give zeros.
    """
    if fn not in ATTENTION_FUNCTIONS:
        raise ValueError(f"local_attention: fn must be one of {ATTENTION_FUNCTIONS}, got {fn!r}")
    B, L, Z = q.shape
    w = window
    C = -(-L // w)
    pad = C * w - L
    qc, kc, vc = (F.pad(t, (0, 0, 0, pad)).view(B, C, w, t.shape[-1]) for t in (q, k, v))
    idx = torch.arange(C * w, device=q.device).view(1, C, w).expand(B, C, w)
    valid_c = F.pad(valid, (0, pad), value=False).view(B, C, w)
    pos_c = F.pad(pos, (0, pad)).view(B, C, w)
    ahead = 0 if causal else 1
    kk, vv = _look_around(kc, 1, ahead, 0.0), _look_around(vc, 1, ahead, 0.0)
    kidx = _look_around(idx, 1, ahead, -10 * (w + 1))  # far away: never inside the window
    kvalid = _look_around(valid_c, 1, ahead, False)
    kpos = _look_around(pos_c, 1, ahead, 0)
    d = idx.unsqueeze(-1) - kidx.unsqueeze(-2)  # [B, C, w, K]: compressed distance i - j
    ok = (d <= w) & (d >= (0 if causal else -w)) & kvalid.unsqueeze(-2)
    scores = qc @ kk.transpose(-1, -2) + bias(pos_c.unsqueeze(-1), kpos.unsqueeze(-2)).to(q.dtype)
    if fn == "softmax":
        empty = ~ok.any(-1, keepdim=True)
        scores = scores.masked_fill(~ok | empty, float("-inf")).masked_fill(empty, 0.0)
        attn = torch.softmax(scores, -1).masked_fill(empty, 0.0)
    else:
        attn = F.relu(scores).square() * ok.to(scores.dtype)
    return (attn @ vv).reshape(B, C * w, -1)[:, :L]
