"""Brute-force references of the decode-time selectors of :mod:`spattn.patterns` (Quest, Double
Sparsity) and of the page selections they produce.

Quest (Tang et al. 2024): the per-token page bounds and both official selection rules, read from the
official code (``evaluation/quest_attention.py`` and the kernel path ``controller.py``), for
``q [B, Hq, Nq, D]``, ``k [B, Hkv, Nk, D]`` -> bool ``[B, Hq, Nq, Nk]``, and the page rule the selector
follows. Double Sparsity (Yang et al. 2024): approximate scores on the chosen channels and the label
scores of a kv-head group for one decoding query. TidalDecode (Yang et al. 2025): the exact top
``budget`` keys. Row-wise rules return ``[B][H][Nq]`` sets of key positions.
"""

from __future__ import annotations

import math

import torch


def brute_page_dense(sel) -> torch.Tensor:
    """The token mask ``[B, H, Nq, Nk]`` of a PageSelection (``sel.pages [B, H, Nq, slots]`` page ids,
    -1 = unused; ``sel.page`` keys per page), causal rows cut at ``i'``: the unit Quest selects."""
    b, h, nq, _ = sel.pages.shape
    out = torch.zeros(b, h, nq, sel.kv_len, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for i in range(nq):
                last = i + sel.kv_len - nq if sel.causal else sel.kv_len - 1
                for p in sel.pages[bi, hi, i].tolist():
                    if p >= 0:
                        for t in range(p * sel.page, min((p + 1) * sel.page, sel.kv_len)):
                            out[bi, hi, i, t] = t <= last
    return out


def quest_token_bounds(q, k, page):
    """Per-token page bounds as the evaluation code builds them: ``sign(q) * k`` max-pooled over the
    page (chunk) and repeated for every token of it, scored with ``|q|``: ``[B, H, Nq, Nk]``."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    kk = k.repeat_interleave(hq // hkv, dim=1)
    out = torch.empty(b, hq, nq, nk, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            for i in range(nq):
                sign = torch.where(q[bi, h, i] > 0, 1.0, -1.0).double()
                for p0 in range(0, nk, page):
                    chunk_max = (kk[bi, h, p0 : p0 + page].double() * sign).amax(0)
                    out[bi, h, i, p0 : p0 + page] = (q[bi, h, i].double() * sign) @ chunk_max
    return out


def quest_evaluation_oracle(q, k, page, token_budget):
    """``evaluation/quest_attention.py`` for one decoding query: token budget capped at Nk, the
    per-token bounds padded with the dtype minimum to whole chunks, chunk maxima, the top
    ``min(max(3, budget // chunk), chunks)`` chunks, no page forced."""
    nk = k.shape[2]
    weights = quest_token_bounds(q, k, page)
    budget = min(nk, token_budget)
    pad = page - ((nk - 1) % page + 1)
    padded = torch.cat(
        [weights, torch.full((*weights.shape[:-1], pad), torch.finfo(torch.float64).min, dtype=torch.float64)], -1
    )
    chunk = padded.view(*weights.shape[:-1], -1, page).amax(-1)
    top = chunk.topk(min(max(3, budget // page), chunk.shape[-1]), dim=-1).indices
    keep = torch.zeros_like(chunk, dtype=torch.bool).scatter_(-1, top, True)
    return keep.repeat_interleave(page, -1)[..., :nk]


def quest_kernel_oracle(q, k, page, token_budget):
    """The kernel path (``controller.py``): ``page_budget = budget // page`` pages including the last
    one; dense when the cache has no more pages; otherwise the last page plus the top
    ``page_budget - 1`` of the other pages by the bound."""
    nk = k.shape[2]
    pages = -(-nk // page)
    page_budget = token_budget // page
    weights = quest_token_bounds(q, k, page)[..., ::page]  # one bound per page
    if pages <= page_budget:
        return torch.ones(*weights.shape[:-1], nk, dtype=torch.bool)
    top = weights[..., :-1].topk(page_budget - 1, dim=-1).indices
    keep = torch.zeros_like(weights, dtype=torch.bool).scatter_(-1, top, True)
    keep[..., -1] = True
    return keep.repeat_interleave(page, -1)[..., :nk]


def brute_group_label_scores(q, labels, channels):
    """Double Sparsity's group label scores: the max over a group's heads of ``q_h[channels_g] . labels_g``.
    ``q [B, Hq, D]`` (one decoding query), ``labels [B, Hkv, r, N]``, ``channels [Hkv, r]`` -> ``[B, Hkv, N]``."""
    b, hq, _ = q.shape
    hkv, r, n = labels.shape[1:]
    g = hq // hkv
    per_head = torch.stack([q[:, h][:, channels[h // g]] for h in range(hq)], 1)  # [B, Hq, r]
    s = torch.einsum("bhr,bhrn->bhn", per_head, labels.repeat_interleave(g, 1))
    return s.view(b, hkv, g, n).amax(2)


def last_visible(i, nq, nk, causal):
    """The last key query ``i`` may see: ``i' = i + Nk - Nq`` when causal, else ``Nk - 1``."""
    return i + nk - nq if causal else nk - 1


def brute_quest_rows(page_bound, b, hq, nq, nk, page, budget, causal):
    """Quest's kept keys per query, ``[B][Hq][Nq]`` sets: the query's own page plus the best other visible
    pages by ``page_bound(b, h, i) -> [P]`` up to ``ceil(budget / page)`` pages (all pages when the
    budget covers them), restricted to the keys the query may see."""
    pages = math.ceil(nk / page)
    n_keep = min(pages, max(1, -(-budget // page)))
    rows = [[[None] * nq for _ in range(hq)] for _ in range(b)]
    for bi in range(b):
        for h in range(hq):
            for i in range(nq):
                last = last_visible(i, nq, nk, causal)
                if n_keep * page >= nk:
                    want_pages = set(range(pages))
                else:
                    own = last // page
                    bound = page_bound(bi, h, i)
                    ranked = sorted(
                        (p for p in range(pages) if p * page <= last and p != own), key=lambda p: -bound[p].item()
                    )
                    want_pages = {own, *ranked[: n_keep - 1]}
                rows[bi][h][i] = {t for p in want_pages for t in range(p * page, min(nk, (p + 1) * page)) if t <= last}
    return rows


def brute_scores(q, k):
    """Exact scores ``q_h . k_{h // (Hq / Hkv)}`` head by head: ``[B, Hq, Nq, Nk]`` (TidalDecode's ranking)."""
    b, hq = q.shape[:2]
    g = hq // k.shape[1]
    return torch.stack([torch.stack([q[bi, h] @ k[bi, h // g].T for h in range(hq)]) for bi in range(b)])


def brute_double_sparsity_scores(q, k, channels):
    """Double Sparsity's approximate scores: query head ``h`` and its kv head compared on the head's
    ``channels[h]`` only. ``channels [Hq, r]`` -> ``[B, Hq, Nq, Nk]``."""
    b, hq = q.shape[:2]
    g = hq // k.shape[1]
    return torch.stack(
        [
            torch.stack([q[bi, h][:, channels[h]] @ k[bi, h // g][:, channels[h]].T for h in range(hq)])
            for bi in range(b)
        ]
    )


def brute_double_sparsity_group_scores(q, k, group_channels):
    """``group_tokens`` Double Sparsity: per kv head its ``group_channels[j]``, and for every query head of
    the group the max over the group's heads of their approximate scores: ``[B, Hq, Nq, Nk]``."""
    b, hq = q.shape[:2]
    g = hq // k.shape[1]

    def group_score(bi, h):
        ch = group_channels[h // g]
        approx = torch.stack([q[bi, j][:, ch] @ k[bi, h // g][:, ch].T for j in range((h // g) * g, (h // g + 1) * g)])
        return approx.amax(0)  # [Nq, Nk]

    return torch.stack([torch.stack([group_score(bi, h) for h in range(hq)]) for bi in range(b)])


def brute_budget_rows(scores, budget, causal):
    """Per query the ``budget`` visible keys of largest score (every visible key when ``budget >= Nk``):
    ``scores [B, H, Nq, Nk]`` -> ``[B][H][Nq]`` sets (Double Sparsity, TidalDecode)."""
    b, h, nq, nk = scores.shape
    rows = [[[None] * nq for _ in range(h)] for _ in range(b)]
    for bi in range(b):
        for hi in range(h):
            for i in range(nq):
                last = last_visible(i, nq, nk, causal)
                if budget >= nk:
                    rows[bi][hi][i] = set(range(last + 1))
                else:
                    rows[bi][hi][i] = set(scores[bi, hi, i, : last + 1].argsort(descending=True)[:budget].tolist())
    return rows
