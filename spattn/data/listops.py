"""Long ListOps, the LRA generator (Tay et al., ICLR 2021; after Nangia & Bowman, NAACL-SRW 2018).

Follows ``lra_benchmarks/data/listops.py`` (``reference/benchmarks.md`` §2.2): a random expression
tree is grown top-down; at depth ``d < max_depth`` a node is a digit with probability 0.75, else an
operator ``[MIN``, ``[MAX``, ``[MED`` (median, truncated to an int) or ``[SM`` (sum mod 10) over
``U{2..max_args}`` children, closed by ``]``. Trees are kept only if ``min_len < length < max_len``
tokens (strict, as LRA; defaults 500 and 2000) and are de-duplicated. The label is the value (0-9).

Tokenisation as the LRA input pipeline: parentheses dropped, ``]`` is a token of its own (LRA spells
it ``X``), one token per symbol: ``0`` = padding, digits ``0..9`` -> 1..10, ``[MIN [MAX [MED [SM``
-> 11..14, ``]`` -> 15 (``VOCAB_SIZE = 16``).

**Label skew.** The classes are not balanced: with the LRA defaults about 17.5% of expressions
evaluate to 0 and 17.5% to 9 (MIN and MAX over many arguments saturate), the other digits 7-9% each.
Always-predict-the-majority therefore scores ~17.5%, not 10% — this is roughly what Performer and the
Linear Transformer score in LRA. :func:`majority_accuracy` and :attr:`ListOpsDataset.majority_accuracy`
give the exact number for a split.

Differences from the original script (on purpose): an explicit seeded PRNG per split; a tree is
abandoned as soon as it reaches ``max_len`` tokens (it would be rejected anyway, so the accepted
distribution is unchanged); splits are made exactly disjoint by assigning each distinct expression to
one split by a hash of its tokens (train 3/5 of the hash space, val 1/5, test 1/5), instead of
slicing one shuffled set. Generated splits are cached to disk (see :func:`spattn.data._common.cache_dir`).
"""

from __future__ import annotations

import random
import zlib
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ._common import cached_arrays, check_positive_int, collate_classification, item_index

__all__ = [
    "ListOpsDataset",
    "generate",
    "evaluate",
    "to_text",
    "from_text",
    "collate",
    "majority_accuracy",
    "TOKENS",
    "VOCAB_SIZE",
    "PAD_ID",
    "NUM_CLASSES",
    "OPERATORS",
]

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
TOKENS = ("<pad>",) + tuple(str(d) for d in range(10)) + OPERATORS + ("]",)
VOCAB_SIZE = len(TOKENS)
PAD_ID = 0
NUM_CLASSES = 10
CLOSE = TOKENS.index("]")
_DIGIT0 = 1
_OP0 = TOKENS.index("[MIN")
VALUE_P = 0.25
SPLITS = ("train", "val", "test")
_BUCKETS = {"train": (0, 1, 2), "val": (3,), "test": (4,)}
_VERSION = 1


class _TooLong(Exception):
    pass


def _apply(op: int, args: list[int]) -> int:
    if op == 0:
        return min(args)
    if op == 1:
        return max(args)
    if op == 2:
        s = sorted(args)
        n = len(s)
        return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) // 2  # int(np.median): truncation
    return sum(args) % 10


def _tree(rand, depth: int, max_depth: int, max_args: int, limit: int, out: list) -> int:
    """Append the tokens of a random subtree to ``out``; return its value. Raise if ``len(out) >= limit``.

    ``rand`` is a ``random.Random().random``; integer draws use ``int(rand() * n)`` (uniform on 0..n-1)
    because ``randrange`` is several times slower in pure Python.
    """
    r = rand() if depth < max_depth else 1.0
    if r > VALUE_P:
        v = int(rand() * 10)
        out.append(_DIGIT0 + v)
        if len(out) >= limit:
            raise _TooLong
        return v
    n = 2 + int(rand() * (max_args - 1))  # U{2..max_args}
    at = len(out)
    out.append(-1)  # the operator is drawn after the children, as in LRA
    vals = [_tree(rand, depth + 1, max_depth, max_args, limit, out) for _ in range(n)]
    op = int(rand() * 4)
    out[at] = _OP0 + op
    out.append(CLOSE)
    if len(out) >= limit:
        raise _TooLong
    return _apply(op, vals)


def _bucket(tokens: list[int]) -> int:
    return zlib.crc32(bytes(tokens)) % 5


def generate(
    num_examples: int,
    seed: int = 0,
    split: str = "train",
    min_len: int = 500,
    max_len: int = 2000,
    max_depth: int = 10,
    max_args: int = 10,
) -> tuple[list[list[int]], list[int]]:
    """Generate ``num_examples`` distinct expressions of ``split`` -> ``(token lists, labels)``.

    Lengths satisfy ``min_len < len < max_len``. Deterministic in ``(seed, split, lengths, depth, args)``.
    """
    _check(num_examples, seed, split, min_len, max_len, max_depth, max_args)
    rng = random.Random(f"spattn-listops-{seed}-{split}")
    buckets = _BUCKETS[split]
    seen: set[bytes] = set()
    seqs: list[list[int]] = []
    labels: list[int] = []
    while len(seqs) < num_examples:
        out: list[int] = []
        try:
            value = _tree(rng.random, 1, max_depth, max_args, max_len, out)
        except _TooLong:
            continue
        if len(out) <= min_len or _bucket(out) not in buckets:
            continue
        key = bytes(out)
        if key in seen:
            continue
        seen.add(key)
        seqs.append(out)
        labels.append(value)
    return seqs, labels


def _check(num_examples, seed, split, min_len, max_len, max_depth, max_args):
    check_positive_int("num_examples", num_examples, 0)
    check_positive_int("seed", seed, 0)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    check_positive_int("min_len", min_len, 0)
    check_positive_int("max_len", max_len, 2)
    check_positive_int("max_depth", max_depth, 1)
    check_positive_int("max_args", max_args, 2)
    if max_len - min_len < 2:
        raise ValueError(
            f"need min_len < length < max_len with room for one length; got min_len={min_len}, max_len={max_len}"
        )
    if max_depth == 1 and min_len >= 1:
        raise ValueError(f"max_depth=1 only yields single digits (length 1), none longer than min_len={min_len}")


def evaluate(tokens) -> int:
    """Value of a tokenised expression (for inspection; the generator computes labels while growing trees)."""
    seq = [int(t) for t in tokens]
    stack: list[list[int]] = [[]]
    for t in seq:
        if _DIGIT0 <= t < _DIGIT0 + 10:
            stack[-1].append(t - _DIGIT0)
        elif _OP0 <= t < _OP0 + len(OPERATORS):
            stack.append([t - _OP0])
        elif t == CLOSE:
            if len(stack) < 2:
                raise ValueError("tokens: unbalanced expression, ']' without an operator")
            op, *args = stack.pop()
            stack[-1].append(_apply(op, args))
        else:
            raise ValueError(f"tokens: token id {t} is not a ListOps symbol")
    if len(stack) != 1 or len(stack[0]) != 1:
        raise ValueError("tokens: the expression does not reduce to one value (empty or unbalanced)")
    return stack[0][0]


def to_text(tokens) -> str:
    """Token ids -> LRA-style source text, e.g. ``[MAX 2 9 [MIN 4 7 ] 0 ]`` (padding dropped)."""
    return " ".join(TOKENS[int(t)] for t in tokens if int(t) != PAD_ID)


def from_text(text: str) -> list[int]:
    """LRA source text (parentheses and ``X`` for ``]`` accepted, as in the release TSVs) -> token ids."""
    ids = []
    for w in text.replace("(", " ").replace(")", " ").split():
        w = "]" if w == "X" else w
        if w not in TOKENS[1:]:
            raise ValueError(f"unknown ListOps token {w!r} in text")
        ids.append(TOKENS.index(w))
    return ids


def majority_accuracy(labels) -> float:
    """Accuracy of always predicting the most frequent label (~0.175 for LRA ListOps, not 0.10)."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        raise ValueError("majority_accuracy needs at least one label")
    return float(np.bincount(labels).max() / labels.size)


class ListOpsDataset(Dataset):
    """One split of LRA ListOps; item ``i`` is ``(tokens LongTensor [len_i], label int in 0..9)``.

    ``split`` in ``"train" | "val" | "test"`` (disjoint by construction). The split is generated once and
    cached as ``<cache_dir>/listops-<hash>.npz`` (``cache_dir`` default: ``$SPATTN_CACHE`` or
    ``~/.cache/spattn``); a corrupt cache file is reported with a warning and regenerated. Attributes:
    ``vocab_size`` (16), ``num_classes`` (10), ``pad_id`` (0), ``labels`` and ``lengths`` (numpy arrays),
    ``majority_accuracy``.
    """

    vocab_size = VOCAB_SIZE
    num_classes = NUM_CLASSES
    pad_id = PAD_ID

    def __init__(
        self,
        split: str = "train",
        num_examples: int = 96_000,
        seed: int = 0,
        min_len: int = 500,
        max_len: int = 2000,
        max_depth: int = 10,
        max_args: int = 10,
        cache_dir: Optional[str] = None,
        use_cache: bool = True,
    ):
        _check(num_examples, seed, split, min_len, max_len, max_depth, max_args)
        params = dict(
            version=_VERSION,
            split=split,
            n=num_examples,
            seed=seed,
            min_len=min_len,
            max_len=max_len,
            max_depth=max_depth,
            max_args=max_args,
        )

        def make():
            seqs, labels = generate(num_examples, seed, split, min_len, max_len, max_depth, max_args)
            lengths = np.array([len(s) for s in seqs], dtype=np.int64)
            flat = np.fromiter((t for s in seqs for t in s), dtype=np.uint8, count=int(lengths.sum()))
            return {"tokens": flat, "lengths": lengths, "labels": np.array(labels, dtype=np.int64)}

        arrays = cached_arrays("listops", params, make, cache_dir, use_cache)
        self._tokens = torch.from_numpy(arrays["tokens"].astype(np.int64))
        self.lengths = arrays["lengths"]
        self.labels = arrays["labels"]
        if (
            len(self.lengths) != num_examples
            or len(self.labels) != num_examples
            or self.lengths.sum() != len(self._tokens)
        ):
            raise ValueError(f"ListOps arrays are inconsistent (cache file corrupt?) for {params}")
        self._offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.split, self.seed, self.min_len, self.max_len = split, seed, min_len, max_len

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        i = item_index(i, len(self), "ListOpsDataset")
        a, b = int(self._offsets[i]), int(self._offsets[i + 1])
        return self._tokens[a:b], int(self.labels[i])

    @property
    def majority_accuracy(self) -> float:
        return majority_accuracy(self.labels)

    def class_frequencies(self) -> np.ndarray:
        """Fraction of examples per class ``[10]``."""
        return np.bincount(self.labels, minlength=NUM_CLASSES) / max(1, len(self.labels))

    @staticmethod
    def collate(items) -> dict:
        return collate(items)


def collate(items) -> dict:
    """``{"tokens": [B, N] (pad 0), "target": [B], "mask": [B, N] bool from lengths, "lengths": [B]}``."""
    return collate_classification(items, pad_id=PAD_ID)
