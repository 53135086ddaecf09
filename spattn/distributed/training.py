"""Training on several processes (``torchrun --nproc_per_node N spattn train ...``).

Two ways, one :class:`TrainingGroup` interface that the training loop calls at fixed points:

* data parallel (default): every rank draws the same global batch and trains on its contiguous
  slice of it (a distributed sampler over the global batch order) inside
  :class:`~torch.nn.parallel.DistributedDataParallel`; the loss is scaled so that DDP's gradient
  average equals the gradient of the global batch's mean loss: same global batch, same update
  as one process.
* sequence parallel (``sequence_parallel=True``, causal LMs): every rank takes the whole batch but
  only its contiguous shard of every sequence, runs :class:`~spattn.distributed.lm.SequenceParallelLM`,
  and the partial gradients are summed over the ranks.

Logging, metrics and checkpoints are the main rank's (rank 0) job; everything else runs on every
rank. Collectives fail after ``timeout`` seconds instead of hanging on a dead peer.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .lm import SequenceParallelLM

__all__ = ["TrainingGroup", "launched_by_torchrun"]


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (``WORLD_SIZE`` > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class _Forward(nn.Module):
    """Runs ``fn(model, batch)`` as a module's forward, so that DDP wraps the loop's own forward."""

    def __init__(self, model: nn.Module, fn: Callable):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, batch):
        return self.fn(self.model, batch)


class TrainingGroup:
    """The ranks of one training run. ``world == 1`` (a plain single-process run) makes every method a no-op."""

    def __init__(self, *, sequence_parallel: bool = False, group: Optional[dist.ProcessGroup] = None):
        active = dist.is_available() and dist.is_initialized()
        self.group = group
        self.rank = dist.get_rank(group) if active else 0
        self.world = dist.get_world_size(group) if active else 1
        self.sequence_parallel = sequence_parallel
        self.owns_group = False
        if sequence_parallel and self.world == 1:
            raise ValueError("sequence_parallel needs several processes (run under torchrun --nproc_per_node N)")

    @classmethod
    def from_environment(cls, *, sequence_parallel: bool = False, timeout: float = 300.0) -> "TrainingGroup":
        """Join torchrun's process group (gloo on CPU, NCCL when CUDA is available), or run alone."""
        if not (dist.is_available() and dist.is_initialized()) and launched_by_torchrun():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
            made = cls(sequence_parallel=sequence_parallel)
            made.owns_group = True
            return made
        return cls(sequence_parallel=sequence_parallel)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        if not self.active:
            return "1 process"
        how = "sequence parallel" if self.sequence_parallel else "data parallel (DDP)"
        return f"{self.world} processes, {how}, backend {dist.get_backend(self.group)}"

    # ------------------------------------------------------------------ checks and data
    def check(self, batch_size: int, task_kind: str) -> None:
        """Refuse what cannot give the single-process result (same error on every rank)."""
        if not self.active:
            return
        if self.sequence_parallel:
            if task_kind != "lm":
                raise ValueError(
                    f"sequence_parallel trains causal LMs (e.g. bytelm); this task's model is {task_kind!r}"
                )
        elif batch_size % self.world:
            raise ValueError(
                f"batch size {batch_size} is not divisible by the world size {self.world}: every rank "
                "takes an equal slice of the global batch (choose --batch-size or --nproc_per_node)"
            )

    def local_indices(self, indices: list[int]) -> list[int]:
        """This rank's examples of the global batch (all of them when the sequence is sharded)."""
        if not self.active or self.sequence_parallel:
            return indices
        per = len(indices) // self.world
        return indices[self.rank * per : (self.rank + 1) * per]

    def sequence_bounds(self, n: int) -> tuple[int, int]:
        return n * self.rank // self.world, n * (self.rank + 1) // self.world

    # ------------------------------------------------------------------ model and step
    def wrap(self, model: nn.Module, forward: Callable[[nn.Module, dict], Any]) -> Callable[[dict], Any]:
        """The step's forward ``batch -> forward(model, batch)`` run the distributed way."""
        if not self.active:
            return lambda batch: forward(model, batch)
        if self.sequence_parallel:
            sp = SequenceParallelLM(model, self.group)
            self._sp = sp

            def sharded(batch):
                lo, hi = self.sequence_bounds(batch["tokens"].shape[1])
                logits = sp(batch["tokens"][:, lo:hi])
                target = batch["target"][:, lo:hi].long()
                return logits.reshape(-1, logits.shape[-1]), target.reshape(-1)

            return sharded
        device_ids = [torch.cuda.current_device()] if dist.get_backend(self.group) == "nccl" else None
        ddp = nn.parallel.DistributedDataParallel(
            _Forward(model, forward), device_ids=device_ids, process_group=self.group
        )
        return ddp

    def reduce_step(self, loss: Tensor, correct: int, count: int, stop: bool) -> tuple[Tensor, float, int, int, bool]:
        """All-reduce one step's statistics: ``(loss to backpropagate, global mean loss, correct, count, stop)``.

        ``loss`` is this rank's mean over its ``count`` targets. The returned loss makes the ranks'
        gradients combine (DDP's average, or the sequence-parallel sum) into the gradient of the
        mean over the whole global batch; ``stop`` is True on every rank if any rank was asked to stop.
        """
        if not self.active:
            return loss, float(loss.detach()), correct, count, stop
        stats = torch.tensor(
            [float(loss.detach()) * count, correct, count, float(stop)], dtype=torch.float64, device=loss.device
        )
        dist.all_reduce(stats, group=self.group)
        total = max(int(stats[2]), 1)
        factor = count * (1 if self.sequence_parallel else self.world) / total
        return loss * factor, float(stats[0]) / total, int(stats[1]), int(stats[2]), bool(stats[3] > 0)

    def after_backward(self) -> None:
        """Sequence parallel: sum the ranks' partial gradients (DDP already averaged its own)."""
        if self.active and self.sequence_parallel:
            self._sp.reduce_gradients()

    def agree(self, value: int, what: str) -> None:
        """Raise on every rank unless all ranks hold the same int ``value``."""
        if not self.active:
            return
        device = "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"
        values = [torch.zeros((), dtype=torch.long, device=device) for _ in range(self.world)]
        dist.all_gather(values, torch.tensor(value, dtype=torch.long, device=device), group=self.group)
        values = [int(v) for v in values]
        if len(set(values)) > 1:
            raise RuntimeError(f"ranks disagree on {what}: {values} (rank order)")

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=self.group)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
