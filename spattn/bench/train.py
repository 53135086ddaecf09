"""Training loop for the benchmark tasks (``spattn train <task>``).

Plain PyTorch: AdamW (decoupled weight decay, Loshchilov & Hutter 2019) on matrices only, linear
warmup then cosine decay, gradient-norm clipping, optional bf16 autocast, evaluation every
``eval_every`` steps, early stop once the eval metric reaches ``target_acc``, a JSON metrics log and
a tqdm progress bar with loss / accuracy / tokens per second.

Checkpoints hold everything a run depends on: model (including buffers such as routing
centroids), optimizer, scheduler, the torch / Python / NumPy RNG states and the data position
(epoch and batch within the epoch). Batches are drawn by index from a permutation seeded by
``(seed, epoch)``, so a run resumed from a checkpoint replays exactly the batches, dropout masks
and updates of an uninterrupted run: its parameters are bit-identical.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import int_at_least

from ..models import ModelConfig, build_model
from .checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_SCHEMA, load_checkpoint, save_checkpoint
from .tasks import Task, TaskData, as_batch, get_task
from .timing import timed

__all__ = [
    "TrainConfig",
    "train",
    "evaluate",
    "add_train_arguments",
    "run_train",
    "load_checkpoint",
    "save_checkpoint",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_SCHEMA",
    "TrainingInterrupted",
    "default_out_dir",
]

MODEL_FIELDS = {f.name for f in fields(ModelConfig)} - {"kind", "vocab_size", "num_classes"}


@dataclass
class TrainConfig:
    """One training run. ``model`` overrides the task's model defaults (fields of :class:`ModelConfig`);
    ``task_options`` are passed to the task's data builder. ``None`` fields take the task's defaults."""

    task: str = "mqar"
    attention: str = "dense"
    steps: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    warmup: Optional[int] = None
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    bf16: bool = False
    eval_every: int = 100
    eval_batches: Optional[int] = None  # None = the whole validation set
    eval_batch_size: Optional[int] = None
    num_val: Optional[int] = None  # evaluate the first num_val validation examples (None = all)
    num_test: Optional[int] = None  # the same for the final test evaluation
    target_acc: Optional[float] = None
    seed: int = 0
    out_dir: Optional[str] = None  # checkpoint.pt and metrics.json live here
    checkpoint_every: Optional[int] = None  # default: every eval
    resume: bool = False
    #: resume even though settings that exactness depends on (seed, batch size, lr, ...) changed
    resume_inexact: bool = False
    #: start a new run in an out_dir that holds a checkpoint (its checkpoint.pt and metrics.json are removed)
    overwrite: bool = False
    max_minutes: Optional[float] = None  # stop (with a checkpoint) after this much training time
    progress: bool = True
    test: bool = True  # evaluate the test split at the end
    model: dict = field(default_factory=dict)
    task_options: dict = field(default_factory=dict)
    #: start from the weights in another run's checkpoint.pt; its model config must match except for
    #: the attention spec (sparsify a trained model, then fine-tune); ignored when resuming
    init_from: Optional[str] = None
    #: under torchrun: shard every sequence over the ranks instead of the batch (causal LMs)
    sequence_parallel: bool = False
    #: seconds a collective waits for the other ranks before failing (torchrun runs)
    dist_timeout: float = 300.0

    def resolved(self, task: Task) -> "TrainConfig":
        """A copy with the task's training defaults filled in (and built-in fallbacks)."""
        fallback = dict(steps=1000, batch_size=32, lr=1e-3, weight_decay=0.01, warmup=100)
        d = asdict(self)
        for k, v in fallback.items():
            if d[k] is None:
                d[k] = task.train_defaults.get(k, v)
        if d["target_acc"] is None and "target_acc" in task.train_defaults:
            d["target_acc"] = task.train_defaults["target_acc"]
        cfg = TrainConfig(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        from ..registry import as_python_scalar

        for f in fields(self):  # NumPy scalars (np.int64(100), np.float32(1e-3)) as Python numbers
            setattr(self, f.name, as_python_scalar(getattr(self, f.name)))

        for name in ("steps", "batch_size", "eval_every"):
            int_at_least(f"TrainConfig: {name}", getattr(self, name))
        for name in ("eval_batches", "eval_batch_size", "checkpoint_every", "num_val", "num_test"):
            int_at_least(f"TrainConfig: {name}", getattr(self, name), allow_none=True)
        int_at_least("TrainConfig: warmup", self.warmup, 0)
        for name in ("lr", "weight_decay", "min_lr_ratio", "grad_clip"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"TrainConfig: {name} must be a finite number, got {v!r}")
        if not self.lr > 0 or not self.weight_decay >= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(
                f"TrainConfig: need lr > 0, weight_decay >= 0, 0 <= min_lr_ratio <= 1; got "
                f"{self.lr}, {self.weight_decay}, {self.min_lr_ratio}"
            )
        if not self.grad_clip >= 0:
            raise ValueError(f"TrainConfig: grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        if self.target_acc is not None and not 0 < self.target_acc <= 1:
            raise ValueError(f"TrainConfig: target_acc must lie in (0, 1], got {self.target_acc}")
        if self.resume and not self.out_dir:
            raise ValueError("TrainConfig: resume=True needs out_dir (where the checkpoint is)")
        if self.resume and self.overwrite:
            raise ValueError("TrainConfig: resume and overwrite exclude each other (continue the run, or replace it)")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"TrainConfig: max_minutes must be > 0, got {self.max_minutes}")
        if not isinstance(self.attention, str):
            raise TypeError(f"TrainConfig: attention must be a spec string, got {type(self.attention).__name__}")
        if not isinstance(self.sequence_parallel, bool):
            raise TypeError(f"TrainConfig: sequence_parallel must be a bool, got {self.sequence_parallel!r}")
        if (
            isinstance(self.dist_timeout, bool)
            or not isinstance(self.dist_timeout, (int, float))
            or not self.dist_timeout > 0
        ):
            raise ValueError(f"TrainConfig: dist_timeout must be a number of seconds > 0, got {self.dist_timeout!r}")
        bad = sorted(set(self.model) - MODEL_FIELDS)
        if bad:
            raise ValueError(f"TrainConfig: unknown model field(s) {bad}; valid: {', '.join(sorted(MODEL_FIELDS))}")


def check_attention(attention: str) -> None:
    """Check a model's attention spec (or ``;``-joined per-layer specs) without building anything:
    syntax, names (with suggestions) and required parameters, except those the model fills in."""
    from ..approx.base import CONTEXT_PARAMETERS
    from ..registry import check_spec

    for part in attention.split(";") if attention else ():
        if part.strip():
            check_spec(part.strip(), "attention", provided=CONTEXT_PARAMETERS)


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup from 0 over ``warmup`` steps, then cosine to ``min_ratio`` at ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms, or embedding tables)."""
    decay, no_decay, seen = [], [], set()
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.98), eps=1e-8)


def model_config_for(task: Task, data: TaskData, cfg: TrainConfig) -> ModelConfig:
    d = dict(task.model_defaults)
    d.update(cfg.model)
    d.update(kind=task.model_kind, vocab_size=data.vocab_size, num_classes=data.num_classes, attention=cfg.attention)
    extra = 1 if task.model_kind in ("classifier", "retrieval") and d.get("pool", "cls") == "cls" else 0
    d.setdefault("max_len", data.seq_len + extra)
    return ModelConfig.from_dict(d)


def forward_batch(model: nn.Module, task: Task, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Logits and targets of a normalised batch; token objectives are flattened to ``[M, C]``, ``[M]``."""
    mask = batch.get("mask")
    if mask is not None and bool(mask.all()):
        mask = None  # no padding: let the kernels skip the masking work
    if task.objective == "tokens" and hasattr(model, "hidden"):
        # logits only where there is a target: MQAR has 16 of 256, and [B, N, vocab] would not fit
        target = batch["target"].long()
        sel = target != -100
        return model.head(model.hidden(batch["tokens"], mask)[sel]), target[sel]
    if task.model_kind == "retrieval":
        logits = model(batch["tokens"], mask, batch["tokens2"], batch.get("mask2"))
    else:
        logits = model(batch["tokens"], mask)
    target = batch["target"].long()
    if task.objective == "tokens":
        return logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
    return logits, target.reshape(-1)


def _loss_and_counts(logits: Tensor, target: Tensor) -> tuple[Tensor, int, int]:
    valid = target != -100
    n = int(valid.sum())
    loss = F.cross_entropy(logits.float(), target, ignore_index=-100, reduction="sum") / max(n, 1)
    correct = int(((logits.argmax(-1) == target) & valid).sum())
    return loss, correct, n


def _count_tokens(batch: dict[str, Tensor]) -> int:
    total = 0
    for t, m in (("tokens", "mask"), ("tokens2", "mask2")):
        if t in batch:
            total += int(batch[m].sum()) if m in batch else batch[t].numel()
    return total


def _autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


class _EvalStopped(Exception):
    """An evaluation abandoned because the run was asked to stop (SIGINT / SIGTERM)."""


@torch.no_grad()
def evaluate(
    model: nn.Module,
    task: Task,
    dataset,
    collate,
    *,
    batch_size: int,
    max_batches: Optional[int] = None,
    bf16: bool = False,
    max_examples: Optional[int] = None,
    progress: bool = False,
    desc: str = "evaluation",
    stop: Optional[Callable[[], bool]] = None,
) -> dict[str, float]:
    """Mean loss, accuracy (over labels, or over positions with target != -100) and bits per byte/token.

    Evaluates the first ``max_examples`` examples (default all), at most ``max_batches`` batches, with a
    progress bar when ``progress``; ``stop()`` returning True abandons the evaluation.
    """
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    n = len(dataset) if max_examples is None else min(len(dataset), max_examples)
    batches = math.ceil(n / batch_size)
    if max_batches is not None:
        batches = min(batches, max_batches)
    from tqdm.auto import tqdm

    try:
        with tqdm(
            total=min(n, batches * batch_size),
            desc=desc,
            unit="ex",
            leave=False,
            disable=not progress,
            dynamic_ncols=True,
            file=sys.stderr,
        ) as bar:
            for b in range(batches):
                if stop is not None and stop():
                    raise _EvalStopped
                items = [dataset[i] for i in range(b * batch_size, min(n, (b + 1) * batch_size))]
                batch = as_batch(collate(items))
                with _autocast(bf16):
                    logits, target = forward_batch(model, task, batch)
                loss, c, k = _loss_and_counts(logits, target)
                loss_sum += float(loss) * k
                correct += c
                count += k
                bar.update(len(items))
    finally:
        model.train(was_training)
    loss = loss_sum / max(count, 1)
    return {"loss": loss, "acc": correct / max(count, 1), "bpb": loss / math.log(2), "count": count}


# ----------------------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
    }


def _set_rng_state(state: dict[str, Any], path: str = "<checkpoint>") -> None:
    try:
        torch.set_rng_state(state["torch"])
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    except (TypeError, ValueError, RuntimeError, IndexError) as e:
        raise ValueError(
            f"checkpoint {path!r}: field 'rng' holds an invalid RNG state ({type(e).__name__}: {e})"
        ) from None


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


#: settings that change which updates a run makes: a resume with any of them changed is not the
#: continuation of the saved run, so it is refused (unless ``resume_inexact``)
EXACT_FIELDS = ("seed", "batch_size", "lr", "weight_decay", "warmup", "min_lr_ratio", "grad_clip", "bf16")


def resume_changes(saved: dict[str, Any], cfg: "TrainConfig") -> tuple[list[str], list[str]]:
    """(changed settings that break exactness, changed ``steps`` note) between a checkpoint's train config and ``cfg``."""
    mine = asdict(cfg)
    breaking = [f"{k} {saved[k]!r} -> {mine[k]!r}" for k in EXACT_FIELDS if k in saved and saved[k] != mine[k]]
    notes = []
    if "steps" in saved and saved["steps"] != mine["steps"]:
        notes.append(
            f"steps {saved['steps']} -> {mine['steps']}: the cosine schedule is recomputed for the new total, "
            "so the run continues exactly but is not identical to an uninterrupted run of the new length"
        )
    return breaking, notes


def _check_out_dir(
    cfg: "TrainConfig", ckpt_path: Optional[str], metrics_path: Optional[str]
) -> Optional[dict[str, Any]]:
    """The checkpoint to resume from (validated), or None; refuses to overwrite a run without ``overwrite``."""
    if not ckpt_path:
        return None
    exists = os.path.exists(ckpt_path)
    if cfg.resume:
        if not exists:
            _say(cfg, f"no checkpoint in {cfg.out_dir}: starting a new run there")
            return None
        ckpt = load_checkpoint(ckpt_path)
        saved_tc = ckpt["train_config"]

        def training_data(opts):  # the evaluation splits' sizes do not change the training data
            return {k: v for k, v in opts.items() if k not in ("num_val", "num_test")}

        if saved_tc["task"] != cfg.task or training_data(saved_tc.get("task_options", {})) != training_data(
            cfg.task_options
        ):
            raise ValueError(
                f"cannot resume from {ckpt_path!r}: it was trained on task {saved_tc['task']!r} "
                f"with options {saved_tc.get('task_options', {})}"
            )
        breaking, notes = resume_changes(saved_tc, cfg)
        if breaking and not cfg.resume_inexact:
            raise ValueError(
                f"cannot resume from {ckpt_path!r} exactly: changed {'; '.join(breaking)}. Use the saved "
                "settings, or pass --resume-inexact (resume_inexact=True) to continue anyway, or "
                "--overwrite to start again"
            )
        if breaking:
            _say(
                cfg, f"note: resuming NON-EXACTLY from step {ckpt['step']}: changed {'; '.join(breaking)}", always=True
            )
        for note in notes:
            _say(cfg, f"note: {note}", always=True)
        return ckpt
    if exists and not cfg.overwrite:
        raise ValueError(
            f"{ckpt_path!r} already holds a training checkpoint; pass --resume (resume=True) to continue "
            "it or --overwrite (overwrite=True) to start a new run there, or choose another --out"
        )
    return None


def _start_fresh(ckpt_path: Optional[str], metrics_path: Optional[str]) -> None:
    """``overwrite``: the old run's files go before the new run writes, so the directory never mixes two runs."""
    for path in (ckpt_path, metrics_path):
        if path and os.path.exists(path):
            os.remove(path)


def _say(cfg: "TrainConfig", msg: str, always: bool = False) -> None:
    if cfg.progress or always:
        print(msg, file=sys.stderr, flush=True)


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM stopped a run; a checkpoint of the last completed step was written (when ``out_dir``)."""

    def __init__(self, step: int, checkpoint: Optional[str]):
        self.step, self.checkpoint = step, checkpoint
        where = (
            f"checkpoint of step {step} saved to {checkpoint}; continue with --resume"
            if checkpoint
            else "no --out directory: nothing was saved"
        )
        super().__init__(f"training interrupted after step {step}: {where}")


class _StopSignals:
    """Turns the first SIGINT / SIGTERM into a request to stop at the next step boundary (so the run can
    checkpoint); a second one interrupts at once. Only in the main thread (signals cannot be caught elsewhere)."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self.requested: Optional[str] = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(
            f"\n{self.requested}: stopping after this step and saving a checkpoint (again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


# ----------------------------------------------------------------------------------------- loop


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def _saved_model_config(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's model config, with fields added to ModelConfig since it was written at their defaults."""
    defaults = {f.name: f.default for f in fields(ModelConfig)}
    return {**defaults, **ckpt["model_config"]}


def _load_state(target, state, what: str, path: str) -> None:
    try:
        target.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"checkpoint {path!r}: field {what!r} does not fit this run ({first})") from None


def _init_from(model: nn.Module, model_cfg, path: str) -> dict[str, Any]:
    """Load the weights of ``path`` (a training checkpoint) into ``model``; the attention may differ."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"init_from: no checkpoint at {path!r}")
    ckpt = load_checkpoint(path)
    saved, mine = _saved_model_config(ckpt), model_cfg.to_dict()
    differ = sorted(k for k in set(saved) | set(mine) if k != "attention" and saved.get(k) != mine.get(k))
    if differ:
        raise ValueError(
            f"init_from {path!r}: the model config differs in {differ} (only the attention may differ); "
            f"saved: {[saved.get(k) for k in differ]}, here: {[mine.get(k) for k in differ]}"
        )
    # the mechanisms' own state (routing centroids, gates) is what may be missing or left over
    try:
        missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    except RuntimeError as e:
        raise ValueError(f"init_from {path!r}: field 'model' does not fit ({str(e).strip().splitlines()[0]})") from None
    return {"from": path, "attention": saved.get("attention"), "missing": list(missing), "unexpected": list(unexpected)}


def train(
    cfg: TrainConfig, *, data: Optional[TaskData] = None, callback: Optional[Callable[[int, dict], None]] = None
) -> dict[str, Any]:
    """Run (or resume) training; returns ``{"model", "model_config", "history", "val", "test", ...}``.

    ``callback(step, record)`` is called after every optimizer step (``record`` holds train loss/acc
    and, at eval steps, the eval metrics); raising from it interrupts the run like a crash would.
    ``data`` skips the task's data builder (used by the LRA/MQAR sweeps to share generated data).

    Everything that can be checked is checked before data is built: the config, the attention spec,
    the output directory (an existing checkpoint needs ``resume`` or ``overwrite``) and, when resuming,
    the checkpoint (checksum, fields, settings that exactness depends on). SIGINT / SIGTERM stop the
    run after the current step with a checkpoint and raise :class:`TrainingInterrupted`.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"train: expected a TrainConfig, got {type(cfg).__name__}")
    task = get_task(cfg.task)
    cfg = cfg.resolved(task)
    check_attention(cfg.attention)
    from ..distributed.training import TrainingGroup

    group = TrainingGroup.from_environment(sequence_parallel=cfg.sequence_parallel, timeout=cfg.dist_timeout)
    group.check(cfg.batch_size, task.model_kind)
    if not group.is_main:  # rank 0 logs, writes metrics and checkpoints
        cfg = replace(cfg, progress=False)
    ckpt_path = metrics_path = None
    if cfg.out_dir:
        ckpt_path = os.path.join(cfg.out_dir, "checkpoint.pt")
        metrics_path = os.path.join(cfg.out_dir, "metrics.json")
    ckpt = _check_out_dir(cfg, ckpt_path, metrics_path)
    _seed_all(cfg.seed)
    if data is None:
        _say(cfg, f"building the {cfg.task} data ...")
        data, seconds = timed(lambda: task.make_data(**cfg.task_options))
        _say(
            cfg,
            f"data ready in {seconds:.1f} s: {len(data.train)} train, {len(data.val)} validation"
            + (f", {len(data.test)} test" if data.test is not None else "")
            + " examples",
        )
    model_cfg = model_config_for(task, data, cfg)
    model = build_model(model_cfg)
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup, cfg.steps, cfg.min_lr_ratio))

    step, epoch, pos, history, train_seconds = 0, 0, 0, [], 0.0
    best = {"step": 0, "acc": 0.0}
    if ckpt is not None:
        saved = _saved_model_config(ckpt)
        if saved != model_cfg.to_dict():
            diff = sorted(
                k for k in set(saved) | set(model_cfg.to_dict()) if saved.get(k) != model_cfg.to_dict().get(k)
            )
            raise ValueError(f"cannot resume from {ckpt_path!r}: the model config differs in {diff}")
        _load_state(model, ckpt["model"], "model", ckpt_path)
        _load_state(opt, ckpt["optimizer"], "optimizer", ckpt_path)
        _load_state(sched, ckpt["scheduler"], "scheduler", ckpt_path)
        _set_rng_state(ckpt["rng"], ckpt_path)
        step, epoch, pos = ckpt["step"], ckpt["epoch"], ckpt["pos"]
        history, best, train_seconds = ckpt["history"], ckpt["best"], ckpt["train_seconds"]
        _say(cfg, f"resuming from {ckpt_path} at step {step}")
    group.agree(step, "the step to start from (every rank must read the same checkpoint)")
    if cfg.out_dir and group.is_main:
        if ckpt is None and cfg.overwrite:
            _start_fresh(ckpt_path, metrics_path)
        os.makedirs(cfg.out_dir, exist_ok=True)

    def checkpoint() -> None:
        if ckpt_path and group.is_main:
            save_checkpoint(
                ckpt_path,
                {
                    "model_config": model_cfg.to_dict(),
                    "train_config": asdict(cfg),
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "rng": _rng_state(),
                    "step": step,
                    "epoch": epoch,
                    "pos": pos,
                    "history": history,
                    "best": best,
                    "train_seconds": train_seconds,
                },
            )
            log()  # metrics.json is written with (never ahead of) the checkpoint
        if ckpt_path:
            group.barrier()  # no rank runs ahead of the checkpoint every rank may resume from

    def log(result=None) -> None:
        if metrics_path and group.is_main:
            _write_json(
                metrics_path,
                {
                    "train_config": asdict(cfg),
                    "model_config": model_cfg.to_dict(),
                    "parameters": n_params,
                    "checkpoint_step": step,
                    "history": history,
                    "result": result,
                },
            )

    n_params = sum(p.numel() for p in model.parameters())
    n_train = len(data.train)
    per_epoch = n_train // cfg.batch_size
    if per_epoch < 1:
        raise ValueError(
            f"the training set ({n_train} examples; num_train / --num-train) is smaller than one batch "
            f"({cfg.batch_size}; --batch-size)"
        )
    eval_bs = cfg.eval_batch_size or cfg.batch_size
    signals = _StopSignals()

    def run_eval(split: str, dataset, limit: Optional[int], max_batches: Optional[int] = None) -> dict[str, float]:
        return evaluate(
            model,
            task,
            dataset,
            data.collate,
            batch_size=eval_bs,
            max_batches=max_batches,
            bf16=cfg.bf16,
            max_examples=limit,
            progress=cfg.progress,
            desc=f"{split} (step {step})",
            stop=lambda: signals.requested is not None,
        )

    initial = None
    if cfg.init_from and step == 0:
        initial = _init_from(model, model_cfg, cfg.init_from)
        initial["val"] = run_eval("validation", data.val, cfg.num_val, cfg.eval_batches)
    every_ckpt = cfg.checkpoint_every or cfg.eval_every
    stopped = "steps"
    if best["acc"] >= (cfg.target_acc or 2.0):
        stopped = "target"
    _say(
        cfg,
        f"training {cfg.task} with {model_cfg.attention}: {n_params} parameters, steps {step} -> {cfg.steps}, "
        f"batch {cfg.batch_size}, validation every {cfg.eval_every} steps"
        + (f"; checkpoints in {cfg.out_dir}" if cfg.out_dir else "; not saved (no out_dir)"),
    )
    bar = _progress(cfg, step, model_cfg)
    win_loss, win_correct, win_count, win_tokens, win_time, win_steps = 0.0, 0, 0, 0, 0.0, 0
    last_eval: Optional[tuple[int, dict]] = None
    model.train()
    step_forward = group.wrap(model, lambda m, b: forward_batch(m, task, b))
    order, order_epoch = None, -1

    def train_step():
        """One optimizer step on the next batch of the epoch; returns the batch, its loss and counts."""
        nonlocal order, order_epoch
        if order_epoch != epoch:
            order, order_epoch = _epoch_order(n_train, cfg.seed, epoch), epoch
        idx = group.local_indices(order[pos * cfg.batch_size : (pos + 1) * cfg.batch_size].tolist())
        batch = as_batch(data.collate([data.train[i] for i in idx]))
        with _autocast(cfg.bf16):
            logits, target = step_forward(batch)
            loss, correct, count = _loss_and_counts(logits, target)
            aux = getattr(model, "aux_loss", None)
            total = loss + aux.float() if isinstance(aux, Tensor) else loss
        # several ranks: the global batch's loss and counts; ``total`` scaled so the ranks' gradients
        # combine into the global batch's; a stop asked on any rank stops every rank at this step
        total, loss_value, correct, count, stop_all = group.reduce_step(
            total, correct, count, signals.requested is not None
        )
        loss = loss.new_tensor(loss_value)
        if stop_all and signals.requested is None:
            signals.requested = "another rank"
        if not torch.isfinite(total):
            raise FloatingPointError(
                f"loss became {float(total.detach())} at step {step + 1}; lower --lr or check the data"
            )
        opt.zero_grad(set_to_none=True)
        total.backward()
        group.after_backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        return batch, loss, correct, count

    with signals:
        while step < cfg.steps and stopped == "steps" and signals.requested is None:
            (batch, loss, correct, count), dt = timed(train_step)
            step += 1
            pos += 1
            if pos >= per_epoch:
                epoch, pos = epoch + 1, 0
            train_seconds += dt
            win_loss += float(loss.detach()) * count
            win_correct, win_count = win_correct + correct, win_count + count
            win_tokens, win_time = win_tokens + _count_tokens(batch), win_time + dt
            win_steps += 1
            record = {
                "step": step,
                "loss": float(loss.detach()),
                "acc": correct / max(count, 1),
                "lr": sched.get_last_lr()[0],
            }
            bar.update(1)
            bar.set_postfix(
                loss=f"{win_loss / max(win_count, 1):.3f}",
                acc=f"{win_correct / max(win_count, 1):.3f}",
                tok_s=f"{win_tokens / max(win_time, 1e-9):.0f}",
            )
            if (step % cfg.eval_every == 0 or step == cfg.steps) and signals.requested is None:
                try:
                    ev = run_eval("validation", data.val, cfg.num_val, cfg.eval_batches)
                except _EvalStopped:
                    ev = None  # interrupted: the checkpoint below holds the step, without this evaluation
                if ev is not None:
                    last_eval = (step, ev)
                    entry = {
                        "step": step,
                        "epoch": epoch,
                        "train_loss": win_loss / max(win_count, 1),
                        "train_acc": win_correct / max(win_count, 1),
                        "tokens_per_s": win_tokens / max(win_time, 1e-9),
                        "s_per_step": win_time / max(1, win_steps),
                        "lr": record["lr"],
                        "train_seconds": train_seconds,
                        "val_loss": ev["loss"],
                        "val_acc": ev["acc"],
                        "val_bpb": ev["bpb"],
                    }
                    history.append(entry)
                    record.update(entry)
                    win_loss, win_correct, win_count, win_tokens, win_time, win_steps = 0.0, 0, 0, 0, 0.0, 0
                    if ev["acc"] > best["acc"]:
                        best = {"step": step, "acc": ev["acc"]}
                    bar.write(_format_entry(entry, task), file=sys.stderr)
                    if cfg.target_acc is not None and ev["acc"] >= cfg.target_acc:
                        stopped = "target"
            if cfg.max_minutes is not None and train_seconds >= 60 * cfg.max_minutes and stopped == "steps":
                stopped = "time"
            if signals.requested is not None:
                stopped = "interrupted"
            if step % every_ckpt == 0 or stopped != "steps" or step == cfg.steps:
                checkpoint()
            if callback is not None:
                callback(step, record)
        if signals.requested is not None:
            if stopped != "interrupted":  # the signal came between steps (e.g. during the checkpoint)
                checkpoint()
            bar.close()
            raise TrainingInterrupted(step, ckpt_path)
    bar.close()
    result: dict[str, Any] = {
        "task": cfg.task,
        "attention": model.backbone.attention_spec if hasattr(model, "backbone") else cfg.attention,
        "steps": step,
        "stopped": stopped,
        "train_seconds": train_seconds,
        "parameters": n_params,
        "best_val": best,
        "majority_acc": data.majority_acc,
        "s_per_step": train_seconds / max(step, 1),
    }
    if initial is not None:
        result["initial"] = initial
    # the last step's validation already is the final one: evaluate again only when it did not run
    if last_eval is not None and last_eval[0] == step:
        result["val"] = last_eval[1]
    else:
        result["val"] = run_eval("validation", data.val, cfg.num_val, cfg.eval_batches)
    if cfg.test and data.test is not None:
        result["test"] = run_eval("test", data.test, cfg.num_test)
    if cfg.out_dir:
        result["out_dir"] = cfg.out_dir
    log(result)
    return {"model": model, "model_config": model_cfg, "train_config": cfg, "history": history, **result}


def _format_entry(e: dict, task: Task) -> str:
    metric = f"val_bpb {e['val_bpb']:.3f}" if task.metric == "bpb" else f"val_acc {e['val_acc']:.4f}"
    return (
        f"step {e['step']:>6}  train_loss {e['train_loss']:.4f}  train_acc {e['train_acc']:.4f}  "
        f"val_loss {e['val_loss']:.4f}  {metric}  {e['tokens_per_s']:.0f} tok/s  {e['s_per_step'] * 1000:.0f} ms/step"
    )


def _progress(cfg: TrainConfig, step: int, model_cfg: ModelConfig):
    from tqdm.auto import tqdm

    return tqdm(
        total=cfg.steps,
        initial=step,
        disable=not cfg.progress,
        desc=f"{cfg.task} {model_cfg.attention}",
        dynamic_ncols=True,
        file=sys.stderr,
    )


# ----------------------------------------------------------------------------------------- CLI


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``spattn train <task>``."""
    from .tasks import task_names

    p.add_argument("task", help=f"task name: {', '.join(task_names())}")
    p.add_argument(
        "--attention", default="dense", metavar="SPEC", help="attention spec, e.g. 'window(size=32)' (default dense)"
    )
    g = p.add_argument_group("optimisation (defaults: the task's)")
    g.add_argument("--steps", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--warmup", type=int, help="linear warmup steps before the cosine decay")
    g.add_argument("--min-lr-ratio", type=float, default=0.0)
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, help="torch.set_num_threads")
    e = p.add_argument_group("evaluation, checkpoints, logging")
    e.add_argument("--eval-every", type=int, default=100)
    e.add_argument("--eval-batches", type=int, help="validation batches per eval (default all)")
    e.add_argument("--num-val", type=int, metavar="N", help="evaluate the first N validation examples (default all)")
    e.add_argument(
        "--num-test", type=int, metavar="N", help="evaluate the first N test examples at the end (default all)"
    )
    e.add_argument("--target-acc", type=float, help="stop once validation accuracy reaches this (0-1)")
    e.add_argument("--max-minutes", type=float, help="stop after this much training time (checkpointed)")
    e.add_argument(
        "--out",
        metavar="DIR",
        help="directory for checkpoint.pt and metrics.json (default: a new runs/<task>-<date>-<time>)",
    )
    e.add_argument("--no-save", action="store_true", help="save nothing (no checkpoint, no metrics.json)")
    e.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default: every eval)")
    e.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt if it exists")
    e.add_argument(
        "--resume-inexact",
        action="store_true",
        help="with --resume: continue even though seed / batch size / lr / ... differ from the saved run",
    )
    e.add_argument("--overwrite", action="store_true", help="start a new run in an --out DIR that holds a checkpoint")
    e.add_argument(
        "--init-from",
        metavar="CKPT",
        help="start from the weights of another run's checkpoint.pt (e.g. a dense model; the attention may differ)",
    )
    e.add_argument("--no-test", dest="test", action="store_false", help="skip the final test-set evaluation")
    e.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    t = p.add_argument_group("several processes (under torchrun --nproc_per_node N; see docs/distributed.md)")
    t.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="shard every sequence over the ranks instead of the batch (causal LMs, e.g. bytelm)",
    )
    t.add_argument(
        "--dist-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="seconds a collective waits for the other ranks before failing (default 300)",
    )
    m = p.add_argument_group("model (defaults: the task's)")
    m.add_argument("--dim", type=int)
    m.add_argument("--depth", type=int)
    m.add_argument("--heads", type=int)
    m.add_argument("--kv-heads", type=int)
    m.add_argument("--mlp-ratio", type=float)
    m.add_argument("--dropout", type=float)
    m.add_argument("--positions", choices=("learned", "rope", "none"))
    m.add_argument("--pool", choices=("cls", "mean"))
    m.add_argument("--backend", help="attention backend: auto | reference | blocksparse | flex")
    m.add_argument(
        "--short-conv",
        type=int,
        metavar="K",
        help="causal depthwise convolution of width K over the embeddings (H3 / Based; 0 = none)",
    )
    d = p.add_argument_group("data (what the task accepts; see its builder)")
    d.add_argument("--seq-len", type=int, help="sequence length (mqar, bytelm)")
    d.add_argument("--kv-pairs", type=int, help="key-value pairs (mqar)")
    d.add_argument("--vocab", type=int, help="vocabulary size (mqar)")
    d.add_argument("--max-len", type=int, help="longest example in tokens (listops, LRA files)")
    d.add_argument("--num-train", type=int)
    d.add_argument("--data-dir", help="directory of the official LRA release files (text, retrieval, image)")
    d.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other option of the task's data builder (Python literal values)",
    )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    import ast

    model = {
        k: getattr(args, k)
        for k in (
            "dim",
            "depth",
            "heads",
            "kv_heads",
            "mlp_ratio",
            "dropout",
            "positions",
            "pool",
            "backend",
            "short_conv",
        )
        if getattr(args, k, None) is not None
    }
    opts = {
        k: getattr(args, k)
        for k in ("seq_len", "kv_pairs", "vocab", "max_len", "num_train", "data_dir")
        if getattr(args, k, None) is not None
    }
    task = get_task(args.task)
    for name in ("num_val", "num_test"):  # also generate no more than is evaluated, where the builder can
        if getattr(args, name, None) is not None and name in task.options():
            opts[name] = getattr(args, name)
    for item in args.task_option:
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--task-option expects KEY=VALUE, got {item!r}")
        try:
            opts[key.strip()] = ast.literal_eval(val)
        except (ValueError, SyntaxError):
            opts[key.strip()] = val
    return TrainConfig(
        task=args.task,
        attention=args.attention,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup=args.warmup,
        min_lr_ratio=args.min_lr_ratio,
        grad_clip=args.grad_clip,
        bf16=args.bf16,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        target_acc=args.target_acc,
        seed=args.seed,
        out_dir=args.out,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        max_minutes=args.max_minutes,
        progress=args.progress,
        test=args.test,
        model=model,
        task_options=opts,
        init_from=getattr(args, "init_from", None),
        num_val=getattr(args, "num_val", None),
        num_test=getattr(args, "num_test", None),
        resume_inexact=getattr(args, "resume_inexact", False),
        overwrite=getattr(args, "overwrite", False),
        sequence_parallel=getattr(args, "sequence_parallel", False),
        dist_timeout=getattr(args, "dist_timeout", 300.0),
    )


def default_out_dir(task: str, root: str = "runs") -> str:
    """``runs/<task>-<YYYYmmdd-HHMMSS>`` (UTC), made unique with a suffix if it exists."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = os.path.join(root, f"{task}-{stamp}")
    path, i = base, 1
    while os.path.exists(path):
        i += 1
        path = f"{base}-{i}"
    return path


def summary_line(res: dict[str, Any]) -> str:
    parts = []
    if res.get("initial"):
        ini = res["initial"]
        parts.append(
            f"from {ini['attention']} weights ({ini['from']}): val acc {ini['val']['acc']:.4f} before training"
        )
    parts += [
        f"{res['task']} {res['attention']}: {res['steps']} steps ({res['stopped']}), "
        f"{res['train_seconds']:.0f} s training, {res['s_per_step'] * 1000:.0f} ms/step, {res['parameters']} params"
    ]
    for split in ("val", "test"):
        if split in res:
            r = res[split]
            parts.append(f"{split} acc {r['acc']:.4f} loss {r['loss']:.4f} bpb {r['bpb']:.3f}")
    if res.get("majority_acc") is not None:
        parts.append(f"majority-class acc {res['majority_acc']:.4f}")
    return "; ".join(parts)


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_train(args: argparse.Namespace) -> int:
    """``spattn train``: train, print a summary and where the run was saved; returns the exit status.

    Without ``--out`` (and without ``--no-save``) the run is saved to :func:`default_out_dir`.
    """
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if getattr(args, "no_save", False):
        if args.out or args.resume:
            raise ValueError("--no-save excludes --out and --resume")
    elif not args.out:
        if args.resume:
            raise ValueError("--resume needs --out DIR (the run to continue)")
        args.out = default_out_dir(args.task)
    cfg = config_from_args(args)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        res = train(cfg)
    except TrainingInterrupted as stop:
        print(f"spattn train: {stop}", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 reports
    print(summary_line(res))
    if res.get("out_dir"):
        print(
            f"saved {os.path.join(res['out_dir'], 'checkpoint.pt')} and metrics.json in {res['out_dir']} "
            f"(continue with: --out {res['out_dir']} --resume --steps N)"
        )
    return 0
