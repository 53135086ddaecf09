"""Byte-level language-model corpus from text already on the machine: the Python standard library.

The corpus is every ``*.py`` file of the running interpreter's standard library (found with
``sysconfig.get_paths()["stdlib"]``; ``site-packages`` and, by default, the ``test``/``tests``/
``idle_test`` directories excluded), which includes ``pydoc_data/topics.py`` (~0.75 MB of English
prose: the language reference's help topics). About 12 MB for CPython 3.11. Nothing is downloaded.

**Split by file.** A file belongs to ``val`` when ``crc32(relative path) % 100 < val_percent``
(default 5), else to ``train``: deterministic, independent of the order files are found in, and a
file is never in both. (``"test"`` is an alias of ``"val"``.) The exact text depends on the Python
version, so bits-per-byte numbers are comparable only on the same interpreter: the dataset records
``python_version``.

Items are byte windows: ``(tokens LongTensor [seq_len], targets LongTensor [seq_len])`` with
``targets = next bytes`` (vocab 256). ``sampling="random"``: window ``i`` starts at an offset drawn
from ``(seed, i)`` (deterministic, order-free); ``"sequential"``: windows evenly spaced over the split
(stride ``seq_len`` when ``num_examples`` is None). Files are concatenated in sorted path order.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import zlib
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ._common import check_positive_int, collate_tokens, item_index

__all__ = ["ByteLMDataset", "stdlib_root", "corpus_files", "split_files", "collate"]

SPLITS = ("train", "val", "test")
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_TEST_DIRS = {"test", "tests", "idle_test"}


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"the Python standard library directory {root} does not exist")
    return root


def corpus_files(root: Optional[Union[str, os.PathLike]] = None, include_tests: bool = False) -> list[str]:
    """Sorted relative paths of the ``*.py`` files under ``root`` (default: the standard library)."""
    if root is not None and not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a directory path or None, got {type(root).__name__}")
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"corpus root {root} is not a directory")
    skip = _EXCLUDED_DIRS | (set() if include_tests else _TEST_DIRS)
    files = []
    for f in root.rglob("*.py"):
        rel = f.relative_to(root)
        if skip & set(rel.parts[:-1]) or not f.is_file():
            continue
        files.append(rel.as_posix())
    if not files:
        raise FileNotFoundError(f"no *.py files found under {root}")
    return sorted(files)


def split_files(files: Sequence[str], split: str, val_percent: int = 5) -> list[str]:
    """The files of ``split``: ``val`` iff ``crc32(path) % 100 < val_percent``; ``test`` = ``val``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not (isinstance(val_percent, int) and 0 < val_percent < 100):
        raise ValueError(f"val_percent must be an int in 1..99, got {val_percent!r}")
    want_val = split != "train"
    return [f for f in files if (zlib.crc32(f.encode()) % 100 < val_percent) == want_val]


class ByteLMDataset(Dataset):
    """Fixed-length byte windows of one split of the stdlib corpus (see the module docstring).

    Attributes: ``vocab_size = num_classes = 256``, ``pad_id = 0`` (never used: all windows are full),
    ``files`` (relative paths of the split), ``data`` (uint8 tensor of the concatenated split),
    ``python_version``.
    """

    vocab_size = 256
    num_classes = 256
    pad_id = 0

    def __init__(
        self,
        split: str = "train",
        seq_len: int = 2048,
        num_examples: Optional[int] = None,
        seed: int = 0,
        sampling: Optional[str] = None,
        root: Optional[Union[str, os.PathLike]] = None,
        include_tests: bool = False,
        val_percent: int = 5,
    ):
        check_positive_int("seq_len", seq_len)
        check_positive_int("seed", seed, 0)
        if num_examples is not None:
            check_positive_int("num_examples", num_examples)
        sampling = sampling or ("random" if split == "train" else "sequential")
        if sampling not in ("random", "sequential"):
            raise ValueError(f"sampling must be 'random' or 'sequential', got {sampling!r}")
        base = Path(root) if root is not None else stdlib_root()
        self.files = split_files(corpus_files(base, include_tests), split, val_percent)
        if not self.files:
            raise ValueError(f"split {split!r} of {base} has no files (val_percent={val_percent})")
        chunks = []
        for rel in self.files:
            path = base / rel
            try:
                chunks.append(np.frombuffer(path.read_bytes(), dtype=np.uint8))
            except OSError as e:
                raise OSError(f"cannot read corpus file {path}: {e}") from e
        self.data = torch.from_numpy(np.concatenate(chunks))  # uint8; windows are converted to long
        n = self.data.numel()
        if n < seq_len + 1:
            raise ValueError(f"split {split!r} has {n} bytes, fewer than seq_len + 1 = {seq_len + 1}")
        self.split, self.seq_len, self.seed, self.sampling = split, int(seq_len), int(seed), sampling
        self.python_version = "%d.%d.%d" % sys.version_info[:3]
        self._max_start = n - seq_len - 1
        self.num_examples = int(num_examples) if num_examples is not None else (n - 1) // seq_len
        if sampling == "sequential":
            self._stride = seq_len if num_examples is None else max(1, self._max_start // max(1, self.num_examples - 1))
            if (self.num_examples - 1) * self._stride > self._max_start:
                raise ValueError(
                    f"split {split!r} ({n} bytes) is too short for {self.num_examples} sequential windows of {seq_len}"
                )

    def __len__(self) -> int:
        return self.num_examples

    def start(self, i: int) -> int:
        """Offset of window ``i`` in :attr:`data`."""
        if self.sampling == "sequential":
            return i * self._stride
        return int(np.random.default_rng([self.seed, i]).integers(0, self._max_start + 1))

    def __getitem__(self, i: int):
        i = item_index(i, len(self), "ByteLMDataset")
        s = self.start(i)
        w = self.data[s : s + self.seq_len + 1].long()
        return w[:-1], w[1:]

    @staticmethod
    def collate(items) -> dict:
        return collate(items)


def collate(items) -> dict:
    """``{"tokens": [B, L], "target": [B, L] (next bytes), "mask": [B, L] bool, "lengths": [B]}``."""
    return collate_tokens(items, pad_id=0)
