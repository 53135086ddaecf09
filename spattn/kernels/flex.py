"""FlexAttention backend: softmax attention over a :class:`~spattn.layout.Layout` with PyTorch's
``torch.nn.attention.flex_attention``, compiled by Inductor.

The Layout becomes a ``BlockMask`` through :meth:`Layout.to_block_mask` (built from block indices,
never by sweeping a predicate over all N x N pairs); a key padding mask is folded in by moving
every *full* tile that holds a padded key to the *partial* tiles (where the predicate is
evaluated), dropping tiles whose keys are all padding, and and-ing the predicate with the padding.

Where it runs (decided here, documented in :func:`flex_attention`):

* **CUDA**: compiled forward and backward, ``return_lse`` supported.
* **CPU** (x86 with AVX2 or better, Linux/Windows, torch >= 2.6): compiled **forward only**.
  Inductor's CPU template cannot produce the log-sum-exp and torch >= 2.11 rejects any CPU call
  whose inputs require grad, so with grad required (grad mode on and q/k/v ``requires_grad``) or
  with ``return_lse=True`` the call falls back to the eager ``blocksparse`` kernel, with a
  one-time ``UserWarning`` saying why. CPU dtypes: float32, bfloat16, float16 (float64 raises
  ``TypeError``).
* **Anywhere the compiled kernel cannot exist** (no AVX2, macOS, dynamo unsupported on this
  Python, no C++ compiler, other devices) :func:`flex_attention` raises ``RuntimeError``: a caller
  who asked for ``flex`` explicitly should learn it is not running, not silently get another
  kernel on every call. ``backend="auto"`` consults :func:`flex_available` first.

One compiled callable (``torch.compile(flex_attention, fullgraph=True, dynamic=False)``) is shared
by every call. Each new shape, dtype or predicate costs one compilation (seconds on CPU); the
dynamo recompile limit is raised to :data:`RECOMPILE_LIMIT` around our calls, because with
``fullgraph=True`` dynamo otherwise *fails* after 8 shapes (and without it silently falls back to
the eager FlexAttention, which materialises the N x N scores).
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import warnings
from typing import Optional, Union

import torch
import torch._dynamo
from torch import Tensor

from .._checks import check_kind
from ..layout import Layout
from ._finite import nan_exact

__all__ = ["flex_attention", "flex_available", "compiled_flex_attention", "RECOMPILE_LIMIT", "CPU_DTYPES"]

#: dynamo recompile limit used around calls of the shared compiled FlexAttention
RECOMPILE_LIMIT = 64
#: dtypes Inductor's CPU FlexAttention template accepts
CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _unavailable_reason(device: Union[str, torch.device]) -> Optional[str]:
    """None when compiled FlexAttention can run on ``device``, else a sentence saying why not."""
    dev = torch.device(device)
    if dev.type == "cuda":  # availability can change (CUDA_VISIBLE_DEVICES, lazy init): not cached
        return _check_device("cuda")
    return _check_device_cached(dev.type)


def _check_device(dev_type: str) -> Optional[str]:
    dev = torch.device(dev_type)
    try:
        from torch.nn.attention import flex_attention as _fa

        del _fa
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention (needs torch >= 2.5)"
    try:
        if not torch._dynamo.is_dynamo_supported():
            return f"torch.compile (dynamo) is not supported on Python {sys.version.split()[0]} with this torch build"
    except Exception as err:  # pragma: no cover - broken installs
        return f"torch.compile is unusable here ({type(err).__name__}: {err})"
    if dev.type == "cpu":
        if _torch_version() < (2, 6):
            return f"compiled FlexAttention on CPU needs torch >= 2.6, found {torch.__version__}"
        if sys.platform == "darwin":
            return "Inductor's CPU FlexAttention kernel is not supported on macOS"
        avx2 = getattr(torch.cpu, "_is_avx2_supported", lambda: False)()
        if not avx2 or os.environ.get("ATEN_CPU_CAPABILITY") == "default":
            return (
                "Inductor's CPU FlexAttention kernel needs an x86 CPU with AVX2 "
                f"(this CPU reports capability {torch.backends.cpu.get_cpu_capability()!r})"
            )
        if hasattr(torch, "xpu") and torch.xpu.is_available():
            return "Inductor's CPU FlexAttention kernel is disabled when an XPU device is present"
        if sys.platform != "win32":
            try:
                from torch._inductor import config as ind_config

                cxx = ind_config.cpp.cxx
                names = cxx if isinstance(cxx, (list, tuple)) else (cxx,)
                names = [n for n in names if n] or ["g++", "clang++"]
            except Exception:  # pragma: no cover
                names = ["g++", "clang++"]
            if not any(shutil.which(n) for n in names) and not os.environ.get("CXX"):
                return "torch.compile on CPU needs a C++ compiler (g++ or clang++) on PATH"
        return None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        try:
            from torch.utils._triton import has_triton

            if not has_triton():
                return "compiled FlexAttention on CUDA needs Triton, which is not installed"
        except ImportError:  # pragma: no cover
            pass
        return None
    return f"spattn's flex backend supports CPU and CUDA devices, got {dev.type!r}"


_check_device_cached = functools.lru_cache(maxsize=None)(_check_device)


def flex_available(device: Union[str, torch.device] = "cpu") -> bool:
    """Whether compiled FlexAttention can run on ``device`` (static checks, no compilation).

    CPU needs torch >= 2.6, an AVX2 x86 CPU, not macOS, a C++ compiler; CUDA needs Triton.
    Even when True, CPU calls that need gradients or the log-sum-exp use the ``blocksparse``
    fallback (see :func:`flex_attention`).
    """
    return _unavailable_reason(device) is None


@functools.lru_cache(maxsize=1)
def compiled_flex_attention():
    """The one shared ``torch.compile(flex_attention, fullgraph=True, dynamic=False)``."""
    from torch.nn.attention.flex_attention import flex_attention as _flex

    return torch.compile(_flex, fullgraph=True, dynamic=False)


# ---------------------------------------------------------------------------------------- helpers
def _blocks_to_map(num: Tensor, idx: Tensor, nkb: int) -> Tensor:
    """(count, indices) -> bool map [..., NKB]."""
    slots = idx.shape[-1]
    valid = torch.arange(slots, device=idx.device) < num[..., None].long()
    where = torch.where(valid, idx.long(), torch.full_like(idx, nkb, dtype=torch.long))
    out = torch.zeros(*num.shape, nkb + 1, dtype=torch.bool, device=idx.device)
    return out.scatter_(-1, where, True)[..., :nkb]


def _map_to_blocks(block_map: Tensor) -> tuple[Tensor, Tensor]:
    """bool map [..., NKB] -> (int32 count, int32 indices [..., NKB], True entries first, ascending)."""
    num = block_map.sum(-1, dtype=torch.int32)
    idx = torch.sort((~block_map).to(torch.uint8), dim=-1, stable=True).indices
    return num, idx.to(torch.int32)


def _with_key_padding(block_mask, key_padding_mask: Tensor, kv_len: int):
    """A BlockMask that also excludes keys where ``key_padding_mask [B, Nk]`` is False."""
    from torch.nn.attention.flex_attention import BlockMask

    kpm = key_padding_mask.to(device=block_mask.kv_indices.device)
    batch = kpm.shape[0]
    block_q, block_k = block_mask.BLOCK_SIZE
    nkb = -(-kv_len // block_k)
    part = _blocks_to_map(block_mask.kv_num_blocks, block_mask.kv_indices, nkb)
    if block_mask.full_kv_num_blocks is not None:
        full = _blocks_to_map(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, nkb)
    else:
        full = torch.zeros_like(part)
    heads, nqb = part.shape[1], part.shape[2]
    part = part.expand(batch, heads, nqb, nkb)
    full = full.expand(batch, heads, nqb, nkb)
    padded = torch.nn.functional.pad(~kpm, (0, nkb * block_k - kv_len), value=False).view(batch, nkb, block_k)
    real = torch.nn.functional.pad(kpm, (0, nkb * block_k - kv_len), value=False).view(batch, nkb, block_k)
    some_pad = padded.any(-1)[:, None, None, :]
    some_real = real.any(-1)[:, None, None, :]
    new_part = (part | (full & some_pad)) & some_real
    new_full = full & ~some_pad
    inner = block_mask.mask_mod
    last = kv_len - 1

    def mask_mod(b, h, q_idx, kv_idx):
        return inner(b, h, q_idx, kv_idx) & kpm[b, kv_idx.clamp(0, last)]

    p_num, p_idx = _map_to_blocks(new_part)
    f_num, f_idx = _map_to_blocks(new_full)
    return BlockMask.from_kv_blocks(
        p_num,
        p_idx,
        f_num,
        f_idx,
        BLOCK_SIZE=(block_q, block_k),
        mask_mod=mask_mod,
        seq_lengths=(block_mask.seq_lengths[0], kv_len),
    )


def _layout_block_mask(layout: Layout, device: torch.device):
    """``layout.to_block_mask()`` on ``device``, built once per (layout, device) and kept on the layout.

    (A Layout is treated as immutable. The cache lives in the layout's ``__dict__`` so it dies with it.)
    """
    cache = layout.__dict__.setdefault("_flex_block_masks", {})
    bm = cache.get(device)
    if bm is None:
        bm = layout.to_block_mask()  # also fills the layout's lookup tables outside the compiled region
        cache[device] = bm
    return bm


def _validate(q: Tensor, k: Tensor, v: Tensor, layout: Layout, key_padding_mask: Optional[Tensor]) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H, N, D], got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    check_kind("layout", layout, Layout, "spattn.Layout")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, Hq, Nq, D = q.shape
    if k.shape != v.shape[:3] + (k.shape[3],) or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in batch, heads and length")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} must match q {tuple(q.shape)} in batch and head dim")
    Hkv, Nk = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if (layout.q_len, layout.kv_len) != (Nq, Nk):
        raise ValueError(f"layout is for (q_len, kv_len)=({layout.q_len}, {layout.kv_len}), inputs have ({Nq}, {Nk})")
    if layout.batch not in (1, B) or layout.heads not in (1, Hq):
        raise ValueError(
            f"layout batch/heads ({layout.batch}, {layout.heads}) must be 1 or ({B}, {Hq}) (batch, query heads)"
        )
    if layout.device.type != q.device.type or (
        q.device.index is not None and layout.device.index not in (None, q.device.index)
    ):
        raise ValueError(
            f"layout is on {layout.device} but q is on {q.device}: build the layout on q's device "
            "(pattern.layout(q, k) does; its predicate's tensors must live where the kernel runs)"
        )
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor [B, Nk] (True = real key)")
        if tuple(key_padding_mask.shape) != (B, Nk):
            raise ValueError(f"key_padding_mask must have shape {(B, Nk)}, got {tuple(key_padding_mask.shape)}")


def _fallback(q, k, v, layout, scale, key_padding_mask, return_lse, softcap=None):
    from .blocksparse import blocksparse_attention

    return blocksparse_attention(
        q, k, v, layout, scale=scale, key_padding_mask=key_padding_mask, return_lse=return_lse, softcap=softcap
    )


@functools.lru_cache(maxsize=32)
def _softcap_score_mod(softcap: float):
    """FlexAttention ``score_mod`` for ``softcap * tanh(s / softcap)`` on scaled scores; one function
    object per cap value, so a repeated call does not recompile."""

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / softcap) * softcap

    return score_mod


def flex_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: Layout,
    *,
    scale: Optional[float] = None,
    key_padding_mask: Optional[Tensor] = None,
    return_lse: bool = False,
    softcap: Optional[float] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Softmax attention restricted to ``layout``, run by compiled FlexAttention.

    ``q [B, Hq, Nq, D]``, ``k``/``v [B, Hkv, Nk, D]`` (``Hq % Hkv == 0``; GQA via ``enable_gqa``),
    ``layout`` a Layout for ``(Nq, Nk)`` with batch/heads 1 or ``(B, Hq)``,
    ``key_padding_mask`` bool ``[B, Nk]`` (True = real key). Returns ``out [B, Hq, Nq, D]`` or
    ``(out, lse)`` with ``lse [B, Hq, Nq]`` float32 (natural log, ``-inf`` for rows with no key).
    Rows with no allowed key give zeros. ``softcap``: scaled scores ``s`` become
    ``softcap * tanh(s / softcap)`` (a ``score_mod``; Gemma 2).

    On CPU FlexAttention is inference-only and has no log-sum-exp output: when grad mode is on and
    any of q/k/v requires grad, or when ``return_lse=True``, this falls back to
    :func:`spattn.kernels.blocksparse.blocksparse_attention` (one-time ``UserWarning``).
    Raises ``RuntimeError`` where compiled FlexAttention cannot run (see :func:`flex_available`),
    ``TypeError`` for float64 on CPU.
    """
    _validate(q, k, v, layout, key_padding_mask)
    on_cpu = q.device.type == "cpu"
    reason = _unavailable_reason(q.device)
    if reason is not None:
        raise RuntimeError(f"flex backend unavailable: {reason}; use backend='blocksparse' (or 'auto')")
    if on_cpu and q.dtype not in CPU_DTYPES:
        raise TypeError(
            f"FlexAttention on CPU supports float32, bfloat16 and float16, got {q.dtype}; "
            "use backend='blocksparse' or 'reference' for float64"
        )
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if on_cpu and (needs_grad or return_lse):
        if needs_grad:
            _warn_once(
                "grad",
                "spattn flex backend: FlexAttention has no backward on CPU (torch >= 2.11 rejects CPU inputs "
                "that require grad), so this call and later ones like it use the eager 'blocksparse' kernel.",
            )
        else:
            _warn_once(
                "lse",
                "spattn flex backend: FlexAttention's compiled CPU kernel cannot return the log-sum-exp, "
                "so calls with return_lse=True on CPU use the eager 'blocksparse' kernel.",
            )
        return _fallback(q, k, v, layout, scale, key_padding_mask, return_lse, softcap)
    layout.check()
    block_mask = _layout_block_mask(layout, q.device)
    if key_padding_mask is not None:
        block_mask = _with_key_padding(block_mask, key_padding_mask, k.shape[-2])
    if on_cpu:
        # grad mode is off here; FlexAttention rejects CPU inputs that merely *carry* requires_grad
        q, k, v = q.detach(), k.detach(), v.detach()

    def run(q, k, v):
        return _run_flex(q, k, v, block_mask, scale, return_lse, softcap)

    def probe(q, k, v):  # which rows see which NaN: same layout and padding, no new compilation
        return _fallback(q, k, v, layout, scale, key_padding_mask, False)

    return nan_exact(run, q, k, v, probe=probe)


def _run_flex(
    q: Tensor, k: Tensor, v: Tensor, block_mask, scale: Optional[float], return_lse: bool, softcap: Optional[float]
):
    """The compiled FlexAttention call on NaN-free inputs (empty rows: zeros, lse ``-inf``)."""
    gqa = q.shape[1] != k.shape[1]
    extra = {} if softcap is None else {"score_mod": _softcap_score_mod(float(softcap))}
    fn = compiled_flex_attention()
    with torch._dynamo.config.patch(recompile_limit=max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)):
        if return_lse:
            out, lse = fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_lse=True, **extra)
            empty = torch.isneginf(lse) | torch.isnan(lse)
            lse = lse.float().masked_fill(empty, float("-inf"))
            out = out.masked_fill(empty[..., None], 0.0)
            return out, lse
        out = fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, **extra)
    return out
