"""Plain quadratic references of the approximations in :mod:`spattn.approx` (the oracles of their tests).

Each function writes a mechanism's formula out with explicit ``N x N`` matrices and Python loops,
independently of the fast implementation, for small inputs in float64. Shapes follow the package:
``q [B, Hq, N, D]``, ``k, v [B, Hkv, N, D]`` (GQA: kv heads are repeated), ``kpm [B, N]`` bool with
True for real tokens. References of the random-feature, decayed and landmark methods take the
mechanism's own random features / gates / landmark count as arguments.

Papers: linear attention (Katharopoulos et al. 2020), Performer's FAVOR+ (Choromanski et al. 2021),
TransNormer / Lightning attention (Qin et al. 2022, 2024), gated linear attention (Yang et al. 2024),
SOFT (Lu et al. 2021), Linformer (Wang et al. 2020), Nyströmformer (Xiong et al. 2021),
Combiner (Ren et al. 2021), Scatterbrain (Chen et al. 2021), SEA (Lee et al. 2024), SLA (Zhang et al.
2025), DRSformer's multi-ratio top-k (Chen et al. 2023).
"""

from __future__ import annotations

import copy
import itertools
import math

import torch
import torch.nn.functional as F

from .._heads import expand_kv as rep  # GQA: kv heads [B, Hkv, N, D] -> query heads
from .gla import alibi_slopes
from .soft import newton_schulz_pinv

__all__ = [
    "naive_kernel_attention",
    "naive_linear",
    "naive_performer",
    "naive_decayed",
    "naive_lightning",
    "naive_gla",
    "naive_soft",
    "naive_linformer",
    "naive_pinv",
    "naive_nystrom",
    "naive_combiner",
    "favor_features",
    "allowed_pairs",
    "naive_scatterbrain",
    "naive_sla",
    "naive_sea",
    "dense_drsformer",
]


def rms(x):
    """RMS normalisation over the last dim (the output norm of Lightning / GLA)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def naive_kernel_attention(fq, fk, v, causal, eps):
    """``A = phi(Q) phi(K)^T`` as an explicit N x N matrix, rows normalised by their sums."""
    a = fq @ fk.transpose(-1, -2)
    if causal:
        a = a * torch.ones(a.shape[-2:], dtype=a.dtype).tril()
    num, den = a @ v, a.sum(-1, keepdim=True)
    return num / (den + eps) if eps else num / torch.where(den > 0, den, torch.ones_like(den))


def naive_linear(q, k, v, causal=False, kpm=None, eps=1e-6):
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    if kpm is not None:
        fk = fk * kpm[:, None, :, None]
    return naive_kernel_attention(fq, rep(fk, q.shape[1]), rep(v, q.shape[1]), causal, eps)


def naive_performer(q, k, v, w, causal=False, kpm=None, eps=1e-4, stabilise=True):
    """FAVOR+ features written out: row max for queries, one max per (batch, head) for keys."""
    d, m = q.shape[-1], w.shape[0]
    w = w.to(q.dtype)
    lq = (q / d**0.25) @ w.T - (q / d**0.25).pow(2).sum(-1, keepdim=True) / 2
    lk = (k / d**0.25) @ w.T - (k / d**0.25).pow(2).sum(-1, keepdim=True) / 2
    if kpm is not None:
        lk = lk.masked_fill(~kpm[:, None, :, None], -math.inf)
    # the stabilisers are constants (detached): they only guard exp against overflow
    sq = lq.amax(-1, keepdim=True).detach() if stabilise else 0.0
    sk = lk.amax(dim=(-1, -2), keepdim=True).detach() if stabilise else 0.0
    if stabilise:  # a sequence without a real key: no stabiliser needed (its features are zeroed below)
        sk = torch.where(torch.isfinite(sk), sk, torch.zeros_like(sk))
    fq = (torch.exp(lq - sq) + eps) / math.sqrt(m)
    fk = (torch.exp(lk - sk) + (0.0 if causal else eps)) / math.sqrt(m)
    if kpm is not None:
        fk = fk * kpm[:, None, :, None]
    return naive_kernel_attention(fq, rep(fk, q.shape[1]), rep(v, q.shape[1]), causal, 0.0)


def naive_decayed(q, k, v, log_g, causal):
    """``o_t = sum_s sum_d q_td k_sd w_tsd v_s``: w = prod of the gates strictly after s up to t (s <= t);
    bidirectional (not causal): for s > t the product of the gates t .. s-1; q, k, v, log_g per query head."""
    n = q.shape[2]
    log_g = log_g.expand(q.shape[0], q.shape[1], n, log_g.shape[-1])
    G = torch.cumsum(log_g, 2)
    E = G - log_g  # exclusive cumulative sums
    t = torch.arange(n)[:, None, None]
    s = torch.arange(n)[None, :, None]
    fwd = G.unsqueeze(3) - G.unsqueeze(2)  # [B, H, t, s, Dg]: G_t - G_s
    bwd = E.unsqueeze(2) - E.unsqueeze(3)  # E_s - E_t
    expo = torch.where(s <= t, fwd, bwd if not causal else torch.full_like(bwd, -math.inf))
    a = torch.einsum("bhtd,bhsd,bhtsd->bhts", q, k, torch.exp(expo).expand(-1, -1, -1, -1, q.shape[-1]))
    return a @ v


def naive_lightning(q, k, v, causal, kpm=None):
    hq = q.shape[1]
    q, k, v = F.silu(q), F.silu(k), F.silu(v)
    if kpm is not None:
        k = k * kpm[:, None, :, None]
    log_g = (-alibi_slopes(hq)).to(q.dtype).view(1, hq, 1, 1)
    return rms(naive_decayed(q, rep(k, hq), rep(v, hq), log_g, causal))


def naive_gla(mod, q, k, v, causal, kpm=None):
    if mod.gate_up.weight.dtype != q.dtype:
        mod = copy.deepcopy(mod).to(q.dtype)
    hq = q.shape[1]
    log_g = F.logsigmoid(mod.gate_up(mod.gate_down(k))) / mod.normalizer
    if kpm is not None:
        k = k * kpm[:, None, :, None]
        log_g = log_g * kpm[:, None, :, None]
    return rms(naive_decayed(q / math.sqrt(q.shape[-1]), rep(k, hq), rep(v, hq), rep(log_g, hq), causal))


def naive_soft(q, v, m, iters=20, kpm=None):
    """Explicit N x N Nyström approximation of the Gaussian kernel with tied Q = K."""
    n, d = q.shape[2], q.shape[-1]
    x = q / d**0.25
    real = torch.ones(q.shape[0], n, dtype=torch.bool) if kpm is None else kpm
    seg = -(-n // m)
    outs = []
    for b in range(q.shape[0]):
        lms = []
        for start in range(0, n, seg):
            idx = [i for i in range(start, min(start + seg, n)) if real[b, i]]
            if idx:
                lms.append(x[b][:, idx].mean(1))
        lm = torch.stack(lms, 1)  # [H, m', d]
        kern = lambda a, c: torch.exp(-0.5 * torch.cdist(a, c).pow(2))  # noqa: E731
        approx = kern(x[b], lm) @ newton_schulz_pinv(kern(lm, lm), iters) @ kern(lm, x[b])
        approx = approx * real[b][None, None, :]
        outs.append(approx @ rep(v[b : b + 1], q.shape[1])[0])
    return torch.stack(outs)


def naive_linformer(q, k, v, E, Fm, max_len, kpm=None):
    """Zero-pad K, V to max_len, project with the full E, F, softmax over the k slots."""
    n = k.shape[2]
    if kpm is not None:
        k, v = k * kpm[:, None, :, None], v * kpm[:, None, :, None]
    pad = torch.zeros(*k.shape[:2], max_len - n, k.shape[-1], dtype=k.dtype)
    kp = E.to(k.dtype) @ torch.cat([k, pad], 2)
    vp = Fm.to(k.dtype) @ torch.cat([v, pad], 2)
    a = torch.softmax(q @ rep(kp, q.shape[1]).transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
    return a @ rep(vp, q.shape[1])


def naive_pinv(a, iters):
    """Nyströmformer's iteration written per matrix."""
    out = torch.empty_like(a)
    for idx in itertools.product(*(range(s) for s in a.shape[:-2])):
        m = a[idx]
        eye = torch.eye(m.shape[0], dtype=m.dtype)
        z = m.T / (m.abs().sum(0).max() * m.abs().sum(1).max())
        for _ in range(iters):
            z = 0.25 * z @ (13 * eye - m @ z @ (15 * eye - m @ z @ (7 * eye - m @ z)))
        out[idx] = z
    return out


def naive_nystrom(q, k, v, m, iters=6, kpm=None):
    """Explicit N x N Nyström matrix; landmarks are means of the real tokens of each segment."""
    b, hq, n, d = q.shape
    k, v = rep(k, hq), rep(v, hq)
    real = torch.ones(b, n, dtype=torch.bool) if kpm is None else kpm
    qs, ks = q / d**0.25, k / d**0.25
    seg = -(-n // m)
    outs = []
    for bi in range(b):
        segs = [[i for i in range(s, min(s + seg, n)) if real[bi, i]] for s in range(0, n, seg)]
        segs = [s for s in segs if s]
        ql = torch.stack([qs[bi][:, s].mean(1) for s in segs], 1)
        kl = torch.stack([ks[bi][:, s].mean(1) for s in segs], 1)
        logits3 = (ql @ ks[bi].transpose(-1, -2)).masked_fill(~real[bi], -math.inf)
        s_hat = (
            torch.softmax(qs[bi] @ kl.transpose(-1, -2), -1)
            @ naive_pinv(torch.softmax(ql @ kl.transpose(-1, -2), -1), iters)
            @ torch.softmax(logits3, -1)
        )
        outs.append(s_hat @ v[bi])
    return torch.stack(outs)


def _partition(mode, i, n, L, causal):
    """(direct keys, regions) of query i; a region is (list of keys, axial row index or None)."""
    if mode == "fixed":
        s = i // L
        seg = list(range(s * L, min(n, (s + 1) * L)))
        direct = [j for j in seg if j <= i] if causal else seg
        others = [t for t in range(-(-n // L)) if (t < s if causal else t != s)]
        return direct, [(list(range(t * L, min(n, (t + 1) * L))), None) for t in others]
    if mode == "logsparse":
        regions = []
        for lvl in range(max(1, math.ceil(math.log2(n)))):
            if (i >> lvl) & 1:
                start = ((i >> lvl) - 1) << lvl
                regions.append((list(range(start, start + (1 << lvl))), None))
            if not causal:
                r = n - 1 - i  # mirrored decomposition of the suffix
                if (r >> lvl) & 1:
                    start = ((r >> lvl) - 1) << lvl
                    regions.append(([n - 1 - j for j in range(start, start + (1 << lvl))], None))
        return [i], regions
    s = i // L  # axial
    row = list(range(s * L, min(n, (s + 1) * L)))
    direct = [j for j in row if j <= i] if causal else row
    rows = [t for t in range(-(-n // L)) if (t < s if causal else t != s)]
    return direct, [(list(range(t * L, min(n, (t + 1) * L))), t) for t in rows]


def naive_combiner(q, k, v, mode, L, causal, kpm=None, row_summary="wsum"):
    """Explicit probabilities of every key, per (b, h, i). q, k, v [B, H, N, D] (same heads)."""
    B, H, n, D = q.shape
    scale = D**-0.5
    real = torch.ones(B, n, dtype=torch.bool) if kpm is None else kpm
    out = torch.zeros_like(q)
    total_p = torch.zeros(B, H, n, dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            for i in range(n):
                direct, regions = _partition(mode, i, n, L, causal)
                logits, expand = [], []  # expand: list of (keys, weights) per logit
                for j in direct:
                    if real[b, j]:
                        logits.append(q[b, h, i] @ k[b, h, j] * scale)
                        expand.append(([j], torch.ones(1, dtype=q.dtype)))
                for keys, row in regions:
                    keys = [j for j in keys if real[b, j]]
                    if not keys:
                        continue
                    kk = k[b, h, keys]
                    if row is None:
                        qo = q[b, h, keys].max(0).values
                        w = torch.softmax(kk @ qo * scale, 0)
                        key = kk.max(0).values
                    else:  # axial: attention of token (row, column of i) over the whole row
                        pos = row * L + i % L
                        qo = q[b, h, pos] if pos < n else torch.zeros(D, dtype=q.dtype)
                        w = torch.softmax(kk @ qo * scale, 0)
                        key = w @ kk if row_summary == "wsum" else kk.max(0).values
                    logits.append(q[b, h, i] @ key * scale)
                    expand.append((keys, w))
                if not logits:
                    continue
                p_region = torch.softmax(torch.stack(logits), 0)
                p = torch.zeros(n, dtype=q.dtype)
                for pr, (keys, w) in zip(p_region, expand):
                    p[keys] += pr * w
                out[b, h, i] = p @ v[b, h]
                total_p[b, h, i] = p.sum()
                support = [j for j in range(n) if real[b, j] and (j <= i or not causal)]
                assert set(torch.nonzero(p).flatten().tolist()) == set(support), "not full attention"
    return out, total_p


def favor_features(x, w):
    """FAVOR+ features without any stabiliser (fp64 reference)."""
    d = x.shape[-1]
    xs = x * d**-0.25
    return torch.exp(xs @ w.T - 0.5 * (xs * xs).sum(-1, keepdim=True)) * w.shape[0] ** -0.5


def allowed_pairs(n, causal, kpm, B):
    """bool ``[B, 1, N, N]``: pairs allowed by causality and the key padding mask ``kpm [B, N]``."""
    ok = torch.ones(B, 1, n, n, dtype=torch.bool)
    if causal:
        ok = ok & torch.ones(n, n, dtype=torch.bool).tril()
    if kpm is not None:
        ok = ok & kpm[:, None, None, :]
    return ok


def naive_scatterbrain(q, k, v, support, w, allowed):
    """Scatterbrain (Chen et al. 2021), dense: exact exp scores on the sparse ``support [B|1, H|1, N, N]``,
    the Performer estimate with features ``w [m, D]`` elsewhere, one normaliser over ``allowed``."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    exact = torch.exp(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]))
    low = favor_features(q, w) @ favor_features(k, w).transpose(-1, -2)
    a = torch.where(support & allowed, exact, low) * allowed
    den = a.sum(-1, keepdim=True)
    return torch.where(den > 0, (a @ v) / torch.where(den > 0, den, 1), 0.0)


def naive_sla(q, k, v, block, topk, proj, kpm=None):
    """SLA (Zhang et al. 2025). Per query: critical keys (top-k blocks by pooled smooth-k scores) get softmax attention, every
    other real key linear attention with phi = softmax over the head dim; o = o_s + proj(o_l)."""
    B, Hq, n, D = q.shape
    rep = Hq // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    real = torch.ones(B, n, dtype=torch.bool) if kpm is None else kpm
    nb = -(-n // block)
    out = torch.zeros_like(q)
    for b in range(B):
        rk = real[b].nonzero().flatten()
        kmean = k[b, :, rk].detach().mean(1, keepdim=True) if len(rk) else torch.zeros_like(k[b, :, :1])
        for h in range(Hq):
            for qb in range(nb):
                rows = list(range(qb * block, min(n, (qb + 1) * block)))
                real_rows = [i for i in rows if real[b, i]]  # self-attention: padded queries are not pooled
                qbar = q[b, h, real_rows].detach().mean(0) if real_rows else torch.zeros(D, dtype=q.dtype)
                scores = []
                for kb in range(nb):
                    cols = [j for j in range(kb * block, min(n, (kb + 1) * block)) if real[b, j]]
                    if cols:
                        kbar = (k[b, h, cols].detach() - kmean[h]).mean(0)
                        scores.append((float(qbar @ kbar), kb))
                chosen = {kb for _, kb in sorted(scores, reverse=True)[:topk]}
                crit = [j for j in range(n) if real[b, j] and j // block in chosen]
                rest = [j for j in range(n) if real[b, j] and j // block not in chosen]
                for i in rows:
                    o = torch.zeros(D, dtype=q.dtype)
                    if crit:
                        p = torch.softmax(k[b, h, crit] @ q[b, h, i] / math.sqrt(D), 0)
                        o = p @ v[b, h, crit]
                    ol = torch.zeros(D, dtype=q.dtype)
                    if rest:
                        s = torch.softmax(k[b, h, rest], -1) @ torch.softmax(q[b, h, i], -1)
                        ol = (s @ v[b, h, rest]) / s.sum()
                    out[b, h, i] = o + proj(ol)
    return out


def naive_sea(q, k, v, layer, causal, kpm=None):
    """SEA (Lee et al. 2024), dense: the Performer estimate (features ``layer.projection.weight``) of the
    attention mass of each of ``layer.chunks`` key chunks, the top ``layer.k`` chunks per query (causal:
    its own chunk first), exact softmax attention on their keys."""
    B, Hq, n, D = q.shape
    rep = Hq // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    w = layer.projection.weight.double()
    cs = -(-n // min(layer.chunks, n))
    C = -(-n // cs)
    allowed = allowed_pairs(n, causal, kpm, B)
    lin = (favor_features(q.detach(), w) @ favor_features(k.detach(), w).transpose(-1, -2)) * allowed
    chunk_of = torch.arange(n) // cs
    est = torch.stack([lin[..., chunk_of == c].sum(-1) for c in range(C)], -1)
    mask = torch.zeros(B, Hq, n, n, dtype=torch.bool)
    real = torch.ones(B, n, dtype=torch.bool) if kpm is None else kpm
    for b in range(B):
        for h in range(Hq):
            for i in range(n):
                cand = [c for c in range(C) if real[b, c * cs : (c + 1) * cs].any() and (not causal or c * cs <= i)]
                own = [i // cs] if causal else []
                rest = sorted((c for c in cand if c not in own), key=lambda c: -float(est[b, h, i, c]))
                for c in (own + rest)[: layer.k]:
                    mask[b, h, i, c * cs : (c + 1) * cs] = True
    mask = mask & allowed
    s = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~mask, float("-inf"))
    empty = ~mask.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    return p @ v


def dense_drsformer(q, k, v, ratios, weights, temperature, causal=False, kpm=None):
    """DRSformer's multi-ratio top-k attention (Chen et al. 2023), a direct transcription of the official
    operator on token attention (dense masks, fp64): per ratio ``r`` the ``max(1, int(Nk * r))`` largest
    scores of each row, softmax over them, outputs summed with ``weights``; ``temperature [Hq]``."""
    q, k = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    nq, nk = q.shape[2], k.shape[2]
    scores = (q @ k.transpose(-1, -2)) * temperature.view(-1, 1, 1)
    allowed = torch.ones(nq, nk, dtype=torch.bool)
    if causal:
        allowed = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)
    allowed = allowed.expand(q.shape[0], 1, nq, nk)
    if kpm is not None:
        allowed = allowed & kpm[:, None, None, :]
    masked = scores.masked_fill(~allowed, float("-inf"))
    out = 0
    for r, w in zip(ratios, weights):
        kk = max(1, int(nk * r))
        idx = torch.topk(masked, kk, dim=-1).indices
        keep = torch.zeros_like(allowed.expand_as(masked)).scatter(-1, idx, True) & allowed
        probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
        out = out + w * torch.nan_to_num(probs, nan=0.0) @ v
    return out
