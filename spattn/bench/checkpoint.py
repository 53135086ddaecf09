"""Training checkpoints on disk: atomic writes, a checksum, a schema version, field-by-field validation.

File layout (schema 2)::

    SPATTN-CHECKPOINT\\n
    {"schema": 2, "sha256": "<hex of the body>", "bytes": <body length>}\\n
    <body: torch.save of the payload dict>

A flipped or missing byte anywhere in the body changes its SHA-256, so damage is refused before
``torch.load`` sees the bytes; the body is loaded with ``weights_only=True`` (no code runs).
Schema-1 files (a bare ``torch.save`` of a payload with ``format == "spattn-train-v1"``, written
before checksums existed) are still read and validated, without a checksum to check.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import numbers
import os
from typing import Any

import torch

from .._checks import is_int

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_SCHEMA", "save_checkpoint", "load_checkpoint", "validate_payload"]

CHECKPOINT_FORMAT = "spattn-train"
CHECKPOINT_SCHEMA = 2
_LEGACY_FORMAT = "spattn-train-v1"
_MAGIC = b"SPATTN-CHECKPOINT\n"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default container


def save_checkpoint(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (temporary file, fsync, ``os.replace``) with its checksum.

    A crash or a signal while saving never leaves a half-written checkpoint behind: the old one stays
    until the new one is complete on disk.
    """
    payload = {**payload, "format": CHECKPOINT_FORMAT, "schema": CHECKPOINT_SCHEMA}
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    header = json.dumps({"schema": CHECKPOINT_SCHEMA, "sha256": hashlib.sha256(body).hexdigest(), "bytes": len(body)})
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(_MAGIC + header.encode() + b"\n")
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str) -> dict[str, Any]:
    """Read and validate a training checkpoint; anything missing, damaged or foreign raises ``ValueError``
    naming the file (and the field, for a malformed payload)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"checkpoint path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(_MAGIC):
        body = _checked_body(path, data)
        payload = _torch_load(path, body)
    elif data.startswith(_ZIP_MAGIC):
        payload = _torch_load(path, data)
        if isinstance(payload, dict) and payload.get("format") == _LEGACY_FORMAT:
            payload = {**payload, "schema": 1}
    else:
        raise ValueError(
            f"checkpoint {path!r} is corrupt or not a spattn training checkpoint "
            f"(it starts with {data[:16]!r}, not {_MAGIC!r})"
        )
    if not isinstance(payload, dict) or payload.get("format") not in (CHECKPOINT_FORMAT, _LEGACY_FORMAT):
        raise ValueError(
            f"checkpoint {path!r} is not a spattn training checkpoint (expected format {CHECKPOINT_FORMAT!r})"
        )
    validate_payload(payload, path)
    return payload


def _checked_body(path: str, data: bytes) -> bytes:
    end = data.find(b"\n", len(_MAGIC), len(_MAGIC) + 4096)
    try:
        header = json.loads(data[len(_MAGIC) : end].decode()) if end > 0 else None
    except (UnicodeDecodeError, ValueError):
        header = None
    if (
        not isinstance(header, dict)
        or not isinstance(header.get("sha256"), str)
        or not isinstance(header.get("bytes"), int)
    ):
        raise ValueError(f"checkpoint {path!r} is corrupt: its header is damaged")
    if header.get("schema") != CHECKPOINT_SCHEMA:
        raise ValueError(
            f"checkpoint {path!r} has schema version {header.get('schema')!r}; this spattn reads "
            f"{CHECKPOINT_SCHEMA} (and 1)"
        )
    body = data[end + 1 :]
    if len(body) != header["bytes"]:
        raise ValueError(
            f"checkpoint {path!r} is corrupt: {len(body)} bytes of data, the header says {header['bytes']} "
            "(a truncated or appended file)"
        )
    if hashlib.sha256(body).hexdigest() != header["sha256"]:
        raise ValueError(
            f"checkpoint {path!r} is corrupt: its SHA-256 checksum does not match (damaged bytes); "
            "restore it from a backup or start again with --overwrite"
        )
    return body


def _torch_load(path: str, data: bytes) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated/garbage files
        raise ValueError(
            f"checkpoint {path!r} is corrupt or not a spattn training checkpoint ({type(e).__name__}: {e})"
        ) from None


# ----------------------------------------------------------------------------------------- validation


def _fail(path: str, name: str, expected: str, got: Any) -> None:
    shown = repr(got) if isinstance(got, (int, float, str, bool, type(None))) else type(got).__name__
    raise ValueError(f"checkpoint {path!r}: field {name!r} must be {expected}, got {shown[:80]}")


def _count(path: str, name: str, v: Any) -> None:
    if not is_int(v) or v < 0:
        _fail(path, name, "an int >= 0", v)


def _str_dict(path: str, name: str, v: Any) -> None:
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        _fail(path, name, "a dict with str keys", v)


def validate_payload(ckpt: dict[str, Any], path: str = "<checkpoint>") -> None:
    """Check every field a resume reads, so a malformed file fails here with the field's name
    instead of deep inside ``load_state_dict`` (``IndexError``, ``AttributeError``, ...)."""
    required = (
        "model_config",
        "train_config",
        "model",
        "optimizer",
        "scheduler",
        "rng",
        "step",
        "epoch",
        "pos",
        "history",
        "best",
        "train_seconds",
    )
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {path!r}: missing field(s) {missing}")
    _str_dict(path, "model_config", ckpt["model_config"])
    _str_dict(path, "train_config", ckpt["train_config"])
    tc = ckpt["train_config"]
    if not isinstance(tc.get("task"), str):
        _fail(path, "train_config.task", "a task name (str)", tc.get("task"))
    if not isinstance(tc.get("task_options", {}), dict):
        _fail(path, "train_config.task_options", "a dict", tc.get("task_options"))
    _str_dict(path, "model", ckpt["model"])
    for k, t in ckpt["model"].items():
        if not isinstance(t, torch.Tensor):
            _fail(path, f"model.{k}", "a tensor", t)
    opt = ckpt["optimizer"]
    if (
        not isinstance(opt, dict)
        or not isinstance(opt.get("state"), dict)
        or not isinstance(opt.get("param_groups"), list)
        or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in opt["param_groups"])
    ):
        _fail(path, "optimizer", "an optimizer state dict ({'state': dict, 'param_groups': [dict with 'params']})", opt)
    _str_dict(path, "scheduler", ckpt["scheduler"])
    rng = ckpt["rng"]
    if not isinstance(rng, dict):
        _fail(path, "rng", "a dict of RNG states", rng)
    t = rng.get("torch")
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        _fail(path, "rng.torch", "a 1-D uint8 tensor (torch.get_rng_state())", t)
    py = rng.get("python")
    if not isinstance(py, (tuple, list)) or len(py) != 3 or not isinstance(py[1], (tuple, list)):
        _fail(path, "rng.python", "random.getstate() (a 3-tuple)", py)
    npy = rng.get("numpy")
    if not isinstance(npy, (tuple, list)) or len(npy) != 5 or not isinstance(npy[1], torch.Tensor):
        _fail(path, "rng.numpy", "numpy's (name, keys, pos, has_gauss, cached) state", npy)
    for name in ("step", "epoch", "pos"):
        _count(path, name, ckpt[name])
    hist = ckpt["history"]
    if not isinstance(hist, list) or not all(isinstance(h, dict) for h in hist):
        _fail(path, "history", "a list of dicts", hist)
    best = ckpt["best"]
    if (
        not isinstance(best, dict)
        or not isinstance(best.get("acc"), numbers.Real)
        or not isinstance(best.get("step"), int)
    ):
        _fail(path, "best", "a dict {'step': int, 'acc': float}", best)
    ts = ckpt["train_seconds"]
    if isinstance(ts, bool) or not isinstance(ts, numbers.Real) or not math.isfinite(ts) or ts < 0:
        _fail(path, "train_seconds", "a finite number >= 0", ts)
