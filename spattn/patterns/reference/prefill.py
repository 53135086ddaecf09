"""Brute-force selections of the prefill selectors of :mod:`spattn.patterns`: XAttention's antidiagonal
scores and threshold rule, MInference's vertical-slash and block-sparse patterns, FlexPrefill's
query-aware / vertical-slash blocks.

Each is written with plain loops / dense NumPy from the full attention matrix, never from the
selectors' helpers. Shapes: ``q [B, Hq, Nq, D]``, ``k [B, Hkv, Nk, D]`` (GQA: kv heads repeated to the
query heads); block maps are bool ``[B, Hq, NQB, NKB]`` (expand them with ``expand_blocks``), token
masks ``[B, Hq, Nq, Nk]``. Query ``i`` sits at key position ``i' = i + Nk - Nq``.
Papers: XAttention (Xu et al. 2025), MInference 1.0 (Jiang et al. 2024), FlexPrefill (Lai et al. 2025).
"""

from __future__ import annotations

import math

import numpy as np

from ._grid import block_geometry, full_probs, np_heads, pick


def xattn_brute_scores(q, k, stride, block, causal):
    """XAttention block scores ``[B, Hq, NQB, NKB]``: per stride row ``i``, a softmax over the explicit
    antidiagonal sums of its ``stride x stride`` tiles (/ sqrt(D) / stride), summed into the blocks."""
    qn, kn = np_heads(q, k)
    bsz, hq, nq, dim = qn.shape
    nk = kn.shape[2]
    s, off = stride, nk - nq
    nqb, nkb = -(-nq // block), -(-nk // block)
    rows, cols = nqb * block // s, nkb * block // s
    out = np.zeros((bsz, hq, nqb, nkb))
    for b in range(bsz):
        for h in range(hq):
            for i in range(rows):
                if i * s >= nq:
                    continue
                logits = np.full(cols, -np.inf)
                for j in range(cols):
                    if j * s >= nk or (causal and j * s > min(i * s + s - 1, nq - 1) + off):
                        continue
                    acc = 0.0  # explicit antidiagonal of the s x s tile (i, j)
                    for t in range(s):
                        qi, kj = i * s + s - 1 - t, j * s + t
                        if qi < nq and kj < nk:
                            acc += qn[b, h, qi] @ kn[b, h, kj]
                    logits[j] = acc / (math.sqrt(dim) * s)
                if not np.isfinite(logits).any():  # more queries than keys: this row sees none yet
                    continue
                p = np.exp(logits - logits.max())
                p /= p.sum()
                for j in range(cols):
                    out[b, h, i * s // block, j * s // block] += p[j]
    return out


def xattn_brute_select(scores, nq, nk, block, tau, causal):
    """XAttention's fewest-blocks rule: per query block the forced blocks (block 0 and the diagonal), then
    the other visible blocks by descending score until their mass reaches ``tau`` of the row's total."""
    p0, p1, k0, k1 = block_geometry(nq, nk, block)
    sel = np.zeros(scores.shape, dtype=bool)
    for idx in np.ndindex(*scores.shape[:3]):
        qb = idx[2]
        row = scores[idx]
        valid = [(not causal) or k0[kb] <= p1[qb] for kb in range(len(k0))]
        forced = [valid[kb] and (kb == 0 or (k0[kb] <= p1[qb] and k1[kb] >= p0[qb])) for kb in range(len(k0))]
        total = sum(row[kb] for kb in range(len(k0)) if valid[kb])
        mass = sum(row[kb] for kb in range(len(k0)) if forced[kb])
        others = sorted((kb for kb in range(len(k0)) if valid[kb] and not forced[kb]), key=lambda kb: (-row[kb], kb))
        for kb in range(len(k0)):
            sel[idx + (kb,)] = forced[kb]
        for kb in others:
            if mass < tau * total:
                sel[idx + (kb,)] = True
                mass += row[kb]
    return sel


def official_find_blocks(scores, tau, causal, chunk_blocks):
    """The official ``find_blocks_chunked`` (threshold mode, prefill) written out with loops, applied
    chunk by chunk as ``xattn_estimate`` does for ``Nq == Nk`` (``current_index`` = first query block
    of the chunk), followed by its block-causal clip. ``scores [..., NQB, NKB]``."""
    nqb, nkb = scores.shape[-2:]
    out = np.zeros(scores.shape, dtype=bool)
    for idx in np.ndindex(*scores.shape[:-2]):
        for c0 in range(0, nqb, chunk_blocks):
            current = c0  # k_block_num - q_block_num + chunk_idx * num_blocks_per_chunk, with Nq == Nk
            for r in range(min(chunk_blocks, nqb - c0)):
                row = np.array(scores[idx + (c0 + r,)], dtype=np.float64)
                if causal:
                    row[c0 + r + 1 :] = 0.0  # the estimate's causal softmax gives future blocks nothing
                required = row.sum() * tau
                mask = np.zeros(nkb, dtype=bool)
                if causal:
                    mask[0] = True
                    for col in range(current, min(current + chunk_blocks, nkb)):  # eye(chunk) overwrites
                        mask[col] = (col - current) == r
                    other = np.where(mask, 0.0, row)
                    other_sorted = sorted(other, reverse=True)
                    forced_sum = row[mask].sum()
                    sorted_values = [0.0, forced_sum] + other_sorted[:-2]
                    key = np.where(mask, 100000 * (1 + row), row)
                    index = sorted(range(nkb), key=lambda j: (-key[j], j))
                    cum = np.cumsum([0.0] + sorted_values[:-1])
                else:
                    index = sorted(range(nkb), key=lambda j: (-row[j], j))
                    cum = np.cumsum([0.0] + [row[j] for j in index][:-1])
                for t in range(nkb):
                    mask[index[t] if cum[t] < required else 0] = True
                if causal:
                    mask[c0 + r + 1 :] = False  # the tril on the last q_block_num square
                out[idx + (c0 + r,)] = mask
    return out


def brute_vertical_slash_scores(q, k, last_q):
    """MInference vertical / slash scores ``[B, Hq, Nk]`` from the last ``last_q`` queries' causal
    probabilities: column sums, and sums along each diagonal (indexed by its offset ``i' - j``)."""
    probs = full_probs(q, k)
    nq, nk = probs.shape[-2:]
    rows = min(last_q, nq)
    vert = probs[:, :, nq - rows :].sum(2)
    slash = np.zeros(vert.shape)
    for r in range(nq - rows, nq):
        pos = r + nk - nq
        for j in range(pos + 1):
            slash[:, :, pos - j] += probs[:, :, r, j]
    return vert, slash


def official_slash_blocks(last, block):
    """Block-diagonal slash scores as the official FlexPrefill code builds them (``get_active_blocks``):
    ``sum_all_diagonal_matrix`` indexes a diagonal by the key where it meets the last query row
    (``i = Nk - 1 - d``), ``torch_bhn_sumpool`` pools those indices from 0 in groups of ``block``
    (zero-padded at the end), and group ``c`` selects the block diagonal ``δ = NKB - 1 - c``."""
    rows, nk = last.shape
    nkb = -(-nk // block)
    by_key = np.zeros(nkb * block)
    for i in range(nk):  # mat_padded columns: pad (rows - 1) zeros on the left
        for r in range(rows):
            j = i + r - (rows - 1)
            if j >= 0:
                by_key[i] += last[r, j] / rows
    pooled = by_key.reshape(nkb, block).sum(-1)
    return np.array([pooled[nkb - 1 - delta] for delta in range(nkb)])


def brute_flexprefill_blocks(q, k, gamma, tau, block, align="end"):
    """FlexPrefill's block map ``[B, Hq, NQB, NKB]`` and query-aware flags ``[B, Hq]``: the sqrt JS
    divergence between the pooled estimate and the true vertical block distribution picks query-aware
    heads (top blocks up to ``gamma * NQB`` of pooled mass) or vertical-slash heads (blocks covering
    ``gamma`` of the last block's vertical / slash mass), plus the diagonal. ``align``: slash blocks
    grouped as the official code does (``"end"``) or from offset 0 (``"start"``)."""
    qn, kn = np_heads(q, k)
    bsz, hq, nq, dim = qn.shape
    nk = kn.shape[2]
    probs = full_probs(q, k)
    rows = min(block, nq)
    p0, p1, k0, k1 = block_geometry(nq, nk, block)
    nqb, nkb = len(p0), len(k0)
    out = np.zeros((bsz, hq, nqb, nkb), dtype=bool)
    aware = np.zeros((bsz, hq), dtype=bool)
    for b in range(bsz):
        for h in range(hq):
            last = probs[b, h, nq - rows :]
            a_v = last.mean(0)
            a_s = np.zeros(nk)
            for r in range(rows):
                pos = nk - rows + r
                for j in range(pos + 1):
                    a_s[pos - j] += last[r, j] / rows

            def cover(x):
                return int((np.cumsum(np.sort(x)[::-1]) <= gamma).sum()) + 1

            v_blk = np.array([a_v[kb * block : (kb + 1) * block].sum() for kb in range(nkb)])
            if align == "start":
                s_blk = np.array([a_s[d * block : (d + 1) * block].sum() for d in range(nkb)])
            else:
                s_blk = official_slash_blocks(last, block)
            kbar = np.stack([kn[b, h, kb * block : (kb + 1) * block].mean(0) for kb in range(nkb)])
            logit = (qn[b, h, nq - rows :].mean(0) / math.sqrt(dim)) @ kbar.T
            a_hat = np.exp(logit - logit.max())
            a_hat /= a_hat.sum()
            m = (a_hat + v_blk) / 2
            kl = lambda x: sum(xi * math.log(xi / mi) for xi, mi in zip(x, m) if xi > 0)
            aware[b, h] = math.sqrt(max(0.5 * kl(a_hat) + 0.5 * kl(v_blk), 0)) < tau
            n_v = 1 if aware[b, h] else min(max(cover(a_v) // block + 1, 1), nkb)
            n_s = 1 if aware[b, h] else min(max(cover(a_s) // block + 1, 1), nkb)
            vs = pick(v_blk, n_v, 1)
            ss = pick(s_blk, n_s, 1)
            for qb in range(nqb):
                for kb in range(nkb):
                    delta = p1[qb] // block - kb
                    diag = k0[kb] <= p1[qb] and k1[kb] >= p0[qb]
                    out[b, h, qb, kb] = kb in vs or (delta >= 0 and delta in ss) or diag
            if aware[b, h]:
                qbar = np.stack([qn[b, h, qb * block : (qb + 1) * block].mean(0) for qb in range(nqb)]) / math.sqrt(dim)
                sc = qbar @ kbar.T
                sc = np.where(np.array(k0)[None, :] <= np.array(p1)[:, None], sc, -np.inf)
                pm = np.exp(sc - sc.max(-1, keepdims=True))
                pm /= pm.sum(-1, keepdims=True)
                flat = pm.reshape(-1)
                order = sorted(range(flat.size), key=lambda x: (-flat[x], x))
                acc = 0.0
                for x in order:
                    acc += flat[x]
                    if acc > gamma * nqb:
                        break
                    out[b, h, x // nkb, x % nkb] = True
    return out, aware


def brute_vertical_slash(vert, slash, nq, nk, vertical, slash_count, sinks, local):
    """MInference vertical-slash token mask ``[Nq, Nk]`` of one head from its scores ``vert, slash [Nk]``:
    the top ``vertical`` columns (the first ``sinks`` forced) and the top ``slash_count`` diagonals (the
    ``local`` nearest forced), causal."""
    i = np.arange(nq)[:, None] + nk - nq
    j = np.arange(nk)[None, :]
    vs = pick(vert, vertical, sinks)
    ss = pick(slash, slash_count, local)
    return (j <= i) & (np.isin(j, list(vs)) | np.isin(i - j, list(ss)))


def brute_vertical_slash_tiles(vert, slash, nq, nk, vertical, slash_count, sinks, local, block):
    """``whole_tiles`` vertical-slash of one head ``[Nq, Nk]``: the verticals as above, and every
    ``block x block`` tile crossed by a selected slash (a causal pair of the tile on that diagonal)
    attended whole, causal inside."""
    i = np.arange(nq)[:, None] + nk - nq
    j = np.arange(nk)[None, :]
    causal = j <= i
    vs = pick(vert, vertical, sinks)
    ss = pick(slash, slash_count, local)
    on_slash = causal & np.isin(i - j, list(ss))
    tiles = np.zeros_like(on_slash)
    for qb in range(0, nq, block):
        for kb in range(0, nk, block):
            tiles[qb : qb + block, kb : kb + block] = on_slash[qb : qb + block, kb : kb + block].any()
    return causal & (np.isin(j, list(vs)) | tiles)


def brute_minference_block(q, k, topk, block, causal):
    """MInference block-sparse: per query block the ``topk`` visible key blocks by the score of the
    mean-pooled query and key blocks (ties -> lower block): ``[B, Hq, NQB, NKB]``."""
    qn, kn = np_heads(q, k)
    bsz, hq, nq, _ = qn.shape
    nk = kn.shape[2]
    p0, p1, k0, _ = block_geometry(nq, nk, block)
    nqb, nkb = len(p0), len(k0)
    sel = np.zeros((bsz, hq, nqb, nkb), dtype=bool)
    for b in range(bsz):
        for h in range(hq):
            for qb in range(nqb):
                qbar = qn[b, h, qb * block : (qb + 1) * block].mean(0)
                scores = [qbar @ kn[b, h, kb * block : (kb + 1) * block].mean(0) for kb in range(nkb)]
                cand = [kb for kb in range(nkb) if not causal or k0[kb] <= p1[qb]]
                for kb in sorted(cand, key=lambda x: (-scores[x], x))[:topk]:
                    sel[b, h, qb, kb] = True
    return sel
