"""Token-sparse attention: each query attends to its own gathered set of at most K keys.

Executes a :class:`~spattn.selection.TokenSelection` (top-k attention, Explicit Sparse Transformer,
Zhao et al. 2019; BiFormer's routed regions, Zhu et al. 2023; decode-time selectors): for query ``i``
of head ``h`` the softmax runs over the keys ``indices[b, h, i, :]`` (``-1`` = unused slot), i.e. it
is exactly dense attention restricted to ``selection.to_dense()``.

Memory is ``O(chunk * K * D)``: queries are processed in chunks, the selected keys/values of a
chunk are gathered into one ``[B, Hkv, G, chunk, K, 2D]`` tensor (``G = Hq / Hkv``, grouped-query
attention gathers from the shared kv head), and the backward recomputes the probabilities from the
saved log-sum-exp and accumulates ``dK``/``dV`` with a sparse (CSR) product over the selected pairs. Nothing of size ``Nq x Nk`` exists.
Half-precision inputs are computed in float32 and cast back.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import Tensor

from .._checks import check_kind
from ..selection import TokenSelection
from ._finite import nan_exact

__all__ = ["tokensparse_attention"]

#: elements of one gathered ``[B, Hq, chunk, K, 2D]`` block of keys and values (8 MB in float32)
GATHER_BUDGET = 1 << 21


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_size(batch: int, heads: int, slots: int, dim: int, nq: int) -> int:
    return max(1, min(nq, GATHER_BUDGET // max(1, batch * heads * slots * dim)))


class _Gathered:
    """Selected key rows of one query chunk, as row indices into the flat ``[B*Hkv*Nk, D]`` keys."""

    def __init__(self, indices: Tensor, c0: int, c1: int, batch: int, hkv: int, group: int, nk: int, kpm):
        idx = indices[:, :, c0:c1].expand(batch, hkv * group, c1 - c0, indices.shape[-1])
        valid = idx >= 0
        idx = idx.clamp(min=0)  # unused slots read row 0 of their head and are masked
        if kpm is not None:
            valid = valid & kpm[torch.arange(batch, device=idx.device)[:, None, None, None], idx]
        self.shape = (batch, hkv, group, c1 - c0, idx.shape[-1])
        self.valid = valid.reshape(self.shape)
        base = (torch.arange(batch * hkv, device=idx.device) * nk).view(batch, hkv, 1)
        self.rows = (idx.reshape(batch, hkv, -1) + base).reshape(-1)  # [B*Hkv*G*c*K]
        self.num_rows = batch * hkv * nk
        self._transpose = None

    def gather(self, flat: Tensor) -> Tensor:
        """``flat [B*Hkv*Nk, D]`` -> ``[B, Hkv, G, c, K, D]`` (row copies, no per-element index)."""
        return flat.index_select(0, self.rows).view(*self.shape, flat.shape[-1])

    def transposed_product(self, weights: Tensor, dense: Tensor) -> Tensor:
        """``sum over (query, slot) of weights[query, slot] * dense[query]`` into each selected key row.

        ``weights [B, Hkv, G, c, K]``, ``dense [B, Hkv, G, c, D]`` -> ``[B*Hkv*Nk, D]``: a CSR
        sparse-dense product with the key rows as CSR rows (its structure is built once per chunk and
        shared by dK and dV); about 2x faster on CPU than materialising ``[c, K, D]`` products for
        ``index_add_``.
        """
        slots = self.shape[-1]
        if self._transpose is None:
            perm = torch.argsort(self.rows, stable=True)
            counts = torch.bincount(self.rows, minlength=self.num_rows)
            crow = torch.zeros(self.num_rows + 1, dtype=torch.long, device=self.rows.device)
            torch.cumsum(counts, 0, out=crow[1:])
            self._transpose = (perm, crow, torch.div(perm, slots, rounding_mode="floor"))
        perm, crow, col = self._transpose
        queries = dense.reshape(-1, dense.shape[-1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            mat = torch.sparse_csr_tensor(crow, col, weights.reshape(-1)[perm], (self.num_rows, queries.shape[0]))
            return mat @ queries


def _raw_scores(qc: Tensor, kg: Tensor, scale: float) -> Tensor:
    """``qc [B, Hkv, G, c, D]``, ``kg [..., c, K, D]`` -> scaled scores ``[..., c, K]``."""
    return torch.matmul(kg, qc.unsqueeze(-1)).squeeze(-1) * scale


def _scores(qc: Tensor, kg: Tensor, valid: Tensor, scale: float, softcap: Optional[float] = None) -> Tensor:
    """Masked (and, with ``softcap``, capped: ``softcap * tanh(s / softcap)``) scores ``[..., c, K]``."""
    s = _raw_scores(qc, kg, scale)
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    return s.masked_fill(~valid, float("-inf"))


class _KeyValueRows:
    """Key and value rows, fetched together as ``[..., 2D]`` rows ``[k | v]`` for a :class:`_Gathered`.

    When the selection reads at least as many rows as the cache holds (prefill, training), k and v
    are stacked once into ``[B*Hkv*Nk, 2D]`` so one row gather fetches both. When it reads fewer
    (decoding: one query, a budget of keys out of a long cache), stacking would copy the whole cache
    every step; k and v rows are then gathered separately from zero-copy row views of their storage.
    """

    def __init__(self, k: Tensor, v: Tensor, dtype: torch.dtype, rows_read: int):
        self.stacked = None
        if rows_read >= k.shape[0] * k.shape[1] * k.shape[2]:
            self.stacked = torch.cat([k, v], dim=-1).to(dtype).reshape(-1, 2 * k.shape[-1])
            return
        self.nk = k.shape[2]
        self.k_rows, self.v_rows = _row_view(k), _row_view(v)
        if self.k_rows is None or self.v_rows is None or k.stride(1) != v.stride(1):
            # unusual strides: [B*Hkv, Nk, D] views (a copy only if k/v cannot be viewed so)
            self.k, self.v, self.k_rows = k.flatten(0, 1), v.flatten(0, 1), None
        else:
            self.alloc = k.stride(1) // k.shape[-1]  # rows per head in the storage (a cache's capacity)
        self.dtype = dtype

    def gather(self, g: "_Gathered") -> Tensor:
        if self.stacked is not None:
            return g.gather(self.stacked)
        head = torch.div(g.rows, self.nk, rounding_mode="floor")
        pos = g.rows - head * self.nk
        if self.k_rows is not None:
            rows = head * self.alloc + pos
            k, v = self.k_rows.index_select(0, rows), self.v_rows.index_select(0, rows)
        else:
            k, v = self.k[head, pos], self.v[head, pos]
        shape = (*g.shape, k.shape[-1])
        return torch.cat([k.view(shape), v.view(shape)], dim=-1).to(self.dtype)


def _row_view(x: Tensor) -> Optional[Tensor]:
    """``x [B, H, N, D]`` -> zero-copy ``[rows, D]`` view of its storage (row ``h*alloc + t`` is token t of
    flattened head h, ``alloc`` = tokens allocated per head), or None if x's strides forbid it."""
    b, h, n, d = x.shape
    if x.stride(3) != 1 or x.stride(2) != d or x.stride(1) % d or (b > 1 and x.stride(0) != h * x.stride(1)):
        return None
    alloc = x.stride(1) // d
    return x.as_strided(((b * h - 1) * alloc + n, d), (d, 1), x.storage_offset())


def _rows_read(q: Tensor, indices: Tensor) -> int:
    return q.shape[0] * q.shape[1] * q.shape[2] * indices.shape[-1]


class _TokenSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, indices, kpm, scale, softcap):
        batch, hq, nq, dim = q.shape
        hkv, nk = k.shape[1], k.shape[2]
        group = hq // hkv
        cdt = _compute_dtype(q.dtype)
        qc_all = q.to(cdt).reshape(batch, hkv, group, nq, dim)
        kv = _KeyValueRows(k, v, cdt, _rows_read(q, indices))
        out = torch.zeros(batch, hkv, group, nq, dim, dtype=cdt, device=q.device)
        lse = torch.full((batch, hkv, group, nq), float("-inf"), dtype=cdt, device=q.device)
        chunk = _chunk_size(batch, hq, indices.shape[-1], 2 * dim, nq)
        for c0 in range(0, nq, chunk):
            c1 = min(nq, c0 + chunk)
            g = _Gathered(indices, c0, c1, batch, hkv, group, nk, kpm)
            kvg = kv.gather(g)
            s = _scores(qc_all[:, :, :, c0:c1], kvg[..., :dim], g.valid, scale, softcap)
            row_lse = torch.logsumexp(s, dim=-1)
            safe = torch.where(torch.isinf(row_lse), torch.zeros_like(row_lse), row_lse)
            p = torch.exp(s - safe[..., None])  # exactly 0 on masked slots and empty rows
            out[:, :, :, c0:c1] = torch.matmul(p.unsqueeze(-2), kvg[..., dim:]).squeeze(-2)
            lse[:, :, :, c0:c1] = row_lse
        ctx.save_for_backward(q, k, v, indices, kpm, out, lse)
        ctx.scale, ctx.softcap = scale, softcap
        ctx.chunk = chunk
        return out.view(batch, hq, nq, dim).to(q.dtype), lse.view(batch, hq, nq)

    @staticmethod
    def backward(ctx, g_out, g_lse):
        q, k, v, indices, kpm, out, lse = ctx.saved_tensors
        scale, chunk, softcap = ctx.scale, ctx.chunk, ctx.softcap
        batch, hq, nq, dim = q.shape
        hkv, nk = k.shape[1], k.shape[2]
        group = hq // hkv
        cdt = out.dtype
        qc_all = q.to(cdt).reshape(batch, hkv, group, nq, dim)
        kv = _KeyValueRows(k, v, cdt, _rows_read(q, indices))
        g_out = torch.zeros_like(out) if g_out is None else g_out.to(cdt).reshape(out.shape)
        g_lse = torch.zeros_like(lse) if g_lse is None else g_lse.to(cdt).reshape(lse.shape)
        # d softmax: ds = p * (dp - delta), delta = rowsum(dO * O) - dLSE (lse's own gradient is p)
        delta = (g_out * out).sum(-1) - g_lse
        safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        dq = torch.zeros(qc_all.shape, dtype=cdt, device=q.device)
        dk = torch.zeros(batch * hkv * nk, dim, dtype=cdt, device=q.device)
        dv = torch.zeros_like(dk)
        for c0 in range(0, nq, chunk):
            c1 = min(nq, c0 + chunk)
            g = _Gathered(indices, c0, c1, batch, hkv, group, nk, kpm)
            qc = qc_all[:, :, :, c0:c1]
            kvg = kv.gather(g)
            kg, vg = kvg[..., :dim], kvg[..., dim:]
            raw = _raw_scores(qc, kg, scale)
            tanh = None if softcap is None else torch.tanh(raw / softcap)
            capped = raw if tanh is None else tanh * softcap
            p = torch.exp(capped.masked_fill(~g.valid, float("-inf")) - safe_lse[:, :, :, c0:c1, None])
            go = g_out[:, :, :, c0:c1]
            dv += g.transposed_product(p, go)
            dp = torch.matmul(vg, go.unsqueeze(-1)).squeeze(-1)
            ds = p * (dp - delta[:, :, :, c0:c1, None]) * scale
            if tanh is not None:  # d/ds of softcap * tanh(s / softcap) = 1 - tanh²
                ds = ds * (1 - tanh * tanh)
            dq[:, :, :, c0:c1] = torch.matmul(ds.unsqueeze(-2), kg).squeeze(-2)
            dk += g.transposed_product(ds, qc)
        dq = dq.view(batch, hq, nq, dim).to(q.dtype)
        return dq, dk.view(k.shape).to(k.dtype), dv.view(v.shape).to(v.dtype), None, None, None, None


def _check(q: Tensor, k: Tensor, v: Tensor, selection, key_padding_mask) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"tokensparse_attention: {name} must be a 4-D tensor [B, H, N, D]")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"tokensparse_attention: {name} must be a floating tensor, got {t.dtype}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"tokensparse_attention: expected q [B, Hq, Nq, D], k = v [B, Hkv, Nk, D] with Hq % Hkv == 0, "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    check_kind("tokensparse_attention: selection", selection, TokenSelection)
    if (selection.q_len, selection.kv_len) != (q.shape[2], k.shape[2]):
        raise ValueError(
            f"tokensparse_attention: selection is for (Nq, Nk) = {(selection.q_len, selection.kv_len)} "
            f"but q, k have {(q.shape[2], k.shape[2])}"
        )
    if selection.batch not in (1, q.shape[0]) or selection.heads not in (1, q.shape[1]):
        raise ValueError(
            f"tokensparse_attention: selection indices {tuple(selection.indices.shape)} must have batch 1 or "
            f"{q.shape[0]} and heads 1 or {q.shape[1]}"
        )
    if selection.device != q.device:
        raise ValueError(f"tokensparse_attention: selection is on {selection.device} but q is on {q.device}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("tokensparse_attention: key_padding_mask must be a bool tensor [B, Nk] (True = real key)")
        if tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
            raise ValueError(
                f"tokensparse_attention: key_padding_mask must have shape {(k.shape[0], k.shape[2])}, "
                f"got {tuple(key_padding_mask.shape)}"
            )


def tokensparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    selection: TokenSelection,
    *,
    scale: Optional[float] = None,
    key_padding_mask: Optional[Tensor] = None,
    return_lse: bool = False,
    softcap: Optional[float] = None,
):
    """Softmax attention of each query over its selected keys, with forward and backward.

    Args:
        q: ``[B, Hq, Nq, D]``; k, v: ``[B, Hkv, Nk, D]`` (query head ``h`` reads kv head ``h // (Hq/Hkv)``).
        selection: :class:`TokenSelection` with indices ``[B', H', Nq, K]`` (``B'`` in {1, B},
            ``H'`` in {1, Hq}; ``-1`` = unused slot).
        scale: score scale, default ``1/sqrt(D)``.
        key_padding_mask: bool ``[B, Nk]``, True = real key; padded keys are dropped from every set.
        return_lse: also return the log-sum-exp ``[B, Hq, Nq]`` (float32, float64 for float64 inputs).
        softcap: scaled scores ``s`` become ``softcap * tanh(s / softcap)`` (Gemma 2); None = off.

    Queries left with no key get zeros and log-sum-exp ``-inf`` (finite, NaN-free gradients). NaN in
    q, k or v reaches exactly the rows that select it (see :mod:`~spattn.kernels._finite`).
    """
    _check(q, k, v, selection, key_padding_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    indices = selection.indices
    if indices.shape[-1] == 0:  # nothing selected anywhere: keep the graph for zero gradients
        out = q * 0.0 + (k.sum() + v.sum()) * 0.0
        lse = torch.full(q.shape[:3], float("-inf"), dtype=_compute_dtype(q.dtype), device=q.device)
        return (out, lse) if return_lse else out
    cap = None if softcap is None else float(softcap)
    out, lse = nan_exact(lambda q, k, v: _TokenSparse.apply(q, k, v, indices, key_padding_mask, scale, cap), q, k, v)
    if not return_lse:
        return out
    return out, lse.to(_compute_dtype(q.dtype))
