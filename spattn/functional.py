"""``spattn.attention``: validation, pattern -> Layout, GQA, and dispatch to a backend."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels.blocksparse import blocksparse_attention
from .kernels.reference import reference_attention
from .layout import Layout
from .selection import ClusterSelection, PageSelection, TokenSelection
from .patterns import Dense, Pattern, pattern as make_pattern

__all__ = [
    "attention",
    "BACKENDS",
    "resolve_selection",
    "Kernel",
    "register_kernel",
    "kernel_for",
    "backend_for",
    "backends_for",
    "is_selection",
]

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
        raise ValueError(
            f"key_padding_mask must have shape [B, Nk] = {(k.shape[0], k.shape[2])}, got {tuple(mask.shape)}"
        )
    if mask.device != k.device:
        raise ValueError(f"key_padding_mask is on {mask.device} but k is on {k.device}")


def _check_selection(sel, q: Tensor, k: Tensor) -> None:
    name = sel.kind
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
    ``key_padding_mask`` reaches ``pattern.select`` (every pattern takes it; content-based selectors
    then never rank padding keys); the kernels apply it in any case.
    """
    if is_selection(pattern):
        what = type(pattern).__name__
        if causal:
            raise ValueError(
                f"causal=True cannot be combined with a precomputed {what}: causality is part of the {what}"
            )
        _check_selection(pattern, q, k)
        return pattern, False
    pat = Dense() if pattern is None else make_pattern(pattern)
    selection = pat.select(q, k, causal=causal, key_padding_mask=key_padding_mask)
    if not is_selection(selection):
        kinds = ", ".join(sorted({cls.__name__ for cls, _ in _KERNELS}))
        raise TypeError(f"{pat.name}.select() returned {type(selection).__name__}; expected one of: {kinds}")
    _check_selection(selection, q, k)
    return selection, isinstance(pat, Dense)


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


# ---------------------------------------------------------------------------------------- dispatch
@dataclass(frozen=True)
class Kernel:
    """A kernel as the dispatch table sees it: its name and its entry point
    ``run(q, k, v, selection, *, scale, key_padding_mask, return_lse) -> out | (out, lse)``."""

    name: str
    run: Callable[..., Any]


#: {(kind of selection, backend): kernel}; the one place that decides which kernel runs what
_KERNELS: dict[tuple[type, str], Kernel] = {}


def register_kernel(selection_type: type, backend: str, kernel: Kernel) -> None:
    """Let ``backend`` run selections of ``selection_type`` (or a subclass) with ``kernel``.

    A new kind of selection or a new kernel is one call here; ``attention`` and every caller
    (``nn``, ``integrations.hf``, ``bench``) pick it up through :func:`kernel_for`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"register_kernel: backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if not isinstance(kernel, Kernel):
        raise TypeError(f"register_kernel: kernel must be a spattn.functional.Kernel, got {type(kernel).__name__}")
    _KERNELS[(selection_type, backend)] = kernel


def is_selection(obj) -> bool:
    """Whether ``obj`` is a kind of selection that some kernel runs (a registered selection type)."""
    return any(isinstance(obj, cls) for cls, _ in _KERNELS)


def kernel_for(selection, backend: str) -> Kernel:
    """The kernel ``backend`` runs ``selection`` with (the most specific registered type wins)."""
    for cls in type(selection).__mro__:
        kernel = _KERNELS.get((cls, backend))
        if kernel is not None:
            return kernel
    raise ValueError(
        f"backend={backend!r} cannot run {selection.kind} ({type(selection).__name__}); "
        f"backends for it: {', '.join(backends_for(selection)) or 'none registered'}"
    )


def backends_for(selection) -> tuple[str, ...]:
    """The backends with a kernel for ``selection`` (sorted; empty for what no kernel runs)."""
    return tuple(sorted({b for (cls, b) in _KERNELS if isinstance(selection, cls)}))


def backend_for(selection, backend: str) -> str:
    """``backend`` where it picks among the kernels of block Layouts for ``selection``, else ``"auto"``.

    For callers whose backend option chooses a block kernel (``integrations.hf``'s ``backend=``):
    selections with their own kernel (tokens, pages, clusters) keep it whatever block kernel was asked for.
    """
    layout_kernel = _KERNELS.get((Layout, backend))
    try:
        runs = kernel_for(selection, backend)
    except ValueError:
        return "auto"
    return backend if runs is layout_kernel else "auto"


def _on_dense_mask(q, k, v, selection, **kwargs):
    """The oracle on any selection: its pairs as a dense mask (quadratic; tests and small inputs)."""
    return reference_attention(q, k, v, selection.to_layout(), **kwargs)


def _blocksparse_or_flex(q, k, v, layout, **kwargs):
    """``auto`` on a Layout: FlexAttention on CUDA where it runs, else the block-sparse kernel."""
    if q.device.type == "cuda":
        from .kernels.flex import flex_available

        if flex_available(q.device):
            return _flex(q, k, v, layout, **kwargs)
    return blocksparse_attention(q, k, v, layout, **kwargs)


def _flex(q, k, v, layout, **kwargs):
    from .kernels.flex import flex_attention

    return flex_attention(q, k, v, layout, **kwargs)


def _tokensparse(q, k, v, selection, **kwargs):
    from .kernels.tokensparse import tokensparse_attention

    return tokensparse_attention(q, k, v, selection, **kwargs)


def _pagesparse(q, k, v, selection, **kwargs):
    from .kernels.pagesparse import pagesparse_attention

    return pagesparse_attention(q, k, v, selection, **kwargs)


def _clustered(reference: bool):
    def run(q, k, v, selection, softcap=None, **kwargs):
        if softcap is not None:
            raise ValueError(
                "softcap is not supported for routing windows (a ClusterSelection): their kernel averages "
                "window softmaxes; use a Layout or token-selecting pattern, or softcap=None"
            )
        from .kernels.clustered import clustered_attention

        return clustered_attention(q, k, v, selection, reference=reference, **kwargs)

    return run


for _backend, _kernel in (
    ("reference", Kernel("reference", reference_attention)),
    ("blocksparse", Kernel("blocksparse", blocksparse_attention)),
    ("flex", Kernel("flex", _flex)),
    ("auto", Kernel("blocksparse or flex", _blocksparse_or_flex)),
):
    register_kernel(Layout, _backend, _kernel)
for _type, _kernel in (
    (TokenSelection, Kernel("tokensparse", _tokensparse)),
    (PageSelection, Kernel("pagesparse", _pagesparse)),
):
    register_kernel(_type, "auto", _kernel)
    register_kernel(_type, "blocksparse", _kernel)  # the block kernel's role for per-query selections
    register_kernel(_type, "reference", Kernel("reference", _on_dense_mask))
register_kernel(ClusterSelection, "auto", Kernel("clustered", _clustered(reference=False)))
register_kernel(ClusterSelection, "reference", Kernel("clustered reference", _clustered(reference=True)))


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
    softcap: Optional[float] = None,
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
        softcap: score soft-capping (Gemma 2): scaled scores ``s`` become ``softcap * tanh(s / softcap)``
            before the softmax; None (default) = off. Supported by every backend except routing windows.

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
    if softcap is not None:
        if (
            isinstance(softcap, bool)
            or not isinstance(softcap, (int, float))
            or not math.isfinite(softcap)
            or softcap <= 0
        ):
            raise ValueError(f"softcap must be a positive finite number or None, got {softcap!r}")
        softcap = float(softcap)
    plain = not return_lse and key_padding_mask is None and softcap is None  # SDPA's dense kernel can run it
    if pattern is None and backend == "auto" and plain:
        if not causal or q.shape[2] == k.shape[2]:  # plain dense: no layout to build (decoding calls this per step)
            return _sdpa_dense(q, k, v, causal, scale)
    selection, is_dense = resolve_selection(q, k, pattern, causal, key_padding_mask)
    if backend == "auto" and is_dense and plain:
        if not causal or q.shape[2] == k.shape[2]:
            return _sdpa_dense(q, k, v, causal, scale)
    kwargs = dict(scale=scale, key_padding_mask=key_padding_mask, return_lse=return_lse, softcap=softcap)
    return kernel_for(selection, backend).run(q, k, v, selection, **kwargs)
