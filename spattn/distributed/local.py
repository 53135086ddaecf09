"""Run a function on N local processes joined in a gloo process group (tests, benchmarks, CPU runs).

Every process is joined or killed before :func:`run_local` returns: a rank that raises, dies or
overruns ``timeout`` makes the call fail with a clear error naming the rank, never a hang.
"""

from __future__ import annotations

import datetime
import os
import socket
import traceback
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_local", "free_port", "LocalRunError"]


class LocalRunError(RuntimeError):
    """A rank of :func:`run_local` failed, died or timed out."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, pg_timeout, threads, results):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        import torch

        torch.set_num_threads(threads)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=pg_timeout),
        )
        try:
            results.put((rank, True, fn(rank, world, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # report every failure to the parent, which raises it
        results.put((rank, False, traceback.format_exc()))


def run_local(
    fn: Callable[..., Any], world: int, *args, timeout: float = 120.0, pg_timeout: float = 30.0, threads: int = 1
) -> list[Any]:
    """Call ``fn(rank, world, *args)`` on ``world`` spawned processes in one gloo group on loopback.

    ``fn`` must be importable (a module-level function) and return something picklable. Returns the
    results in rank order. Raises :class:`LocalRunError` if a rank raises, exits without a result,
    or the whole run exceeds ``timeout`` seconds; collectives fail after ``pg_timeout`` seconds.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, fn, args, pg_timeout, threads, results), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    import queue
    import time

    deadline = time.monotonic() + timeout
    got: dict[int, Any] = {}
    errors: dict[int, str] = {}
    try:
        while len(got) + len(errors) < world:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LocalRunError(
                    f"run_local: ranks {sorted(set(range(world)) - set(got) - set(errors))} "
                    f"gave no result within {timeout:.0f} s" + _describe(errors)
                )
            try:
                rank, ok, value = results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                dead = [
                    r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in got and r not in errors
                ]
                for r in dead:
                    errors[r] = f"process exited with code {procs[r].exitcode} without a result"
                continue
            (got if ok else errors)[rank] = value
        if errors:
            raise LocalRunError("run_local: " + _describe(errors))
        return [got[r] for r in range(world)]
    finally:
        for p in procs:
            p.join(timeout=5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()


def _describe(errors: dict[int, str]) -> str:
    return "".join(f"\n--- rank {r} ---\n{msg}" for r, msg in sorted(errors.items()))
