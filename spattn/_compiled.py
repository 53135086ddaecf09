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

They are built on first use with ``torch.utils.cpp_extension.load`` (needs a C++ compiler and ninja;
about a minute on 2 cores) into a build directory keyed by the sources, the build flags, the torch
version and the Python ABI (:func:`build_dir`), so checkouts and environments sharing a machine
never rebuild each other's copy. A build writes a stamp (the library's SHA-256) only after it
succeeded; a library whose stamp is missing or does not match (an interrupted build, a truncated
file) is rebuilt, never loaded. Concurrent first uses, threads or processes, wait on one build
(a file lock beside the build directory). :func:`ops` returns None when the build is impossible or
disabled (``SPATTN_NO_EXT=1``); callers then run their eager path, which computes the same result
(a top-k may keep another of several equal scores).

Lowest layer (beside :mod:`spattn.layout`): imports nothing from spattn, so the decode selectors
(patterns) and the page-sparse kernel can both use it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import sys
import sysconfig
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

__all__ = ["ops", "build_error", "build_dir", "status"]

_SOURCES = [
    Path(__file__).with_name("csrc") / name
    for name in ("decode_cpu.cpp", "blocksparse_cpu.cpp", "blocksparse_backward_cpu.cpp")
]
# every header the sources include is part of the key (a new one cannot be forgotten here)
_HEADERS = sorted(Path(__file__).with_name("csrc").glob("*.h"))
# -fopenmp: at::parallel_for is a header template that runs serially unless compiled with OpenMP
_CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"]
_STAMP = "spattn-build.sha256"
_state: dict[str, Any] = {"tried": False, "ops": None, "error": None, "built_now": False}
_thread_lock = threading.Lock()


def source_key(sources: Optional[list[Path]] = None) -> str:
    """Hex digest of everything the library depends on: source bytes, flags, torch, Python ABI, platform."""
    digest = hashlib.sha256()
    for path in (_SOURCES if sources is None else sources) + _HEADERS:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    abi = sysconfig.get_config_var("SOABI") or sys.implementation.cache_tag
    for part in (" ".join(_CFLAGS), torch.__version__, abi, sys.platform, os.uname().machine):
        digest.update(str(part).encode() + b"\0")
    return digest.hexdigest()[:16]


def _cache_root() -> Path:
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(env) if env else Path.home() / ".cache" / "torch_extensions"


def build_dir(sources: Optional[list[Path]] = None) -> Path:
    """Where the library for these sources, this torch and this Python lives (created on build)."""
    return _cache_root() / f"spattn_cpu_{source_key(sources)}"


def _library_name(directory: Path) -> str:
    return directory.name  # spattn_cpu_<key>: unique per key, so two keys never share a symbol name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified_library(directory: Path) -> Optional[Path]:
    """The built library if its stamp matches its bytes, else None (missing, partial or damaged)."""
    lib = directory / f"{_library_name(directory)}.so"
    stamp = directory / _STAMP
    try:
        return lib if stamp.read_text().strip() == _sha256(lib) else None
    except OSError:
        return None


@contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """One build at a time per key: a thread lock in this process, a file lock across processes."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with _thread_lock, open(directory.parent / f"{directory.name}.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(directory: Path, sources: list[Path]) -> Path:
    """Compile into ``directory`` (emptied first) and stamp the result; returns the library path."""
    from torch.utils.cpp_extension import load

    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    print(
        f"spattn: building compiled CPU kernels, once, ~1 min (into {directory}; SPATTN_NO_EXT=1 skips them)",
        file=sys.stderr,
        flush=True,
    )
    # load() also loads the library into this process; its name is unique per key
    load(
        name=_library_name(directory),
        sources=[str(p) for p in sources],
        is_python_module=False,
        verbose=False,
        extra_cflags=_CFLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
    )
    lib = directory / f"{_library_name(directory)}.so"
    tmp = directory / (_STAMP + ".tmp")
    tmp.write_text(_sha256(lib) + "\n")
    os.replace(tmp, directory / _STAMP)  # the stamp appears atomically, after the library is complete
    _state["built_now"] = True
    return lib


def load_library(directory: Optional[Path] = None, sources: Optional[list[Path]] = None) -> Path:
    """Load the verified library for ``sources`` (default: spattn's), building it first if needed."""
    sources = _SOURCES if sources is None else sources
    directory = build_dir(sources) if directory is None else directory
    lib = _verified_library(directory)
    if lib is None:
        with _build_lock(directory):
            lib = _verified_library(directory)  # another thread or process may have built it meanwhile
            if lib is None:
                return _build(directory, sources)
    torch.ops.load_library(str(lib))
    return lib


def ops() -> Optional[Any]:
    """``torch.ops.spattn_cpu`` once built, or None (see :func:`build_error`)."""
    if _state["tried"]:
        return _state["ops"]
    if os.environ.get("SPATTN_NO_EXT", "") not in ("", "0"):
        _state["error"] = "disabled by SPATTN_NO_EXT"
    else:
        try:  # concurrent first calls are safe: load_library serialises the build
            _state["library"] = load_library()
            _state["ops"] = torch.ops.spattn_cpu
        except Exception as err:  # no compiler, no ninja, unsupported platform: the eager path stays
            _state["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
            warnings.warn(
                f"spattn: compiled CPU kernels unavailable ({_state['error']}); using the eager path "
                "(install a C++ compiler and ninja, e.g. pip install ninja)",
                RuntimeWarning,
                stacklevel=2,
            )
    _state["tried"] = True
    return _state["ops"]


def build_error() -> Optional[str]:
    """Why :func:`ops` returned None (None if it was not tried or succeeded)."""
    return _state["error"]


def status(build: bool = False) -> dict[str, Any]:
    """What ``spattn doctor`` reports: the keyed build directory, whether a verified library is there
    and loaded (a verified one is loaded; ``build=True`` also builds a missing one), the compiler,
    whether torch exports the BLAS the block-sparse loop calls, thread settings."""
    directory = build_dir()
    disabled = os.environ.get("SPATTN_NO_EXT", "") not in ("", "0")
    if not disabled and (build or _verified_library(directory) is not None):
        ops()
    loaded = _state["ops"] is not None
    return {
        "build_dir": str(directory),
        "built": _verified_library(directory) is not None,
        "loaded": loaded,
        "built_now": _state["built_now"],
        "disabled": disabled,
        "error": _state["error"],
        "compiler": shutil.which(os.environ.get("CXX", "c++")),
        "ninja": shutil.which("ninja") or _ninja_module(),
        "blas": bool(_state["ops"].block_sparse_blas()) if loaded else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "parallel_backend": _parallel_backend(),
        "env": {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCH_EXTENSIONS_DIR")},
    }


def _ninja_module() -> Optional[str]:
    import importlib.util

    spec = importlib.util.find_spec("ninja")
    return None if spec is None else f"python package ({spec.origin})"


def _parallel_backend() -> str:
    for line in torch.__config__.parallel_info().splitlines():
        if "parallel backend" in line:
            return line.split(":", 1)[1].strip()
    return "unknown"
