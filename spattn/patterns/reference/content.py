"""Brute-force selections of the content-based patterns that rank scores: per-query top-k and top-p,
block top-k / block mass, BiFormer's region routing and SeerAttention's gate.

Each reference scores every allowed pair (or block) in float64 with plain loops and keeps what the
paper's rule keeps. Shapes: ``q [B, Hq, Nq, D]``, ``k [B, Hkv, Nk, D]`` (GQA: query head ``h`` reads kv
head ``h // (Hq / Hkv)``), ``kpm [B, Nk]`` bool (True = real key); the result is the bool mask
``[B, Hq, Nq, Nk]`` of selected pairs (BiFormer shared routing: ``[B, 1, N, N]``; the Seer gate:
block logits / block map ``[B, Hq, NQB, NKB]``).
"""

from __future__ import annotations

import math

import torch

from ._grid import visible as _visible


def brute_topk(q, k, kk, causal, ties, kpm=None):
    """Explicit Sparse Transformer (Zhao et al. 2019). Per query: the official rule (keep s >= k-th
    largest allowed score, ``ties="keep"``) or exactly k, lower index first (``ties="first"``)."""
    batch, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    out = torch.zeros(batch, hq, nq, nk, dtype=torch.bool)
    for b in range(batch):
        for h in range(hq):
            s = (q[b, h].double() @ k[b, h // (hq // hkv)].double().T).tolist()
            for i in range(nq):
                allowed = [j for j in range(nk) if _visible(i, j, nq, nk, causal) and (kpm is None or kpm[b, j])]
                ranked = sorted(allowed, key=lambda j: (-s[i][j], j))
                if ties == "first" or len(ranked) <= kk:
                    kept = ranked[:kk]
                else:
                    kth = s[i][ranked[kk - 1]]
                    kept = [j for j in allowed if s[i][j] >= kth]
                out[b, h, i, kept] = True
    return out


def brute_topp(q, k, p, causal, kpm=None, scale=None):
    """Top-p (Twilight, Lin et al. 2025). Per query: softmax (fp64) over the allowed keys, keys ranked
    by descending weight (lower index first), each kept while the weight ranked ahead of it is below p.
    With ``Nq == Nk`` a padded query (``kpm`` False) keeps no key."""
    batch, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(dim) if scale is None else scale
    out = torch.zeros(batch, hq, nq, nk, dtype=torch.bool)
    for b in range(batch):
        for h in range(hq):
            s = (q[b, h].double() @ k[b, h // (hq // hkv)].double().T * scale).tolist()
            for i in range(nq):
                if kpm is not None and nq == nk and not kpm[b, i]:
                    continue
                allowed = [j for j in range(nk) if _visible(i, j, nq, nk, causal) and (kpm is None or kpm[b, j])]
                if not allowed:
                    continue
                top = max(s[i][j] for j in allowed)
                w = {j: math.exp(s[i][j] - top) for j in allowed}
                total = sum(w.values())
                ahead = 0.0
                for j in sorted(allowed, key=lambda j: (-w[j], j)):
                    if ahead >= p and p < 1:
                        break
                    out[b, h, i, j] = True
                    ahead += w[j] / total
    return out


def _pool(x, block):
    n = x.shape[2]
    return torch.stack([x[:, :, s : s + block].double().mean(2) for s in range(0, n, block)], dim=2)


def _block_candidates(q, k, block, causal):
    """Brute-force (scores, allowed, forced) per (b, h, qb) as Python lists."""
    batch, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    qp, kp = _pool(q, block), _pool(k, block)
    nqb, nkb = qp.shape[2], kp.shape[2]
    for b in range(batch):
        for h in range(hq):
            s = qp[b, h] @ kp[b, h // (hq // hkv)].T
            for qb in range(nqb):
                queries = range(qb * block, min(nq, qb * block + block))
                allowed, forced = [], []
                for kb in range(nkb):
                    keys = range(kb * block, min(nk, kb * block + block))
                    if any(_visible(i, j, nq, nk, causal) for i in queries for j in keys):
                        allowed.append(kb)
                    if causal and any(j == i + nk - nq for i in queries for j in keys):
                        forced.append(kb)
                yield b, h, qb, s[qb].tolist(), allowed, forced


def _expand(keep, q, k, block, causal):
    batch, hq, nq, _ = q.shape
    nk = k.shape[2]
    dense = torch.zeros(batch, hq, nq, nk, dtype=torch.bool)
    for (b, h, qb), kbs in keep.items():
        for i in range(qb * block, min(nq, qb * block + block)):
            for kb in kbs:
                for j in range(kb * block, min(nk, kb * block + block)):
                    dense[b, h, i, j] = _visible(i, j, nq, nk, causal)
    return dense


def brute_block_topk(q, k, kk, block, causal):
    """Block top-k (MInference block-sparse, Jiang et al. 2024): per query block the ``kk`` key blocks of
    largest mean-pooled score, plus (causal) the blocks holding the diagonal."""
    keep = {}
    for b, h, qb, s, allowed, forced in _block_candidates(q, k, block, causal):
        ranked = sorted(allowed, key=lambda kb: (kb not in forced, -s[kb], kb))
        keep[b, h, qb] = set(ranked[:kk]) | set(forced)  # the diagonal is always kept
    return _expand(keep, q, k, block, causal)


def brute_block_mass(q, k, tau, block, causal):
    """Cumulative block mass (FlexPrefill, Lai et al. 2025): per query block the fewest key blocks, diagonal
    first then by pooled score, whose softmax (over the pooled scores / sqrt(D)) mass reaches ``tau``."""
    keep = {}
    d = q.shape[-1]
    for b, h, qb, s, allowed, forced in _block_candidates(q, k, block, causal):
        if not allowed:
            continue
        z = sum(math.exp(s[kb] / math.sqrt(d)) for kb in allowed)
        ranked = sorted(allowed, key=lambda kb: (kb not in forced, -s[kb], kb))
        kept, mass = [], 0.0
        for kb in ranked:
            if mass >= tau and kb not in forced:
                break
            kept.append(kb)
            mass += math.exp(s[kb] / math.sqrt(d)) / z
        keep[b, h, qb] = kept
    return _expand(keep, q, k, block, causal)


def brute_biformer(q, k, height, width, regions, topk, per_head):
    """BiFormer bi-level routing (Zhu et al. 2023), direct transcription: region of each (row, col) of the
    ``height x width`` grid, region means, affinity, top-k regions, union of their tokens.
    ``q [B, Hq, N, D]``, ``k [B, Hkv, N, D]`` with ``N = height * width`` -> ``[B, Hq | 1, N, N]``."""
    batch, hq, n, _ = q.shape
    hkv = k.shape[1]
    rh, rw = height // regions, width // regions
    region = [(t // width) // rh * regions + (t % width) // rw for t in range(n)]
    nreg = regions * regions
    tokens_of = [[t for t in range(n) if region[t] == r] for r in range(nreg)]
    heads_out = hq if per_head else 1
    dense = torch.zeros(batch, heads_out, n, n, dtype=torch.bool)
    for b in range(batch):
        aff = torch.zeros(hq, nreg, nreg, dtype=torch.float64)
        for h in range(hq):
            qr = torch.stack([q[b, h, tokens_of[r]].double().mean(0) for r in range(nreg)])
            kr = torch.stack([k[b, h // (hq // hkv), tokens_of[r]].double().mean(0) for r in range(nreg)])
            aff[h] = qr @ kr.T
        if not per_head:
            aff = aff.sum(0, keepdim=True)
        for h in range(heads_out):
            for r in range(nreg):
                row = aff[h, r].tolist()
                chosen = sorted(range(nreg), key=lambda s: (-row[s], s))[:topk]
                keys = [t for s in chosen for t in tokens_of[s]]
                for i in tokens_of[r]:
                    dense[b, h, i, keys] = True
    return dense


def token_blocks(n, block):
    """The positions of each block of ``block`` consecutive tokens (the last one may be shorter)."""
    return [list(range(s, min(n, s + block))) for s in range(0, n, block)]


def brute_seer_logits(gate, q, k, causal):
    """SeerAttention's gate (Gao et al. 2024) in loop form: mean-pooled queries and max/min-pooled keys
    per block, per-head projections ``gate.q_weight [Hq, D, hidden]``, ``gate.k_weight [Hkv, 2D, hidden]``,
    block logits ``[B, Hq, NQB, NKB]`` in float64 (-inf where the block is invisible)."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    qb, kb = token_blocks(nq, gate.block), token_blocks(nk, gate.block)
    out = torch.zeros(b, hq, len(qb), len(kb), dtype=torch.float64)
    wq, wk = gate.q_weight.double(), gate.k_weight.double()
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            for i, rows in enumerate(qb):
                qp = q[bi, h, rows].double().mean(0) @ wq[h]
                for j, cols in enumerate(kb):
                    keys = k[bi, kh, cols].double()
                    kp = torch.cat([keys.max(0).values, keys.min(0).values]) @ wk[kh]
                    visible = not causal or cols[0] <= rows[-1] + nk - nq
                    out[bi, h, i, j] = qp @ kp / math.sqrt(gate.hidden) if visible else -math.inf
    return out


def brute_seer_block_map(gate, q, k, causal):
    """SeerAttention's kept blocks ``[B, Hq, NQB, NKB]``: the gate's top-k blocks (``gate.topk``) or those
    whose gate probability exceeds ``gate.effective_threshold``, plus (causal) the diagonal blocks."""
    logits = brute_seer_logits(gate, q, k, causal)
    b, h, nqb, nkb = logits.shape
    nq, nk = q.shape[2], k.shape[2]
    qb, kb = token_blocks(nq, gate.block), token_blocks(nk, gate.block)
    keep = torch.zeros(b, h, nqb, nkb, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for i in range(nqb):
                row = logits[bi, hi, i]
                if gate.topk is not None:
                    chosen = sorted(range(nkb), key=lambda j: -row[j].item())[: gate.topk]
                else:
                    probs = torch.softmax(row, -1)
                    chosen = [j for j in range(nkb) if probs[j] > gate.effective_threshold]
                for j in chosen:
                    keep[bi, hi, i, j] = not math.isinf(row[j].item())
                if causal:  # diagonal: key blocks overlapping the block's aligned positions
                    lo, hi_pos = qb[i][0] + nk - nq, qb[i][-1] + nk - nq
                    for j, cols in enumerate(kb):
                        if cols[0] <= hi_pos and cols[-1] >= lo:
                            keep[bi, hi, i, j] = True
    return keep
