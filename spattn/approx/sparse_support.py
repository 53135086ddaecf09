"""Products restricted to a Layout's support, for scores that are not softmax logits.

Scatterbrain needs ``sum_{j in S_i} (phi(q_i) . phi(k_j)) w_j`` over exactly the pairs a sparse
pattern computes (to remove the low-rank estimate there). The softmax kernels cannot produce that
(their scores are exponentiated dot products), so this gathers, per query block, the key blocks
and extra columns the Layout lists and evaluates :meth:`Layout.contains` on them: memory and time
grow with the computed pairs (``N * slots * block * M``), never N x N.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layout import Layout

__all__ = ["support_bilinear"]


def support_bilinear(
    layout: Layout, a: Tensor, b: Tensor, w: Tensor, key_padding_mask: Optional[Tensor] = None
) -> Tensor:
    """``out_i = sum_{j in S_i} (a_i . b_j) w_j`` with ``S_i`` the keys ``layout`` computes for query ``i``.

    ``a [B, H, Nq, M]``, ``b [B, H, Nk, M]``, ``w [B, H, Nk, E]`` (same heads: expand GQA first),
    ``key_padding_mask`` bool ``[B, Nk]`` (True = real) removes padded keys. Returns ``[B, H, Nq, E]``.
    """
    B, H, nq, M = a.shape
    nk, E = b.shape[2], w.shape[-1]
    if layout.q_len != nq or layout.kv_len != nk:
        raise ValueError(f"support_bilinear: layout is for ({layout.q_len}, {layout.kv_len}), inputs ({nq}, {nk})")
    bq, bk = layout.block_q, layout.block_k
    nqb, slots = layout.num_q_blocks, layout.kv_indices.shape[-1]
    dev = a.device
    # key positions per query block: every token of each listed key block, then the extra columns
    pos = (layout.kv_indices.unsqueeze(-1) * bk + torch.arange(bk, device=dev)).flatten(-2)  # [B',H',NQB,S*bk]
    ok = (torch.arange(slots, device=dev) < layout.kv_num_blocks.unsqueeze(-1)).repeat_interleave(bk, -1)
    if layout.has_columns:
        cols = layout.col_indices
        pos = torch.cat([pos, cols], -1)
        ok = torch.cat([ok, torch.arange(cols.shape[-1], device=dev) < layout.col_num.unsqueeze(-1)], -1)
    ok = ok & (pos < nk)
    pos = pos.clamp(max=nk - 1)
    K = pos.shape[-1]
    qpos = torch.arange(nqb * bq, device=dev).view(nqb, bq, 1)  # [NQB, bq, 1]
    bidx = torch.arange(pos.shape[0], device=dev).view(-1, 1, 1, 1, 1)
    hidx = torch.arange(pos.shape[1], device=dev).view(1, -1, 1, 1, 1)
    member = layout.contains(bidx, hidx, qpos, pos.unsqueeze(-2)) & ok.unsqueeze(-2)  # [B',H',NQB,bq,K]
    member = member.expand(B, H, nqb, bq, K)
    if key_padding_mask is not None:
        hp = pos.shape[1]
        real = torch.gather(
            key_padding_mask[:, None, None, :].expand(B, hp, nqb, nk), -1, pos.expand(B, hp, nqb, K)
        )  # [B, H', NQB, K]
        member = member & real.unsqueeze(-2)
    flat = pos.expand(B, H, nqb, K).reshape(B, H, nqb * K, 1)
    bg = torch.gather(b, 2, flat.expand(-1, -1, -1, M)).view(B, H, nqb, K, M)
    wg = torch.gather(w, 2, flat.expand(-1, -1, -1, E)).view(B, H, nqb, K, E)
    ab = F.pad(a, (0, 0, 0, nqb * bq - nq)).view(B, H, nqb, bq, M)
    scores = (ab @ bg.transpose(-1, -2)) * member.to(a.dtype)
    return (scores @ wg).reshape(B, H, nqb * bq, E)[:, :, :nq]
