"""Plain references of the layers of :mod:`spattn.nn` (the oracles of their tests): each layer's forward
written out with explicit loops or dense softmax, using the layer's own parameters, for small inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from ..kernels.reference import reference_attention
from ..patterns import pattern

__all__ = ["naive_attention_layer", "naive_local", "naive_seqboat", "naive_sqa"]


def naive_attention_layer(layer, x, causal, kpm=None):
    """:class:`spattn.nn.Attention` written out: projections, the dense reference attention on the layer's
    mechanism's layout (dense when it has none), output projection. ``x [B, N, dim]``, ``kpm [B, N]``."""
    q = rearrange(layer.q_proj(x), "b n (h d) -> b h n d", h=layer.heads)
    k = rearrange(layer.k_proj(x), "b n (h d) -> b h n d", h=layer.kv_heads)
    v = rearrange(layer.v_proj(x), "b n (h d) -> b h n d", h=layer.kv_heads)
    mechanism = layer.mechanism or pattern("dense")
    out = reference_attention(q, k, v, mechanism.layout(q, k, causal=causal), key_padding_mask=kpm)
    return layer.out_proj(rearrange(out, "b h n d -> b n (h d)"))


def naive_local(q, k, v, valid, pos, bias, w, causal, fn):
    """SeqBoat's local attention over the compressed (active) tokens, per token: ``q, k [B, L, D]``, ``v [B, L, Dv]``,
    ``valid [B, L]``, original positions ``pos [B, L]`` for the relative ``bias(i, j)``, window ``w`` over
    compressed indices (causal: ``0 <= i - j <= w``), ``fn`` "softmax" or "relu2" (squared ReLU)."""
    B, L, _ = q.shape
    out = torch.zeros(B, L, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for i in range(L):
            js = [j for j in range(L) if valid[b, j] and (0 <= i - j <= w if causal else abs(i - j) <= w)]
            if not js:
                continue
            s = torch.stack([q[b, i] @ k[b, j] + bias(pos[b, i], pos[b, j]) for j in js])
            a = torch.softmax(s, 0) if fn == "softmax" else F.relu(s).square()
            out[b, i] = a @ v[b, js]
    return out


def naive_seqboat(layer, x, real):
    """SeqBoat / Sparse Modular Activation (Ren et al. 2023) written token by token from its definition with the
    parameters of ``layer``: EMA, the per-token activation choice, GAU attention over the active tokens inside
    the window. ``x [B, N, D]``, ``real [B, N]`` bool -> ``[B, N, D]``."""
    B, N, D = x.shape
    h_in = layer.norm(x) if layer.prenorm else x
    ema = layer.ema
    k = ema.kernel(N)
    hm = h_in * real[..., None]
    y = torch.zeros_like(x)
    for t in range(N):
        for s in range(N):
            if s <= t:
                y[:, t] = y[:, t] + k[:D, t - s] * hm[:, s]
            if ema.bidirectional and s >= t:
                y[:, t] = y[:, t] + k[D:, s - t] * hm[:, s]
    mx = F.silu(y + ema.omega * h_in)
    u, hx = torch.split(layer.hx_proj(mx), [2, D], -1)
    px = torch.softmax(u / layer.log_temp.exp(), -1)
    out_h = torch.zeros_like(x)
    for b in range(B):
        active = [i for i in range(N) if real[b, i] and px[b, i, 1] > px[b, i, 0]]
        for ci, i in enumerate(active):
            z, r, _ = torch.split(F.silu(layer.mx_proj(mx[b, i])), [layer.zdim, layer.hdim, layer.hdim])
            q = z * layer.gamma[0] + layer.beta[0]
            q = q * layer.zdim**-0.5 if layer.attn_fn == "softmax" else q / (layer.window * (1 if layer.causal else 2))
            s, vs = [], []
            for cj, j in enumerate(active):
                d = ci - cj
                if (0 <= d <= layer.window) if layer.causal else abs(d) <= layer.window:
                    zj, _, vj = torch.split(F.silu(layer.mx_proj(mx[b, j])), [layer.zdim, layer.hdim, layer.hdim])
                    kj = zj * layer.gamma[1] + layer.beta[1]
                    s.append(q @ kj + layer.rel_bias(torch.tensor(i), torch.tensor(j)))
                    vs.append(vj)
            s = torch.stack(s)
            a = torch.softmax(s, 0) if layer.attn_fn == "softmax" else F.relu(s).square()
            h = layer.h_proj((a @ torch.stack(vs)) * r)
            out_h[b, i] = h * px[b, i].max()
    out = F.silu(hx + out_h + x)
    return out if layer.prenorm else layer.norm(out)


def naive_sqa(layer, x, causal, kpm=None):
    """Sparse Query Attention (Filipek 2025) with ``H_q`` query heads written out: projections, key/value heads
    repeated to the query heads, explicit softmax, output projection. ``x [B, N, dim]``, ``kpm [B, N]``."""
    b, n, _ = x.shape
    hq, hkv, d = layer.query_heads, layer.key_value_heads, layer.head_dim
    q = layer.q_proj(x).view(b, n, hq, d).transpose(1, 2)
    k = layer.k_proj(x).view(b, n, hkv, d).transpose(1, 2).repeat_interleave(hq // hkv, 1)
    v = layer.v_proj(x).view(b, n, hkv, d).transpose(1, 2).repeat_interleave(hq // hkv, 1)
    logits = q @ k.transpose(-1, -2) / math.sqrt(d)
    allowed = torch.ones(n, n, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    allowed = allowed[None, None] & (True if kpm is None else kpm[:, None, None, :])
    a = torch.softmax(logits.masked_fill(~allowed, -math.inf), -1)
    out = torch.nan_to_num(a) @ v
    return layer.out_proj(out.transpose(1, 2).reshape(b, n, hq * d))
