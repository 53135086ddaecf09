"""Page-sparse attention: each query attends to the visible tokens of its own set of key pages.

Executes a :class:`~spattn.selection.PageSelection` (Quest, Tang et al. 2024). The result is exactly
the token-sparse attention of :meth:`PageSelection.to_tokens`; what differs is how keys are fetched.
For inference with few queries (decoding: one query against a long KV cache) the tokens of the
selected pages are copied out of K and V with one row gather each, from a zero-copy view of the
cache's storage (slots past the end of the partial last page are masked); scores, softmax and the
weighted sum are two batched products. The cache itself is never copied. A single query per head
whose page set is shared by its GQA group runs, on CPU in float32/float64, as one compiled loop
(:mod:`spattn._compiled`) when it can be built.

Everything else (gradients, a key padding mask, many queries, K/V without a row-major layout) runs
on the token-sparse kernel over :meth:`PageSelection.to_tokens`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _compiled
from .._checks import check_kind
from ..selection import PageSelection
from .tokensparse import _compute_dtype, _row_view, tokensparse_attention

__all__ = ["pagesparse_attention"]

#: largest gathered ``[B, Hq, Nq, P*page, D]`` block (elements) the page path builds at once
PAGE_GATHER_BUDGET = 1 << 22


def _fast_path_applies(q: Tensor, k: Tensor, v: Tensor, sel: PageSelection, key_padding_mask) -> bool:
    if key_padding_mask is not None:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    b, hq, nq, d = q.shape
    return b * hq * nq * sel.pages.shape[-1] * sel.page * d <= PAGE_GATHER_BUDGET


def _pages_per_kv_head(sel: PageSelection, group: int) -> Tensor:
    """The page sets of a selection shared by each GQA group: ``[B', Hkv or 1, Nq, P]``."""
    return sel.pages if sel.heads == 1 else sel.pages[:, ::group]


def _page_tokens(pages: Tensor, page: int, nk: int) -> tuple[Tensor, Tensor]:
    """``pages [..., 1]`` -> token positions ``[..., page]`` and which of them exist: used slots, and
    not the part of the last page not yet written."""
    tokens = pages * page + torch.arange(page, device=pages.device)
    return tokens, (pages >= 0) & (tokens < nk)


def _shared_decode(q: Tensor, k: Tensor, v: Tensor, sel: PageSelection, scale: float):
    """One query per head, one page set per kv head: the compiled loop (:mod:`spattn._compiled`) reads each
    selected row once per group. Returns ``(out, lse)``, or None where it does not apply."""
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.float64) or not (q.dtype == k.dtype == v.dtype):
        return None
    if k.stride(3) != 1 or v.stride(3) != 1:
        return None
    ext = _compiled.ops()
    if ext is None:
        return None
    b, hq, _, d = q.shape
    hkv, nk, g = k.shape[1], k.shape[2], q.shape[1] // k.shape[1]
    pages = _pages_per_kv_head(sel, g).expand(b, hkv, 1, sel.pages.shape[-1])[:, :, 0]
    if sel.page == 1:  # one-token pages (grouped Double Sparsity): the pages are the rows
        rows = pages
    else:
        tokens, exists = _page_tokens(pages[..., None], sel.page, nk)
        rows = torch.where(exists, tokens, -1).flatten(-2)
    out, lse = ext.shared_rows_attention(q[:, :, 0], k, v, rows.contiguous(), scale)
    return out.view(b, hq, 1, d), lse.view(b, hq, 1).to(_compute_dtype(q.dtype))


def _page_attention(q: Tensor, k: Tensor, v: Tensor, sel: PageSelection, scale: float):
    """The page path; returns ``(out, lse)`` or None when K/V cannot be viewed as rows."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g, page = hq // hkv, sel.page
    # one page set per kv head when the query heads of a group share it (fetched once), else per query head
    shared = g > 1 and (sel.heads == 1 or sel.shared_by % g == 0)
    if shared and nq == 1:
        result = _shared_decode(q, k, v, sel, scale)
        if result is not None:
            return result
    k_rows, v_rows = _row_view(k), _row_view(v)
    if k_rows is None or v_rows is None or k.stride(1) != v.stride(1):
        return None
    cdt = _compute_dtype(q.dtype)
    slots = sel.pages.shape[-1]
    if shared:
        pages = _pages_per_kv_head(sel, g).expand(b, hkv, nq, slots).reshape(b, hkv, 1, nq, slots, 1)
    else:
        pages = sel.pages.expand(b, hq, nq, slots).reshape(b, hkv, g, nq, slots, 1)
    sets = pages.shape[2]
    tokens, keep = _page_tokens(pages, page, nk)  # [b, hkv, sets, nq, slots, page]
    if sel.causal and nq > 1:  # several causal queries see different prefixes
        keep = keep & (tokens <= sel.last_visible().view(1, 1, 1, nq, 1, 1))
    # every selected token is one row of K / V; masked slots read a valid row and are ignored
    head_offset = torch.arange(b * hkv, device=q.device).view(b, hkv, 1, 1, 1, 1) * (k.stride(1) // d)
    rows = (tokens.clamp(0, nk - 1) + head_offset).flatten()
    width = slots * page
    kg = k_rows.index_select(0, rows).view(b, hkv, sets, nq, width, d).to(cdt)
    vg = v_rows.index_select(0, rows).view(b, hkv, sets, nq, width, d).to(cdt)
    qs = (q.to(cdt) * scale).view(b, hkv, g, nq, d)
    if shared:  # the group's queries are the rows of one product per (kv head, query position)
        scores = torch.matmul(qs.transpose(2, 3), kg[:, :, 0].transpose(-1, -2)).transpose(2, 3)
    else:
        scores = torch.matmul(qs.unsqueeze(-2), kg.transpose(-1, -2)).squeeze(-2)
    # scores: [b, hkv, g, nq, width]
    keep = keep.flatten(-2)
    if not bool(keep.all()):
        scores = scores.masked_fill(~keep, float("-inf"))
        # 0 · NaN is NaN: a masked slot's value row must not be read at all
        vg = vg.masked_fill(~keep[..., None], 0.0)
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(scores - safe[..., None])  # exactly 0 where masked and on rows without keys
    if shared:
        out = torch.matmul(p.transpose(2, 3), vg[:, :, 0]).transpose(2, 3)
    else:
        out = torch.matmul(p.unsqueeze(-2), vg).squeeze(-2)
    return out.reshape(b, hq, nq, d).to(q.dtype), lse.view(b, hq, nq)


def pagesparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    selection: PageSelection,
    *,
    scale: Optional[float] = None,
    key_padding_mask: Optional[Tensor] = None,
    return_lse: bool = False,
    softcap: Optional[float] = None,
):
    """Softmax attention of each query over the visible tokens of its selected pages.

    q ``[B, Hq, Nq, D]``, k/v ``[B, Hkv, Nk, D]`` (query head ``h`` reads kv head ``h // (Hq/Hkv)``);
    ``selection`` a :class:`PageSelection` for ``(Nq, Nk)``. Returns ``out [B, Hq, Nq, D]`` and, if
    asked, ``lse [B, Hq, Nq]`` (float32, float64 for float64 inputs; ``-inf`` and zeros for queries
    without keys). Differentiable (through the token-sparse kernel when gradients are needed).
    ``softcap`` (scaled scores ``s`` -> ``softcap * tanh(s / softcap)``) runs on the token-sparse kernel.
    """
    check_kind("pagesparse_attention: selection", selection, PageSelection)
    if (selection.q_len, selection.kv_len) != (q.shape[2], k.shape[2]):
        raise ValueError(
            f"pagesparse_attention: selection is for (Nq, Nk) = {(selection.q_len, selection.kv_len)} "
            f"but q, k have {(q.shape[2], k.shape[2])}"
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if softcap is None and _fast_path_applies(q, k, v, selection, key_padding_mask):
        # reads only the selected rows and zeroes the values of masked slots, so NaN reaches exactly the
        # rows that select it (no isnan pass over the whole cache per decoding step)
        result = _page_attention(q, k, v, selection, scale)
        if result is not None:
            out, lse = result
            return (out, lse) if return_lse else out
    return tokensparse_attention(
        q,
        k,
        v,
        selection.to_tokens(),
        scale=scale,
        key_padding_mask=key_padding_mask,
        return_lse=return_lse,
        softcap=softcap,
    )
