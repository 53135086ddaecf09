"""Key padding for content-based selectors (private helpers shared by the pattern modules).

Content-based selectors take ``key_padding_mask [B, N]`` (True = real token). In self-attention a
padded key position is also a padded query position, so the mask applies to queries when
``Nq == Nk``. Padded positions must not influence real tokens in any way: their values are replaced
by zeros before anything is computed (no arithmetic ever sees them, so not even ``0 * inf`` can
arise) and every statistic that pools or ranks tokens excludes them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "real_tokens",
    "query_tokens",
    "zero_padded",
    "masked_block_mean",
    "last_real_rows",
    "last_real_query_probs",
    "masked_block_extrema",
]


def real_tokens(owner: str, key_padding_mask: Optional[Tensor], batch: int, n: int, device) -> Optional[Tensor]:
    """Validated ``key_padding_mask`` ``[B, N]`` bool, or None when absent or when every token is real
    (the unpadded code path then runs unchanged)."""
    if key_padding_mask is None:
        return None
    if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
        what = key_padding_mask.dtype if isinstance(key_padding_mask, Tensor) else type(key_padding_mask).__name__
        raise TypeError(f"{owner}: key_padding_mask must be a bool tensor [B, Nk] (True = real key), got {what}")
    if tuple(key_padding_mask.shape) != (batch, n):
        raise ValueError(
            f"{owner}: key_padding_mask must have shape [B, Nk] = {(batch, n)}, got {tuple(key_padding_mask.shape)}"
        )
    if key_padding_mask.device != device:
        raise ValueError(f"{owner}: key_padding_mask is on {key_padding_mask.device} but k is on {device}")
    return None if bool(key_padding_mask.all()) else key_padding_mask


def query_tokens(real: Optional[Tensor], nq: int, nk: int) -> Optional[Tensor]:
    """The real queries ``[B, Nq]``: with ``Nq == Nk`` (self-attention) the key mask, else None.

    With fewer queries than keys (decoding, chunked prefill) the queries are the newest tokens,
    which a key padding mask of a batch never pads; their values are the caller's business."""
    return real if real is not None and nq == nk else None


def zero_padded(x: Tensor, real: Optional[Tensor]) -> Tensor:
    """``x [B, H, N, D]`` with padded positions (``real [B, N]`` False) set to zero."""
    if real is None:
        return x
    return torch.where(real[:, None, :, None], x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_block_mean(x: Tensor, block: int, real: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """Mean of ``x [B, H, N, D]`` over the real tokens of each block of ``block`` positions.

    Returns ``(mean [B, H, NB, D], has_real)`` with ``has_real [B, 1, NB]`` bool (None without
    padding); a block without a real token has mean zero. Without padding the last, partial
    block averages its positions, as everywhere else.
    """
    b, h, n, d = x.shape
    nb = -(-n // block)
    counts_real = torch.ones(1, n, dtype=x.dtype, device=x.device) if real is None else real.to(x.dtype)
    xs = zero_padded(x, real)
    sums = torch.nn.functional.pad(xs, (0, 0, 0, nb * block - n)).view(b, h, nb, block, d).sum(3)
    counts = torch.nn.functional.pad(counts_real, (0, nb * block - n)).view(-1, nb, block).sum(-1)  # [B|1, NB]
    mean = sums / counts.clamp(min=1)[:, None, :, None]
    return mean, (None if real is None else (counts > 0)[:, None, :])


def last_real_rows(real_q: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """Positions of the last ``rows`` real queries of each sequence, ``real_q [B, Nq]`` -> ``(idx, valid)``
    ``[B, rows]`` in position order; a sequence with fewer real queries has ``valid`` False on its last rows."""
    later = real_q.flip(-1).cumsum(-1).flip(-1)  # real queries at or after each position
    chosen = real_q & (later <= rows)
    idx = torch.argsort((~chosen).to(torch.int8), dim=-1, stable=True)[:, :rows]  # chosen first, by position
    valid = torch.arange(rows, device=real_q.device) < chosen.sum(-1, keepdim=True)
    return idx, valid


def last_real_query_probs(
    q: Tensor, k: Tensor, last: int, real: Tensor, scale: Optional[float] = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Causal attention of the last ``last`` *real* queries over the real keys (``real [B, Nk]``), fp32.

    The padded form of MInference's / FlexPrefill's last-query estimate: with ``Nq == Nk`` the mask
    also marks padded queries (otherwise every query is real). Returns ``(P [B, Hq, L, Nk],
    pos [B, L], valid [B, L], idx [B, L])``: ``idx`` the rows' query positions (in order), ``pos``
    their aligned key positions; invalid rows (a sequence with fewer real queries) have all-zero
    ``P`` and ``pos`` 0.
    """
    bsz, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    rows = min(last, nq)
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    real_q = query_tokens(real, nq, nk)
    if real_q is None:
        real_q = torch.ones(bsz, nq, dtype=torch.bool, device=q.device)
    idx, valid = last_real_rows(real_q, rows)
    q_last = torch.gather(zero_padded(q, real_q).float(), 2, idx[:, None, :, None].expand(bsz, hq, rows, dim))
    keys = zero_padded(k, real).float()
    if hq != hkv:
        keys = keys.repeat_interleave(hq // hkv, dim=1)
    logits = torch.matmul(q_last * scale, keys.transpose(-1, -2))
    pos = idx + (nk - nq)
    hidden = (torch.arange(nk, device=q.device) > pos[..., None]) | ~real[:, None, :]  # [B, L, Nk]
    logits.masked_fill_(hidden[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num_(nan=0.0)  # a row with no visible real key
    probs.masked_fill_(~valid[:, None, :, None], 0.0)
    return probs, pos.masked_fill(~valid, 0), valid, idx


def masked_block_extrema(x: Tensor, block: int, real: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Elementwise max and min of ``x [B, H, N, D]`` over the real tokens (``real [B, N]``) of each
    block of ``block`` positions: ``(hi, lo)`` ``[B, H, NB, D]`` (zero for a block without a real
    token) and ``has_real [B, 1, NB]``."""
    b, h, n, d = x.shape
    nb = -(-n // block)
    keep = torch.nn.functional.pad(real, (0, nb * block - n)).view(b, 1, nb, block, 1)
    tiles = torch.nn.functional.pad(x, (0, 0, 0, nb * block - n)).view(b, h, nb, block, d)
    has_real = keep.any(3)  # [B, 1, NB, 1]
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    hi = torch.where(has_real, tiles.masked_fill(~keep, -math.inf).amax(3), zero)
    lo = torch.where(has_real, tiles.masked_fill(~keep, math.inf).amin(3), zero)
    return hi, lo, has_real[..., 0]
