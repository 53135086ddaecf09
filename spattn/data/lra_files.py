"""Readers for the Long Range Arena data a user supplies (Tay et al., ICLR 2021). Nothing is downloaded.

Each ``load_*`` returns :class:`LRASplits` ``(train, val, test, collate, vocab_size, num_classes)``.
Accepted layouts (``data_dir`` may be the folder holding the files or any parent listed here):

* **Text** (IMDb, byte level; LRA read it with ``tfds imdb_reviews`` and used the test split as both
  val and test): either the official ``aclImdb/{train,test}/{pos,neg}/*.txt`` tree (the archive tfds
  reads), or two TSV files ``imdb.train.tsv`` and ``imdb.test.tsv`` with lines ``label<TAB>text``
  (label 0 = negative, 1 = positive; ``\\t``, ``\\n`` and ``\\\\`` escaped in the text).
  Tokens: UTF-8 bytes 0..255, truncated to ``max_len``.
* **Retrieval** (AAN citation pairs, byte level): ``new_aan_pairs.{train,eval,test}.tsv`` from
  ``lra_release/tsv_data/`` (no header; columns ``label id1 id2 text1 text2``, label written as
  ``0``/``1`` or ``0.0``/``1.0``). Each document truncated to ``max_len`` bytes; items
  ``(tokens1, tokens2, label)``.
* **Image** (grey CIFAR-10): the CIFAR-10 *python* release ``cifar-10-batches-py/data_batch_1..5`` and
  ``test_batch`` (pickled dicts with ``data [10000, 3072]`` uint8 channel-major RGB and ``labels``).
  Grey = ``round(0.2989 R + 0.5870 G + 0.1140 B)`` (the weights of ``tf.image.rgb_to_grayscale``;
  TF's float->uint8 rounding may differ by 1 level), 1024 pixel tokens in row-major order, vocab 256.
  Splits as LRA: train = first 45,000 training images, val = last 5,000, test = ``test_batch``.
  The pickles are read with a restricted unpickler that only accepts numpy arrays and builtins.
* **ListOps** (optional; the generator in :mod:`spattn.data.listops` needs no files):
  ``listops-1000/basic_{train,val,test}.tsv`` with header ``Source<TAB>Target``.
* **Pathfinder** (optional; :mod:`spattn.data.pathfinder` generates it): the release folders
  ``pathfinder<R>/<difficulty>/{metadata/*.npy, imgs/<k>/sample_<i>.png}``, PNGs decoded by a small
  built-in reader (8-bit greyscale, no PIL needed); split 80/10/10 in file order as LRA.

Padding masks always come from lengths (pixel 0 and byte 0 are data). Missing or malformed files raise
``FileNotFoundError``/``ValueError`` naming the path and what was expected.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import pickle
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ._common import check_positive_int, collate_classification, item_index, pad_batch

__all__ = [
    "LRASplits",
    "SequenceDataset",
    "PairDataset",
    "load_text",
    "load_retrieval",
    "load_image",
    "load_listops",
    "load_pathfinder",
    "collate_pairs",
    "read_cifar_batch",
    "to_grayscale",
    "read_png_gray",
]

PathLike = Union[str, os.PathLike]


class LRASplits(NamedTuple):
    train: Dataset
    val: Dataset
    test: Dataset
    collate: Callable
    vocab_size: int
    num_classes: int


class SequenceDataset(Dataset):
    """Item ``i``: ``(tokens LongTensor [len_i], label int)``; sequences stored as uint8 arrays."""

    pad_id = 0

    def __init__(self, seqs: Sequence[np.ndarray], labels: Sequence[int], vocab_size: int, num_classes: int):
        if len(seqs) != len(labels):
            raise ValueError(f"{len(seqs)} sequences but {len(labels)} labels")
        self.seqs, self.labels = list(seqs), np.asarray(labels, dtype=np.int64)
        self.vocab_size, self.num_classes = vocab_size, num_classes

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int):
        i = item_index(i, len(self), "SequenceDataset")
        return torch.from_numpy(self.seqs[i].astype(np.int64)), int(self.labels[i])


class PairDataset(Dataset):
    """Item ``i``: ``(tokens1 LongTensor [n1], tokens2 LongTensor [n2], label int)`` (two-tower tasks)."""

    pad_id = 0

    def __init__(
        self,
        first: Sequence[np.ndarray],
        second: Sequence[np.ndarray],
        labels: Sequence[int],
        vocab_size: int = 256,
        num_classes: int = 2,
    ):
        if not len(first) == len(second) == len(labels):
            raise ValueError(f"pair lists differ in length: {len(first)}, {len(second)}, {len(labels)}")
        self.first, self.second, self.labels = list(first), list(second), np.asarray(labels, dtype=np.int64)
        self.vocab_size, self.num_classes = vocab_size, num_classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        i = item_index(i, len(self), "PairDataset")
        return (
            torch.from_numpy(self.first[i].astype(np.int64)),
            torch.from_numpy(self.second[i].astype(np.int64)),
            int(self.labels[i]),
        )


def collate_bytes(items) -> dict:
    """Classification items -> ``{"tokens", "target", "mask" (from lengths), "lengths"}``; pad 0."""
    return collate_classification(items, pad_id=0)


def collate_pairs(items) -> dict:
    """``(t1, t2, label)`` items -> ``tokens/mask/lengths``, ``tokens2/mask2/lengths2``, ``target [B]``."""
    t1, m1, l1 = pad_batch([it[0] for it in items], 0)
    t2, m2, l2 = pad_batch([it[1] for it in items], 0)
    target = torch.tensor([int(it[2]) for it in items], dtype=torch.long)
    return {"tokens": t1, "mask": m1, "lengths": l1, "tokens2": t2, "mask2": m2, "lengths2": l2, "target": target}


# --------------------------------------------------------------------------------------------- helpers


def _find(data_dir: PathLike, names: Sequence[str], subdirs: Sequence[str], what: str) -> Path:
    """The first directory among ``data_dir`` and ``data_dir/<subdir>`` that holds all ``names``."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"LRA {what}: data_dir {root} is not a directory")
    tried = []
    for sub in ("",) + tuple(subdirs):
        d = root / sub if sub else root
        tried.append(str(d))
        if all((d / n).exists() for n in names):
            return d
    raise FileNotFoundError(f"LRA {what}: expected {', '.join(names)} in one of: {'; '.join(tried)}")


def _bytes(text: Union[str, bytes], max_len: int) -> np.ndarray:
    b = text.encode("utf-8") if isinstance(text, str) else text
    return np.frombuffer(b[:max_len], dtype=np.uint8).copy()


def _label(value: str, path: Path, line: int, allowed=(0, 1)) -> int:
    try:
        f = float(value)
    except ValueError:
        raise ValueError(f"{path}, line {line}: label {value!r} is not a number") from None
    if not math.isfinite(f) or f != int(f) or int(f) not in allowed:
        raise ValueError(f"{path}, line {line}: label {value!r} is not one of {allowed}")
    return int(f)


@contextlib.contextmanager
def _utf8(path: Path, where: Callable[[], str] = lambda: ""):
    """Turn a UTF-8 decoding error while reading ``path`` into a ValueError naming the file (and ``where()``)."""
    try:
        yield
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}{where()}: not valid UTF-8 text ({err.reason} at byte {err.start} of a read "
            "buffer); LRA text files are UTF-8"
        ) from None


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            out.append({"t": "\t", "n": "\n", "\\": "\\"}.get(nxt, "\\" + nxt))
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


# ------------------------------------------------------------------------------------------------- text


def _read_acl_split(split_dir: Path, max_len: int):
    seqs, labels = [], []
    for label, name in ((0, "neg"), (1, "pos")):
        d = split_dir / name
        if not d.is_dir():
            raise FileNotFoundError(f"LRA text: expected the IMDb folder {d} with one review per *.txt file")
        files = sorted(d.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"LRA text: no *.txt reviews in {d}")
        for f in files:
            seqs.append(_bytes(f.read_bytes(), max_len))
            labels.append(label)
    return seqs, labels


def _read_text_tsv(path: Path, max_len: int):
    seqs, labels = [], []
    n = 0
    with open(path, encoding="utf-8", newline="\n") as fh, _utf8(path, lambda: f", after line {n}"):
        for n, line in enumerate(fh, 1):
            line = line.rstrip("\n").rstrip("\r")
            if not line:
                continue
            if "\t" not in line:
                raise ValueError(f"{path}, line {n}: expected 'label<TAB>text'")
            lab, text = line.split("\t", 1)
            labels.append(_label(lab, path, n))
            seqs.append(_bytes(_unescape(text), max_len))
    if not seqs:
        raise ValueError(f"{path}: no examples (expected lines 'label<TAB>text')")
    return seqs, labels


def load_text(data_dir: PathLike, max_len: int = 1000) -> LRASplits:
    """LRA Text (IMDb, bytes): train = IMDb train, val = test = IMDb test (as LRA). See the module doc."""
    check_positive_int("max_len", max_len)
    root = Path(data_dir).expanduser()
    try:
        d = _find(root, ["imdb.train.tsv", "imdb.test.tsv"], ["imdb", "text"], "text")
        train = _read_text_tsv(d / "imdb.train.tsv", max_len)
        test = _read_text_tsv(d / "imdb.test.tsv", max_len)
    except FileNotFoundError as tsv_err:
        try:
            d = _find(root, ["train", "test"], ["aclImdb"], "text")
        except FileNotFoundError:
            raise FileNotFoundError(
                f"LRA text: found neither the aclImdb tree (aclImdb/{{train,test}}/{{pos,neg}}/*.txt) "
                f"nor imdb.train.tsv/imdb.test.tsv under {root} ({tsv_err})"
            ) from None
        train = _read_acl_split(d / "train", max_len)
        test = _read_acl_split(d / "test", max_len)
    tr = SequenceDataset(*train, vocab_size=256, num_classes=2)
    te = SequenceDataset(*test, vocab_size=256, num_classes=2)
    return LRASplits(tr, te, te, collate_bytes, 256, 2)


# -------------------------------------------------------------------------------------------- retrieval


def _read_aan(path: Path, max_len: int):
    first, second, labels = [], [], []
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    n = 0
    with open(path, encoding="utf-8", newline="") as fh, _utf8(path, lambda: f", after line {n}"):
        for n, row in enumerate(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
            if not row:
                continue
            if len(row) != 5:
                raise ValueError(
                    f"{path}, line {n}: expected 5 tab-separated columns "
                    f"(label, id1, id2, text1, text2), got {len(row)}"
                )
            labels.append(_label(row[0], path, n))
            first.append(_bytes(row[3], max_len))
            second.append(_bytes(row[4], max_len))
    if not labels:
        raise ValueError(f"{path}: no examples (expected 'label<TAB>id1<TAB>id2<TAB>text1<TAB>text2' lines)")
    return first, second, labels


def load_retrieval(data_dir: PathLike, max_len: int = 4000) -> LRASplits:
    """LRA Retrieval (AAN pairs, bytes, two towers) from ``new_aan_pairs.{train,eval,test}.tsv``."""
    check_positive_int("max_len", max_len)
    names = [f"new_aan_pairs.{s}.tsv" for s in ("train", "eval", "test")]
    d = _find(data_dir, names, ["tsv_data", "lra_release/tsv_data", "lra_release/lra_release/tsv_data"], "retrieval")
    splits = [PairDataset(*_read_aan(d / n, max_len)) for n in names]
    return LRASplits(splits[0], splits[1], splits[2], collate_pairs, 256, 2)


# ------------------------------------------------------------------------------------------------ image


class _ArrayUnpickler(pickle.Unpickler):
    """Only what a CIFAR-10 python batch needs: builtins containers and numpy array reconstruction."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("builtins", "bytes"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def read_cifar_batch(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch -> ``(images uint8 [n, 32, 32, 3], labels int64 [n])``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LRA image: CIFAR-10 batch file {path} not found")
    try:
        with open(path, "rb") as fh:
            d = _ArrayUnpickler(fh, encoding="bytes").load()
    except Exception as e:
        raise ValueError(
            f"{path}: not a CIFAR-10 python batch (a pickled dict with b'data' and b'labels'): {e}"
        ) from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(d).__name__}")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path}: the dict has no 'data'/'labels' entries (keys: {sorted(map(str, d))})")
    data = np.asarray(data)
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"{path}: labels must be a list of ints 0..9 ({e})") from None
    if labels.ndim != 1:
        raise ValueError(f"{path}: labels must be a flat list of ints 0..9, got shape {labels.shape}")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(
            f"{path}: expected data uint8 [n, 3072] and n labels, got {data.dtype} {data.shape} and {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels must be in 0..9")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def to_grayscale(rgb: np.ndarray) -> np.ndarray:
    """``[..., 3]`` uint8 RGB -> ``[...]`` uint8 grey with the weights of ``tf.image.rgb_to_grayscale``."""
    g = rgb.astype(np.float64) @ np.array([0.2989, 0.5870, 0.1140])
    return np.clip(np.round(g), 0, 255).astype(np.uint8)


def load_image(data_dir: PathLike, max_len: int = 1024) -> LRASplits:
    """LRA Image: grey CIFAR-10, 1024 pixel tokens (``max_len`` must be >= 1024; images are not cut)."""
    check_positive_int("max_len", max_len)
    if max_len < 1024:
        raise ValueError(f"LRA image sequences have 1024 pixels; max_len={max_len} is too short")
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    d = _find(data_dir, names, ["cifar-10-batches-py"], "image (CIFAR-10 python batches)")
    parts = [read_cifar_batch(d / n) for n in names]
    train_x = np.concatenate([p[0] for p in parts[:5]])
    train_y = np.concatenate([p[1] for p in parts[:5]])
    test_x, test_y = parts[5]

    def make(x, y):
        g = to_grayscale(x).reshape(len(x), 1024)
        return SequenceDataset(list(g), y, vocab_size=256, num_classes=10)

    cut = int(round(0.9 * len(train_x)))
    return LRASplits(
        make(train_x[:cut], train_y[:cut]),
        make(train_x[cut:], train_y[cut:]),
        make(test_x, test_y),
        collate_bytes,
        256,
        10,
    )


# ---------------------------------------------------------------------------------------------- listops


def load_listops(data_dir: PathLike, max_len: int = 2000) -> LRASplits:
    """The released LRA ListOps TSVs (``basic_{train,val,test}.tsv``, header ``Source<TAB>Target``)."""
    from . import listops

    check_positive_int("max_len", max_len)
    names = [f"basic_{s}.tsv" for s in ("train", "val", "test")]
    d = _find(data_dir, names, ["listops-1000", "lra_release/listops-1000"], "listops")
    out = []
    for n in names:
        path = d / n
        seqs, labels = [], []
        k = 1
        with open(path, encoding="utf-8") as fh, _utf8(path, lambda: f", after line {k}"):
            header = fh.readline().rstrip("\r\n")
            if header.split("\t") != ["Source", "Target"]:
                raise ValueError(f"{path}: expected the header 'Source<TAB>Target', got {header!r}")
            for k, line in enumerate(fh, 2):
                line = line.rstrip("\r\n")
                if not line:
                    continue
                parts = line.split("\t")
                if len(parts) != 2:
                    raise ValueError(f"{path}, line {k}: expected 'expression<TAB>label'")
                try:
                    ids = listops.from_text(parts[0])
                except ValueError as e:
                    raise ValueError(f"{path}, line {k}: {e}") from None
                seqs.append(np.asarray(ids[:max_len], dtype=np.uint8))
                labels.append(_label(parts[1], path, k, allowed=tuple(range(10))))
        out.append(SequenceDataset(seqs, labels, vocab_size=listops.VOCAB_SIZE, num_classes=10))
    return LRASplits(out[0], out[1], out[2], listops.collate, listops.VOCAB_SIZE, 10)


# ------------------------------------------------------------------------------------------- pathfinder


def read_png_gray(path: PathLike) -> np.ndarray:
    """Decode an 8-bit greyscale, non-interlaced PNG (what the Pathfinder release holds) -> uint8 [H, W]."""
    import zlib

    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise FileNotFoundError(f"Pathfinder image {path} cannot be read: {e}") from None
    if raw[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG file")
    pos, idat, header = 8, [], None
    while pos + 8 <= len(raw):
        n = int.from_bytes(raw[pos : pos + 4], "big")
        kind, body = raw[pos + 4 : pos + 8], raw[pos + 8 : pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None or len(header) < 13:
        raise ValueError(f"{path}: PNG without a valid IHDR chunk")
    w, h = int.from_bytes(header[0:4], "big"), int.from_bytes(header[4:8], "big")
    depth, color, interlace = header[8], header[9], header[12]
    if depth != 8 or color != 0 or interlace != 0:
        raise ValueError(
            f"{path}: expected an 8-bit greyscale non-interlaced PNG, got bit depth {depth}, "
            f"colour type {color}, interlace {interlace}"
        )
    try:
        data = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8)
    except zlib.error as e:
        raise ValueError(f"{path}: corrupt PNG image data ({e})") from None
    if data.size != h * (w + 1):
        raise ValueError(f"{path}: PNG data has {data.size} bytes, expected {h * (w + 1)} for {w}x{h}")
    rows = data.reshape(h, w + 1)
    out = np.zeros((h, w), dtype=np.uint8)
    prev = np.zeros(w, dtype=np.int64)
    for y in range(h):
        f, line = rows[y, 0], rows[y, 1:].astype(np.int64)
        if f == 0:
            cur = line
        elif f == 1:  # Sub: cumulative sum along the row, mod 256
            cur = np.cumsum(line) % 256
        elif f == 2:  # Up
            cur = (line + prev) % 256
        elif f in (3, 4):  # Average / Paeth: sequential in x
            cur = np.zeros(w, dtype=np.int64)
            for x in range(w):
                a = cur[x - 1] if x else 0
                b = prev[x]
                if f == 3:
                    pred = (a + b) // 2
                else:
                    c = prev[x - 1] if x else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                cur[x] = (line[x] + pred) % 256
        else:
            raise ValueError(f"{path}: unknown PNG filter type {f} in row {y}")
        out[y] = cur
        prev = cur
    return out


def load_pathfinder(
    data_dir: PathLike, resolution: int = 32, difficulty: str = "curv_contour_length_14", max_len: int = 0
) -> LRASplits:
    """The released Pathfinder images: ``pathfinder<R>/<difficulty>/metadata/*.npy`` + ``imgs/...png``.

    The metadata files are text (despite the suffix): one image per line, whitespace-separated, field 0/1
    the sub-directory and file name, field 3 the label. Files are read in numeric order of their names;
    empty (all-black) images are dropped (LRA filters them; there is one in ``curv_baseline``), and the
    list is split 80/10/10 in order, without shuffling, as LRA's TFDS slicing. Items ``(pixels [R*R], label)``.
    ``max_len`` (0 = unchecked) must be at least ``R*R``: images are never cut.
    """
    if resolution not in (32, 64, 128, 256):
        raise ValueError(f"resolution must be 32, 64, 128 or 256, got {resolution!r}")
    if max_len and max_len < resolution * resolution:
        raise ValueError(
            f"Pathfinder{resolution} sequences have {resolution * resolution} pixels; max_len={max_len} is too short"
        )
    base = _find(
        data_dir,
        ["metadata"],
        [
            f"pathfinder{resolution}/{difficulty}",
            f"lra_release/pathfinder{resolution}/{difficulty}",
            f"lra_release/lra_release/pathfinder{resolution}/{difficulty}",
        ],
        f"pathfinder{resolution} {difficulty}",
    )
    metas = sorted((base / "metadata").glob("*.npy"), key=lambda p: (len(p.stem), p.stem))
    if not metas:
        raise FileNotFoundError(f"LRA pathfinder: no metadata/*.npy files in {base}")
    seqs, labels = [], []
    for meta in metas:
        with _utf8(meta):
            text = meta.read_text(encoding="utf-8", errors="strict")
        for n, line in enumerate(text.splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 4:
                raise ValueError(
                    f"{meta}, line {n}: expected at least 4 whitespace-separated fields "
                    f"(subpath, file name, index, label, ...)"
                )
            img = read_png_gray(base / fields[0] / fields[1])
            if img.shape != (resolution, resolution):
                raise ValueError(
                    f"{base / fields[0] / fields[1]}: image is {img.shape}, expected {resolution}x{resolution}"
                )
            if not img.any():
                continue
            seqs.append(img.reshape(-1))
            labels.append(_label(fields[3], meta, n))
    if not seqs:
        raise ValueError(f"LRA pathfinder: no non-empty images listed under {base / 'metadata'}")
    a, b = int(0.8 * len(seqs)), int(0.9 * len(seqs))
    parts = [
        SequenceDataset(seqs[i:j], labels[i:j], vocab_size=256, num_classes=2)
        for i, j in ((0, a), (a, b), (b, len(seqs)))
    ]
    return LRASplits(parts[0], parts[1], parts[2], collate_bytes, 256, 2)
