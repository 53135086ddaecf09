"""``spattn.attention``: validation, pattern -> Layout, GQA, and dispatch to a backend."""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels.blocksparse import blocksparse_attention
from .kernels.reference import reference_attention
from .layout import Layout
from .selection import ClusterSelection, PageSelection, TokenSelection
from .patterns import Dense, Pattern, pattern as make_pattern

__all__ = ["attention", "BACKENDS", "resolve_selection"]

BACKENDS = ("auto", "reference", "blocksparse", "flex")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            shape = "[B, Hq, Nq, D]" if name == "q" else "[B, Hkv, Nk, D]"
            raise ValueError(f"{name} must be 4-D {shape}, got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if 0 in t.shape:
            raise ValueError(f"{name} must not have an empty dimension, got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, Hkv, Nk, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head dim D, got {q.shape[3]} and {k.shape[3]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(
            f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]}) for grouped-query attention"
        )


def _check_key_padding_mask(mask: Optional[Tensor], k: Tensor) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"key_padding_mask must be a bool tensor [B, Nk], got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be a bool tensor (True = real key), got dtype {mask.dtype}")
    if tuple(mask.shape) != (k.shape[0], k.shape[2]):
        raise ValueError(f"key_padding_mask must have shape [B, Nk] = {(k.shape[0], k.shape[2])}, got {tuple(mask.shape)}")
    if mask.device != k.device:
        raise ValueError(f"key_padding_mask is on {mask.device} but k is on {k.device}")


def _check_layout(layout: Layout, q: Tensor, k: Tensor) -> None:
    if (layout.q_len, layout.kv_len) != (q.shape[2], k.shape[2]):
        raise ValueError(
            f"layout is for (Nq, Nk) = {(layout.q_len, layout.kv_len)} but q, k have {(q.shape[2], k.shape[2])}"
        )
    if layout.batch not in (1, q.shape[0]):
        raise ValueError(f"layout batch size {layout.batch} must be 1 or B={q.shape[0]}")
    if layout.heads not in (1, q.shape[1]):
        raise ValueError(f"layout head count {layout.heads} must be 1 or the number of query heads {q.shape[1]}")
    if layout.device != q.device:
        raise ValueError(f"layout is on {layout.device} but q is on {q.device}")


def _check_selection(sel: "TokenSelection | PageSelection | ClusterSelection", q: Tensor, k: Tensor) -> None:
    name = type(sel).__name__
    if (sel.q_len, sel.kv_len) != (q.shape[2], k.shape[2]):
        raise ValueError(f"{name} is for (Nq, Nk) = {(sel.q_len, sel.kv_len)} but q, k have {(q.shape[2], k.shape[2])}")
    if sel.batch not in (1, q.shape[0]):
        raise ValueError(f"{name} batch size {sel.batch} must be 1 or B={q.shape[0]}")
    if sel.heads not in (1, q.shape[1]):
        raise ValueError(f"{name} head count {sel.heads} must be 1 or the number of query heads {q.shape[1]}")
    if sel.device != q.device:
        raise ValueError(f"{name} is on {sel.device} but q is on {q.device}")


def resolve_selection(q: Tensor, k: Tensor, pattern, causal: bool, key_padding_mask: Optional[Tensor] = None):
    """Turn ``pattern`` (None, spec string, Pattern or Layout) into what a kernel runs.

    Returns ``(selection, is_dense)``: a Layout (validated against q, k), or the TokenSelection /
    ClusterSelection of a per-token pattern; ``is_dense`` says the plain dense pattern was asked for.
    ``key_padding_mask`` reaches ``pattern.select`` when its signature takes it (content-based
    selectors then never rank padding keys); the kernels apply it in any case.
    """
    if isinstance(pattern, (Layout, TokenSelection, PageSelection, ClusterSelection)):
        what = type(pattern).__name__
        if causal:
            raise ValueError(f"causal=True cannot be combined with a precomputed {what}: causality is part of the {what}")
        if isinstance(pattern, Layout):
            _check_layout(pattern, q, k)
        else:
            _check_selection(pattern, q, k)
        return pattern, False
    pat = Dense() if pattern is None else make_pattern(pattern)
    if key_padding_mask is not None and _select_takes_padding(type(pat)):
        selection = pat.select(q, k, causal=causal, key_padding_mask=key_padding_mask)
    else:
        selection = pat.select(q, k, causal=causal)
    if isinstance(selection, Layout):
        _check_layout(selection, q, k)
    elif isinstance(selection, (TokenSelection, PageSelection, ClusterSelection)):
        _check_selection(selection, q, k)
    else:
        raise TypeError(
            f"{pat.name}.select() returned {type(selection).__name__}; expected a Layout, TokenSelection, PageSelection or ClusterSelection"
        )
    return selection, isinstance(pat, Dense)


@functools.lru_cache(maxsize=None)
def _select_takes_padding(pattern_class: type) -> bool:
    """Whether ``pattern_class.select`` accepts ``key_padding_mask`` (once per class: this runs per call)."""
    try:
        params = inspect.signature(pattern_class.select).parameters
    except (TypeError, ValueError):  # builtins / C callables
        return False
    return "key_padding_mask" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _sdpa_dense(q, k, v, causal, scale):
    b, hq, nq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    if group > 1 and not causal:
        # the queries of the heads sharing a kv head become rows of one head: K/V are read once per
        # kv head (decoding: ~1.3x faster on CPU than SDPA's enable_gqa)
        out = F.scaled_dot_product_attention(q.reshape(b, hkv, group * nq, d), k, v, scale=scale)
        return out.view(b, hq, nq, out.shape[-1])
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=group > 1)


def _attend_selection(q, k, v, selection, backend, scale, key_padding_mask, return_lse):
    """Token-level selections run on their own kernels; ``reference`` uses the dense mask."""
    kwargs = dict(scale=scale, key_padding_mask=key_padding_mask, return_lse=return_lse)
    if isinstance(selection, TokenSelection):
        if backend == "reference":
            return reference_attention(q, k, v, selection.to_layout(), **kwargs)
        if backend == "flex":
            raise ValueError("backend='flex' runs block Layouts; per-query token selections use 'auto' or 'reference'")
        from .kernels.tokensparse import tokensparse_attention

        return tokensparse_attention(q, k, v, selection, **kwargs)
    if isinstance(selection, PageSelection):
        if backend == "reference":
            return reference_attention(q, k, v, selection.to_layout(), **kwargs)
        if backend == "flex":
            raise ValueError("backend='flex' runs block Layouts; page selections use 'auto' or 'reference'")
        from .kernels.pagesparse import pagesparse_attention

        return pagesparse_attention(q, k, v, selection, **kwargs)
    if isinstance(selection, ClusterSelection):
        if backend not in ("auto", "reference"):
            raise ValueError(f"backend={backend!r} runs block Layouts; routing windows use 'auto' or 'reference'")
        from .kernels.clustered import clustered_attention

        return clustered_attention(q, k, v, selection, reference=backend == "reference", **kwargs)
    raise AssertionError(f"unhandled selection {type(selection).__name__}")


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Union[None, str, Pattern, Layout, TokenSelection, PageSelection, ClusterSelection] = None,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    backend: str = "auto",
    key_padding_mask: Optional[Tensor] = None,
    return_lse: bool = False,
):
    """Softmax attention restricted to the (query, key) pairs a pattern selects.

    Args:
        q: ``[B, Hq, Nq, D]``; k, v: ``[B, Hkv, Nk, D]`` with ``Hq % Hkv == 0`` (grouped-query attention).
        pattern: None (dense), a spec string such as ``"window(size=256)"``, a :class:`Pattern`,
            or what a pattern selected: a :class:`Layout`, :class:`TokenSelection`,
            :class:`PageSelection` or :class:`ClusterSelection` (``pattern.select(q, k, causal)``).
        causal: query ``i`` sees key ``j`` only if ``j <= i + Nk - Nq`` (queries aligned to the end
            of the keys, as in decoding with a KV cache).
        scale: score scale, default ``1/sqrt(D)``.
        backend: ``"auto"`` | ``"reference"`` (dense oracle) | ``"blocksparse"`` (eager, fwd+bwd
            anywhere) | ``"flex"`` (FlexAttention; compiled; CPU inference only).
        key_padding_mask: bool ``[B, Nk]``, True for real keys.
        return_lse: also return the log-sum-exp ``[B, Hq, Nq]`` (fp32; ``-inf`` for rows with no key),
            e.g. to merge partial attentions.

    Returns ``out [B, Hq, Nq, D]`` (zeros for queries with nothing to attend to), or ``(out, lse)``.
    """
    _check_inputs(q, k, v)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
        scale = float(scale)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    _check_key_padding_mask(key_padding_mask, k)
    if pattern is None and backend == "auto" and not return_lse and key_padding_mask is None:
        if not causal or q.shape[2] == k.shape[2]:  # plain dense: no layout to build (decoding calls this per step)
            return _sdpa_dense(q, k, v, causal, scale)
    layout, is_dense = resolve_selection(q, k, pattern, causal, key_padding_mask)
    if not isinstance(layout, Layout):
        return _attend_selection(q, k, v, layout, backend, scale, key_padding_mask, return_lse)
    kwargs = dict(scale=scale, key_padding_mask=key_padding_mask, return_lse=return_lse)
    if backend == "reference":
        return reference_attention(q, k, v, layout, **kwargs)
    if backend == "flex":
        from .kernels.flex import flex_attention

        return flex_attention(q, k, v, layout, **kwargs)
    if backend == "auto":
        square_causal = not causal or q.shape[2] == k.shape[2]
        if is_dense and not return_lse and key_padding_mask is None and square_causal:
            return _sdpa_dense(q, k, v, causal, scale)
        if q.device.type == "cuda":
            from .kernels.flex import flex_available, flex_attention

            if flex_available(q.device):
                return flex_attention(q, k, v, layout, **kwargs)
    return blocksparse_attention(q, k, v, layout, **kwargs)
