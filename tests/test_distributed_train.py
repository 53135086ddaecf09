"""``spattn train`` on several gloo processes: DDP over the global batch and the sequence-parallel
causal LM give the single process's losses (20 steps, 1e-5 relative); rank 0 alone writes the
checkpoint and metrics.json, every rank resumes from it; the CLI under torchrun."""

import json
import os
import subprocess
import sys

import pytest

from spattn.bench.train import TrainConfig, train
from spattn.distributed.local import run_local

STEPS = 20


def _config(**kw) -> TrainConfig:
    base = dict(
        task="bytelm",
        attention="window(size=16, block=16)",
        steps=STEPS,
        batch_size=4,
        lr=3e-3,
        warmup=2,
        eval_every=1000,
        num_val=2,
        test=False,
        progress=False,
        model=dict(dim=32, depth=2, heads=4, kv_heads=2),
        task_options=dict(seq_len=64, num_train=32),
    )
    return TrainConfig(**{**base, **kw})


def _losses(cfg: TrainConfig) -> list[float]:
    out = []
    train(cfg, callback=lambda step, record: out.append(record["loss"]))
    return out


def _distributed_runs(rank, world, out_dir):
    data_parallel = _losses(_config())
    sequence_parallel = _losses(_config(sequence_parallel=True))
    first = []

    def crash_at_half(step, record):
        first.append(record["loss"])
        if step == STEPS // 2:
            raise _Crash  # after the step's checkpoint: a killed run

    try:
        train(_config(out_dir=out_dir, checkpoint_every=STEPS // 2), callback=crash_at_half)
    except _Crash:
        pass
    resumed = _losses(_config(out_dir=out_dir, checkpoint_every=STEPS // 2, resume=True))
    return data_parallel, sequence_parallel, first + resumed


class _Crash(Exception):
    pass


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(a, b))


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    single = _losses(_config())
    assert len(single) == STEPS
    out_dir = str(tmp_path / "run")
    results = run_local(_distributed_runs, 2, out_dir, timeout=600, pg_timeout=120, threads=1)
    for rank, (dp, sp, resumed) in enumerate(results):
        assert _close(dp, single), (rank, dp, single)
        assert _close(sp, single), (rank, sp, single)
        assert _close(resumed, single), (rank, resumed, single)
    files = sorted(os.listdir(out_dir))
    assert files == ["checkpoint.pt", "metrics.json"], files  # one checkpoint, no temporary left behind
    with open(os.path.join(out_dir, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["checkpoint_step"] == STEPS and metrics["result"]["steps"] == STEPS


def _batch_not_divisible(rank, world):
    try:
        train(_config(batch_size=3))
    except ValueError as exc:
        return str(exc)
    return "no error"


@pytest.mark.slow
def test_batch_must_split_over_the_ranks():
    for message in run_local(_batch_not_divisible, 2, timeout=120, pg_timeout=30):
        assert "not divisible by the world size 2" in message, message


@pytest.mark.slow
def test_cli_under_torchrun(tmp_path):
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "spattn.cli",
        "train",
        "bytelm",
        "--attention",
        "window(size=16, block=16)",
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--seq-len",
        "64",
        "--num-train",
        "16",
        "--num-val",
        "2",
        "--dim",
        "32",
        "--depth",
        "1",
        "--heads",
        "2",
        "--no-test",
        "--no-progress",
        "--threads",
        "1",
        "--out",
        str(out),
        "--dist-timeout",
        "60",
    ]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("bytelm") == 1, proc.stdout  # rank 0 reports, once
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "metrics.json"]
