"""Task registry: a name (``"mqar"``, ``"listops"``, ``"bytelm"``, ...) -> datasets + model kind + defaults.

A :class:`Task` turns options (``seq_len``, ``kv_pairs``, ``max_len``, ...) into a :class:`TaskData`:
train/val/test torch Datasets, their collate function, the vocabulary size, number of classes and
the longest sequence. Batches are normalised by :func:`as_batch` to a dict with ``tokens [B, N]``,
``target`` (``[B]`` labels, or ``[B, N]`` token targets with -100 = ignored), ``mask [B, N]`` bool
(True = real token) and, for two-tower tasks, ``tokens2``/``mask2``.

Data comes from :mod:`spattn.data` (imported lazily, so the registry loads without it).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

__all__ = ["Task", "TaskData", "register_task", "get_task", "task_names", "as_batch", "OBJECTIVES"]

#: "classify": one label per sequence; "tokens": a target per position (-100 = no loss)
OBJECTIVES = ("classify", "tokens")


@dataclass
class TaskData:
    train: Any
    val: Any
    test: Any
    collate: Callable
    vocab_size: int
    num_classes: int
    seq_len: int
    majority_acc: Optional[float] = None  # accuracy of always predicting the most frequent test class
    info: dict = field(default_factory=dict)


@dataclass
class Task:
    """A benchmark task.

    ``build(**options) -> TaskData``; the accepted options are the keyword parameters of ``build``.
    ``model_kind`` is a :data:`spattn.models.MODEL_KINDS` entry, ``objective`` one of :data:`OBJECTIVES`,
    ``model_defaults`` and ``train_defaults`` fill :class:`ModelConfig` / :class:`TrainConfig` fields
    the user did not set. ``metric`` names the eval number early stopping looks at.
    """

    name: str
    build: Callable[..., TaskData]
    model_kind: str
    objective: str
    description: str = ""
    model_defaults: dict = field(default_factory=dict)
    train_defaults: dict = field(default_factory=dict)
    metric: str = "acc"

    def options(self) -> list[str]:
        return [p for p in inspect.signature(self.build).parameters]

    def make_data(self, **options) -> TaskData:
        valid = self.options()
        unknown = sorted(k for k in options if k not in valid)
        if unknown:
            raise ValueError(
                f"task {self.name!r} does not take option(s) {unknown}; valid: {', '.join(valid) or '(none)'}"
            )
        return self.build(**options)


_TASKS: dict[str, Task] = {}


def register_task(task: Task, *, replace: bool = False) -> Task:
    if task.objective not in OBJECTIVES:
        raise ValueError(f"register_task: objective must be one of {OBJECTIVES}, got {task.objective!r}")
    if task.name in _TASKS and not replace:
        raise ValueError(f"task {task.name!r} is already registered")
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    try:
        return _TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(_TASKS))}") from None


def task_names() -> list[str]:
    return sorted(_TASKS)


_KEYS = {
    "tokens": ("tokens", "inputs", "input_ids", "x"),
    "target": ("target", "targets", "labels", "label", "y"),
    "mask": ("mask", "padding_mask", "attention_mask"),
    "tokens2": ("tokens2", "inputs2"),
    "mask2": ("mask2", "padding_mask2"),
}


def as_batch(raw) -> dict[str, Tensor]:
    """Normalise a collated batch (dict with the usual key names, or a tuple ``(tokens, target, mask)``)."""
    if isinstance(raw, (tuple, list)):
        names = ("tokens", "target", "mask", "tokens2", "mask2")
        if not 2 <= len(raw) <= 5:
            raise ValueError(f"a batch tuple must be (tokens, target[, mask[, tokens2, mask2]]), got {len(raw)} items")
        return {k: v for k, v in zip(names, raw) if v is not None}
    if not isinstance(raw, dict):
        raise TypeError(f"a batch must be a dict or tuple, got {type(raw).__name__}")
    out = {}
    for key, aliases in _KEYS.items():
        for a in aliases:
            if a in raw and raw[a] is not None:
                out[key] = raw[a]
                break
    if "tokens" not in out or "target" not in out:
        raise ValueError(f"batch dict needs tokens and target/labels, got keys {sorted(raw)}")
    return out


def _majority(labels) -> Optional[float]:
    labels = torch.as_tensor(labels)
    if labels.numel() == 0:
        return None
    return float(torch.bincount(labels.long().flatten()).max()) / labels.numel()


# ----------------------------------------------------------------------------------------- builtin tasks


def _mqar(
    seq_len: int = 256,
    kv_pairs: int = 16,
    vocab: int = 8192,
    num_train: int = 100_000,
    num_val: int = 1000,
    num_test: int = 3000,
    power_a: float = 0.01,
    random_non_queries: bool = False,
    seed: int = 0,
) -> TaskData:
    from ..data import mqar

    common = dict(
        seq_len=seq_len, kv_pairs=kv_pairs, vocab_size=vocab, power_a=power_a, random_non_queries=random_non_queries
    )
    train = mqar.MQARDataset(num_examples=num_train, seed=seed, **common)
    val = mqar.MQARDataset(num_examples=num_val, seed=seed + 1, **common)
    test = mqar.MQARDataset(num_examples=num_test, seed=seed + 2, **common)
    return TaskData(train, val, test, mqar.collate, vocab, vocab, seq_len)


def _listops(
    max_len: int = 1000,
    min_len: Optional[int] = None,
    num_train: int = 20_000,
    num_val: int = 1000,
    num_test: int = 2000,
    seed: int = 0,
    cache_dir: Optional[str] = None,
) -> TaskData:
    from ..data import listops

    kw = dict(max_len=max_len, cache_dir=cache_dir)
    if min_len is not None:
        kw["min_len"] = min_len
    train = listops.ListOpsDataset(split="train", num_examples=num_train, seed=seed, **kw)
    val = listops.ListOpsDataset(split="val", num_examples=num_val, seed=seed, **kw)
    test = listops.ListOpsDataset(split="test", num_examples=num_test, seed=seed, **kw)
    return TaskData(
        train, val, test, listops.collate, listops.VOCAB_SIZE, listops.NUM_CLASSES, max_len, _majority(test.labels)
    )


def _bytelm(seq_len: int = 2048, num_train: Optional[int] = None, num_val: int = 64, seed: int = 0) -> TaskData:
    from ..data import corpus

    train = corpus.ByteLMDataset(split="train", seq_len=seq_len, num_examples=num_train, seed=seed)
    val = corpus.ByteLMDataset(split="val", seq_len=seq_len, num_examples=num_val, seed=seed)
    return TaskData(train, val, val, corpus.collate, 256, 256, seq_len)


def _pathfinder(
    resolution: int = 32,
    num_train: int = 20_000,
    num_val: int = 1000,
    num_test: int = 2000,
    difficulty: str = "hard",
    seed: int = 0,
    cache_dir: Optional[str] = None,
) -> TaskData:
    from ..data import pathfinder

    kw = dict(resolution=resolution, difficulty=difficulty, cache_dir=cache_dir)
    train = pathfinder.PathfinderDataset(num_examples=num_train, seed=seed, **kw)
    val = pathfinder.PathfinderDataset(num_examples=num_val, seed=seed + 1, **kw)
    test = pathfinder.PathfinderDataset(num_examples=num_test, seed=seed + 2, **kw)
    return TaskData(train, val, test, pathfinder.collate, 256, 2, resolution * resolution)


def _lra_file_task(reader: str, seq_name: str):
    def build(data_dir: str = "", max_len: int = 1000) -> TaskData:
        if not data_dir:
            raise ValueError(f"the LRA {seq_name} task reads the official release files: pass data_dir (--data-dir)")
        from ..data import lra_files

        fn = getattr(lra_files, reader)
        train, val, test, collate, vocab, classes = fn(data_dir, max_len=max_len)
        return TaskData(train, val, test, collate, vocab, classes, max_len)

    build.__name__ = f"_{seq_name}"
    return build


register_task(
    Task(
        "mqar",
        _mqar,
        "lm",
        "tokens",
        "Zoology multi-query associative recall; accuracy at query positions (Arora et al. 2024)",
        # RoPE and lr 3e-3: with these a dense 2-layer d=64 model passes 99% at seq 256 in ~1.5k steps on
        # CPU (learned positions at lr 1e-3 were still at 3% after 1.3k steps)
        model_defaults=dict(dim=64, depth=2, heads=1, mlp_ratio=0.0, positions="rope", embed_dropout=0.1),
        train_defaults=dict(batch_size=64, lr=3e-3, weight_decay=0.1, warmup=100, steps=3000, target_acc=0.99),
    )
)
register_task(
    Task(
        "listops",
        _listops,
        "classifier",
        "classify",
        "LRA ListOps: evaluate nested MIN/MAX/MED/SM expressions, 10 classes (Nangia & Bowman 2018; Tay et al. 2021)",
        model_defaults=dict(dim=64, depth=2, heads=2, mlp_ratio=2.0, pool="cls", positions="learned"),
        train_defaults=dict(batch_size=32, lr=1e-3, weight_decay=0.01, warmup=200, steps=2000),
    )
)
register_task(
    Task(
        "bytelm",
        _bytelm,
        "lm",
        "tokens",
        "byte-level language model on the Python standard library sources; bits per byte",
        model_defaults=dict(dim=128, depth=2, heads=4, mlp_ratio=4.0, positions="rope"),
        train_defaults=dict(batch_size=4, lr=1e-3, weight_decay=0.1, warmup=50, steps=300),
        metric="bpb",
    )
)
register_task(
    Task(
        "pathfinder",
        _pathfinder,
        "classifier",
        "classify",
        "LRA Pathfinder: are the two dots connected by a path? pixels as tokens (Linsley et al. 2018)",
        model_defaults=dict(dim=32, depth=1, heads=2, mlp_ratio=1.0, pool="mean", positions="learned"),
        train_defaults=dict(batch_size=64, lr=1e-3, weight_decay=0.0, warmup=200, steps=2000),
    )
)
register_task(
    Task(
        "text",
        _lra_file_task("load_text", "text"),
        "classifier",
        "classify",
        "LRA Text (byte-level IMDb), from the official release files",
        model_defaults=dict(dim=64, depth=2, heads=2, pool="cls"),
    )
)
register_task(
    Task(
        "retrieval",
        _lra_file_task("load_retrieval", "retrieval"),
        "retrieval",
        "classify",
        "LRA Retrieval (AAN citation pairs, two towers), from the official release files",
        model_defaults=dict(dim=64, depth=2, heads=2, pool="cls"),
    )
)
register_task(
    Task(
        "image",
        _lra_file_task("load_image", "image"),
        "classifier",
        "classify",
        "LRA Image (grey CIFAR-10 pixels as tokens), from the official release files",
        model_defaults=dict(dim=32, depth=1, heads=1, pool="mean"),
    )
)
