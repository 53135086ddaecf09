"""Helpers shared by the datasets: padding collate (mask from lengths) and an on-disk array cache.

Padding masks are always built from the true lengths, never from ``token != pad``: in pixel and
byte tasks the value 0 is real data.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .._checks import check_int

__all__ = [
    "item_index",
    "pad_batch",
    "collate_classification",
    "collate_tokens",
    "cache_dir",
    "cached_arrays",
    "check_positive_int",
]

IGNORE_INDEX = -100


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    """Return ``value`` as int (numpy integers accepted), or raise naming ``name`` if it is not an int ``>= minimum``."""
    return check_int(None, name, value, minimum, numpy=True)


def item_index(i, length: int, owner: str) -> int:
    """Dataset index ``i`` (negative counts from the end) as an int in ``[0, length)``, or IndexError/TypeError."""
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
        raise TypeError(f"{owner} index must be an int, got {type(i).__name__}")
    if not -length <= i < length:
        raise IndexError(f"{owner} index {i} out of range for {length} examples")
    return int(i) % length


def pad_batch(seqs: Sequence[Tensor], pad_value: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pad 1-D long tensors -> ``(padded [B, Nmax], mask [B, Nmax] bool, lengths [B])``.

    ``mask[b, i]`` is True for real tokens, i.e. ``i < lengths[b]``.
    """
    if len(seqs) == 0:
        raise ValueError("cannot collate an empty batch")
    lengths = torch.tensor([int(s.shape[0]) for s in seqs], dtype=torch.long)
    n = int(lengths.max())
    out = torch.full((len(seqs), n), pad_value, dtype=torch.long)
    for b, s in enumerate(seqs):
        out[b, : s.shape[0]] = s
    mask = torch.arange(n).unsqueeze(0) < lengths.unsqueeze(1)
    return out, mask, lengths


def collate_classification(items, pad_id: int = 0) -> dict:
    """Items ``(tokens LongTensor [N_i], label int)`` -> dict.

    Returns ``{"tokens": [B, N] long, "target": [B] long, "mask": [B, N] bool (True = real token),
    "lengths": [B] long}``.
    """
    tokens, mask, lengths = pad_batch([it[0] for it in items], pad_id)
    target = torch.tensor([int(it[1]) for it in items], dtype=torch.long)
    return {"tokens": tokens, "target": target, "mask": mask, "lengths": lengths}


def collate_tokens(items, pad_id: int = 0) -> dict:
    """Items ``(tokens [N_i], targets [N_i])`` (per-position targets, -100 = no loss) -> dict.

    Returns ``{"tokens": [B, N], "target": [B, N] (padding = -100), "mask": [B, N] bool, "lengths": [B]}``.
    """
    tokens, mask, lengths = pad_batch([it[0] for it in items], pad_id)
    target, _, _ = pad_batch([it[1] for it in items], IGNORE_INDEX)
    return {"tokens": tokens, "target": target, "mask": mask, "lengths": lengths}


# ------------------------------------------------------------------------------------------------ cache


def cache_dir(path: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The cache directory: ``path`` if given, else ``$SPATTN_CACHE``, else ``~/.cache/spattn``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("SPATTN_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "spattn"


def _key(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def cached_arrays(kind: str, params: dict, make, directory=None, use_cache: bool = True) -> dict:
    """Load ``{name: ndarray}`` for ``params`` from the cache, or ``make()`` it and save it.

    The file ``<dir>/<kind>-<hash(params)>.npz`` also stores ``params`` as JSON and is checked on
    load. A file that cannot be read or whose parameters differ is reported with a warning naming
    the path and regenerated (then overwritten atomically). ``use_cache=False`` never touches disk.
    """
    if not use_cache:
        return make()
    root = cache_dir(directory)
    path = root / f"{kind}-{_key(params)}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                stored = json.loads(str(f["__params__"]))
                if stored != json.loads(json.dumps(params)):
                    raise ValueError(f"parameters {stored} differ from the requested {params}")
                return {k: f[k] for k in f.files if k != "__params__"}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            warnings.warn(
                f"spattn.data: cache file {path} is unreadable or corrupt ({e}); regenerating it", stacklevel=3
            )
    arrays = make()
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=root, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, __params__=np.array(json.dumps(params, sort_keys=True)), **arrays)
        os.replace(tmp, path)
    except OSError as e:  # an unwritable cache is not fatal: the data is in memory
        warnings.warn(f"spattn.data: could not write cache file {path} ({e})", stacklevel=3)
    return arrays
