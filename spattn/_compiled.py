"""Optional compiled CPU loops (``csrc/*.cpp``): decoding with GQA-shared key sets, block-sparse prefill.

One decoding step attends one query per head to a few hundred cached keys: on CPU, eager PyTorch
spends most of such a step in per-operator overhead and in shapes its GEMMs handle poorly (three
query rows against 8k label columns). Two fused loops remove that:

* ``group_topk(q [B, Hq, D], labels [B, Hkv, r, N], channels [Hkv, r], count) -> [B, Hkv, count]``:
  Double Sparsity's grouped selection (max over a group's heads of ``q_h[channels] . labels``), the
  ``count`` best positions ascending;
* ``shared_rows_attention(q [B, Hq, D], k, v [B, Hkv, N, D], rows [B, Hkv, R], scale) -> (out, lse)``:
  softmax attention of every query head over the rows of its kv head (``-1`` = unused), each row
  read once per group;
* ``block_sparse_forward(q, k, v, kv_num, kv_idx, mask_id, masks, block_q, block_k, scale) -> (out, lse)``:
  inference forward of a block Layout (``csrc/blocksparse_cpu.cpp``): online softmax over the selected
  key blocks read in place, consecutive whole blocks merged into one GEMM, partial tiles masked by
  ``masks[mask_id]`` (see :mod:`spattn.kernels.blocksparse_cpu`).

They are built on first use with ``torch.utils.cpp_extension.load`` (needs a C++ compiler and
ninja; a few tens of seconds, cached under ``TORCH_EXTENSIONS_DIR``). :func:`ops` returns None when
the build is impossible or disabled (``SPATTN_NO_EXT=1``); callers then run their eager path, which
computes the same result (a top-k may keep another of several equal scores).

Lowest layer (beside :mod:`spattn.layout`): imports nothing from spattn, so the decode selectors
(patterns) and the page-sparse kernel can both use it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["ops", "build_error"]

_SOURCES = [Path(__file__).with_name("csrc") / name
            for name in ("decode_cpu.cpp", "blocksparse_cpu.cpp", "blocksparse_backward_cpu.cpp")]
_state: dict[str, Any] = {"tried": False, "ops": None, "error": None}


def ops() -> Optional[Any]:
    """``torch.ops.spattn_cpu`` once built, or None (see :func:`build_error`)."""
    if _state["tried"]:
        return _state["ops"]
    _state["tried"] = True
    if os.environ.get("SPATTN_NO_EXT", "") not in ("", "0"):
        _state["error"] = "disabled by SPATTN_NO_EXT"
        return None
    try:
        from torch.utils.cpp_extension import load

        load(name="spattn_cpu_kernels", sources=[str(path) for path in _SOURCES], is_python_module=False, verbose=False,
             extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
        _state["ops"] = torch.ops.spattn_cpu
    except Exception as err:  # no compiler, no ninja, unsupported platform: the eager path stays
        _state["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        warnings.warn(f"spattn: compiled CPU kernels unavailable ({_state['error']}); using the eager path "
                      "(install a C++ compiler and ninja, e.g. pip install ninja)", RuntimeWarning, stacklevel=2)
    return _state["ops"]


def build_error() -> Optional[str]:
    """Why :func:`ops` returned None (None if it was not tried or succeeded)."""
    return _state["error"]
