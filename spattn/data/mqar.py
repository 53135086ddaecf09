"""Multi-query associative recall (MQAR), Zoology (Arora, Eyuboglu et al., ICLR 2024, arXiv 2312.04927).

Follows the official generator ``zoology/data/multiquery_ar.py`` (see
``reference/benchmarks.md`` §3.1). One example of length ``seq_len`` is::

    k1 v1 k2 v2 ... kK vK | q . q . q . ...        (context of 2*K*passes tokens, then query slots)

* keys are drawn without replacement from ``1 .. V/2 - 1`` and values from ``V/2 .. V-1``;
* the ``(seq_len - C) / 2`` even query slots after the context ``C`` hold each key once; which slot a
  key goes to is drawn without replacement with probability ``p[g] ~ a * (g+1)^(a-1)`` (power law,
  ``a = power_a``), so most queries sit close to the context;
* ``targets[t] = value`` of the key at query position ``t`` and -100 everywhere else (loss and
  accuracy only at query positions);
* the other positions are 0, or (``random_non_queries=True``) random tokens from the whole vocabulary
  (Zoology's default; its Figure 2 runs use ``False``).

Every example is a function of ``(seed, index)`` only, so the dataset is deterministic, needs no
memory up front and gives the same items in any order and in any DataLoader worker.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ._common import IGNORE_INDEX, check_positive_int, collate_tokens, item_index

__all__ = ["MQARDataset", "generate", "collate", "query_gap_probs", "accuracy"]


def query_gap_probs(num_slots: int, power_a: float) -> np.ndarray:
    """``p[g] ∝ a (g+1)^(a-1)`` over query slots ``g = 0 .. num_slots-1`` (Zoology's power law)."""
    g = np.arange(num_slots, dtype=np.float64)
    p = power_a * (g + 1.0) ** (power_a - 1.0)
    return p / p.sum()


def _check(seq_len, kv_pairs, vocab_size, num_passes, power_a):
    check_positive_int("seq_len", seq_len, 2)
    check_positive_int("kv_pairs", kv_pairs)
    check_positive_int("vocab_size", vocab_size, 4)
    check_positive_int("num_passes", num_passes)
    if seq_len % 2:
        raise ValueError(f"seq_len must be even (query slots come in pairs), got {seq_len}")
    if kv_pairs > vocab_size // 2 - 1:  # (Zoology also asserts vocab_size > seq_len; only this part is needed)
        raise ValueError(
            f"kv_pairs={kv_pairs} needs that many distinct keys; vocab_size={vocab_size} gives {vocab_size // 2 - 1}"
        )
    if 2 * kv_pairs * num_passes + 2 * kv_pairs > seq_len:
        raise ValueError(
            f"seq_len must be >= 2*kv_pairs*num_passes + 2*kv_pairs = {2 * kv_pairs * num_passes + 2 * kv_pairs}, got {seq_len}"
        )
    if isinstance(power_a, bool) or not (isinstance(power_a, (int, float)) and 0 < power_a <= 1):
        raise ValueError(f"power_a must be a float in (0, 1], got {power_a!r}")


def generate(
    rng: np.random.Generator,
    num_examples: int,
    seq_len: int,
    kv_pairs: int,
    vocab_size: int = 8192,
    power_a: float = 0.01,
    num_passes: int = 1,
    random_non_queries: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``num_examples`` MQAR examples with ``rng`` -> ``(inputs [E, L] int64, targets [E, L] int64)``."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    check_positive_int("num_examples", num_examples, 0)
    _check(seq_len, kv_pairs, vocab_size, num_passes, power_a)
    if not isinstance(random_non_queries, bool):
        raise TypeError(f"random_non_queries must be a bool, got {random_non_queries!r}")
    E, K, L, V = num_examples, kv_pairs, seq_len, vocab_size
    C = 2 * K * num_passes
    half = V // 2
    # distinct keys (from 1 .. half-1) and values (from half .. V-1) within each example
    keys = np.zeros((E, K), np.int64)
    values = np.zeros((E, K), np.int64)
    for e in range(E):
        keys[e] = 1 + rng.choice(half - 1, size=K, replace=False)
        values[e] = half + rng.choice(V - half, size=K, replace=False)
    kvs = np.tile(np.stack([keys, values], axis=2).reshape(E, 2 * K), (1, num_passes))

    slots = (L - C) // 2
    logp = np.log(query_gap_probs(slots, power_a))
    # K draws without replacement with probabilities p == the K largest of log p + Gumbel noise
    gaps = np.argsort(-(logp + rng.gumbel(size=(E, slots))), axis=1)[:, :K]

    seq = np.zeros((E, L + 1), dtype=np.int64)
    seq[:, :C] = kvs
    labels = np.full((E, L + 1), IGNORE_INDEX, dtype=np.int64)
    rows = np.arange(E)[:, None]
    seq[rows, C + 2 * gaps] = keys
    labels[rows, C + 2 * gaps + 1] = values
    inputs, targets = seq[:, :-1].copy(), labels[:, 1:].copy()
    if random_non_queries:
        blank = inputs == 0
        inputs[blank] = rng.integers(0, V, size=int(blank.sum()))
    return inputs, targets


class MQARDataset(Dataset):
    """MQAR examples; item ``i`` is ``(tokens LongTensor [seq_len], targets LongTensor [seq_len])``.

    ``targets`` is -100 except at the ``kv_pairs`` query positions, where it is the value paired with
    the key at that position. All sequences have length ``seq_len`` (no padding). Attributes:
    ``vocab_size``, ``num_classes`` (= ``vocab_size``, the output size of an LM head), ``pad_id`` (0,
    unused), ``seq_len``.
    """

    def __init__(
        self,
        num_examples: int,
        seq_len: int = 256,
        kv_pairs: int = 16,
        vocab_size: int = 8192,
        seed: int = 0,
        power_a: float = 0.01,
        num_passes: int = 1,
        random_non_queries: bool = False,
    ):
        check_positive_int("num_examples", num_examples, 0)
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        _check(seq_len, kv_pairs, vocab_size, num_passes, power_a)
        if not isinstance(random_non_queries, bool):
            raise TypeError(f"random_non_queries must be a bool, got {random_non_queries!r}")
        self.num_examples, self.seq_len, self.kv_pairs = int(num_examples), int(seq_len), int(kv_pairs)
        self.vocab_size = self.num_classes = int(vocab_size)
        self.seed, self.power_a, self.num_passes = int(seed), float(power_a), int(num_passes)
        self.random_non_queries = bool(random_non_queries)
        self.pad_id = 0

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, i: int):
        i = item_index(i, self.num_examples, "MQARDataset")
        rng = np.random.default_rng([self.seed, i])
        x, y = generate(
            rng, 1, self.seq_len, self.kv_pairs, self.vocab_size, self.power_a, self.num_passes, self.random_non_queries
        )
        return torch.from_numpy(x[0]), torch.from_numpy(y[0])

    @staticmethod
    def collate(items) -> dict:
        return collate(items)


def collate(items) -> dict:
    """``{"tokens": [B, L], "target": [B, L] (-100 = no loss), "mask": [B, L] bool, "lengths": [B]}``."""
    return collate_tokens(items, pad_id=0)


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Zoology's metric: per-example accuracy over query positions (target != -100), averaged over examples."""
    valid = targets != IGNORE_INDEX
    correct = (logits.argmax(-1) == targets) & valid
    per = correct.sum(-1).float() / valid.sum(-1).clamp_min(1).float()
    has = valid.any(-1)
    return float(per[has].mean()) if bool(has.any()) else float("nan")
