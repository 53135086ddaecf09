"""Sequence-parallel attention on P local gloo processes: bytes per rank and end-to-end time.

Per pattern, every rank holds N/P contiguous tokens of ``q, k, v [B, H, N, D]`` (fp32) and runs
``spattn.distributed.sequence_parallel_attention`` forward and forward+backward. Dense runs as
ring attention; sparse patterns fetch only the key blocks their queries select. Reported per
pattern: bytes sent / received per rank (max and mean over ranks, forward+backward of one call),
median wall time of the slowest rank, and single-process ``spattn.attention`` on the whole
sequence beside it (same thread budget: the P processes share the machine's cores).

Inputs are a smooth random walk along the sequence plus noise, so content-based selectors see
the locality real hidden states have (i.i.d. noise would make block_topk pick blocks at random).

Run from the repository root (about 5 minutes on 2 cores):
``python benchmarks/sequence_parallel.py`` (defaults: N=16384, 4 processes, B=1, H=4, D=64).
Writes ``results/sequence_parallel.json`` and checks the design target: window(size=256) sends
<= 10 % of the dense ring's bytes per rank and is faster end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist

import spattn
from spattn.bench.timing import time_call
from spattn.distributed import record_comm, sequence_parallel_attention
from spattn.distributed.local import run_local

PATTERNS = ("dense", "window(size=256)", "bigbird(block=64)", "block_topk(k=8, block=64)")


def make_inputs(cfg: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic q, k, v ``[B, H, N, D]``: a smooth random walk plus noise."""
    g = torch.Generator().manual_seed(cfg["seed"])
    shape = (cfg["batch"], cfg["heads"], cfg["n"], cfg["dim"])

    def one():
        walk = torch.randn(shape, generator=g).cumsum(2) / cfg["n"] ** 0.5 * 4
        return walk + torch.randn(shape, generator=g)

    return one(), one(), one()


def shard_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    return n * rank // world, n * (rank + 1) // world


def _times(fn, repeats: int, *, warmup: int, group_sync: bool) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn`` after ``warmup``; with ``group_sync`` the ranks start
    each call together (a barrier, untimed, before every call), so call ``i`` can be reduced over ranks."""
    before = dist.barrier if group_sync else None
    return time_call(fn, warmup=warmup, repeat=repeats, memory=False, before=before)["times_s"]


def _rank_run(rank: int, world: int, cfg: dict) -> dict:
    q, k, v = make_inputs(cfg)
    lo, hi = shard_bounds(cfg["n"], world, rank)
    q, k, v = (t[:, :, lo:hi].contiguous().requires_grad_() for t in (q, k, v))
    out = {}
    for pattern in cfg["patterns"]:
        pat = None if pattern == "dense" else pattern

        def forward():
            with torch.no_grad():
                sequence_parallel_attention(q, k, v, pat, causal=cfg["causal"])

        def train():
            sequence_parallel_attention(q, k, v, pat, causal=cfg["causal"]).sum().backward()

        with record_comm() as fwd_stats:  # these two calls are the warm-up too
            forward()
        with record_comm() as stats:
            train()
        out[pattern] = dict(
            fwd_bytes_sent=fwd_stats.bytes_sent,
            fwd_bytes_received=fwd_stats.bytes_received,
            bytes_sent=stats.bytes_sent,
            bytes_received=stats.bytes_received,
            fwd_s=_times(forward, cfg["repeats"], warmup=0, group_sync=True),
            fwd_bwd_s=_times(train, cfg["repeats"], warmup=0, group_sync=True),
        )
    return out


def single_process(cfg: dict) -> dict:
    torch.set_num_threads(cfg["single_threads"])
    q, k, v = (t.requires_grad_() for t in make_inputs(cfg))
    out = {}
    for pattern in cfg["patterns"]:
        pat = None if pattern == "dense" else pattern

        def forward():
            with torch.no_grad():
                spattn.attention(q, k, v, pat, causal=cfg["causal"])

        def train():
            spattn.attention(q, k, v, pat, causal=cfg["causal"]).sum().backward()

        out[pattern] = dict(
            fwd_s=_times(forward, cfg["repeats"], warmup=1, group_sync=False),
            fwd_bwd_s=_times(train, cfg["repeats"], warmup=1, group_sync=False),
        )
    return out


def summarize(per_rank: list[dict], single: dict, cfg: dict) -> list[dict]:
    rows = []
    for pattern in cfg["patterns"]:
        ranks = [r[pattern] for r in per_rank]
        slowest = lambda key: statistics.median(max(r[key][i] for r in ranks) for i in range(cfg["repeats"]))  # noqa: E731
        rows.append(
            dict(
                pattern=pattern,
                sent_max=max(r["bytes_sent"] for r in ranks),
                sent_mean=statistics.mean(r["bytes_sent"] for r in ranks),
                received_max=max(r["bytes_received"] for r in ranks),
                fwd_sent_max=max(r["fwd_bytes_sent"] for r in ranks),
                fwd_s=slowest("fwd_s"),
                fwd_bwd_s=slowest("fwd_bwd_s"),
                single_fwd_s=statistics.median(single[pattern]["fwd_s"]),
                single_fwd_bwd_s=statistics.median(single[pattern]["fwd_bwd_s"]),
            )
        )
    dense = next(r for r in rows if r["pattern"] == "dense")
    for r in rows:
        r["bytes_vs_ring"] = r["sent_max"] / dense["sent_max"]
    return rows


def print_table(rows: list[dict], cfg: dict) -> None:
    mb = 1 / 2**20
    print(
        f"N={cfg['n']} P={cfg['world']} B={cfg['batch']} H={cfg['heads']} D={cfg['dim']} fp32 causal={cfg['causal']} "
        f"(bytes: one forward+backward call, per rank)"
    )
    print(
        "| pattern | sent MiB max (mean) | fwd sent MiB | vs ring | P-proc fwd s | P-proc fwd+bwd s | 1-proc fwd s | 1-proc fwd+bwd s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['pattern']} | {r['sent_max'] * mb:.2f} ({r['sent_mean'] * mb:.2f}) | {r['fwd_sent_max'] * mb:.2f} | "
            f"{100 * r['bytes_vs_ring']:.1f} % | {r['fwd_s']:.3f} | {r['fwd_bwd_s']:.3f} | "
            f"{r['single_fwd_s']:.3f} | {r['single_fwd_bwd_s']:.3f} |"
        )


def check_target(rows: list[dict]) -> dict:
    by = {r["pattern"]: r for r in rows}
    if "window(size=256)" not in by or "dense" not in by:
        return {}
    w, d = by["window(size=256)"], by["dense"]
    return dict(
        window_bytes_share=w["bytes_vs_ring"],
        bytes_met=w["bytes_vs_ring"] <= 0.10,
        window_over_ring_time=w["fwd_bwd_s"] / d["fwd_bwd_s"],
        faster_met=w["fwd_bwd_s"] < d["fwd_bwd_s"],
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--patterns", nargs="+", default=list(PATTERNS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--single-threads", type=int, default=2, help="threads of the single-process run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", default="results/sequence_parallel.json")
    args = ap.parse_args(argv)
    cfg = {k: v for k, v in vars(args).items() if k not in ("out", "timeout")}
    if "dense" not in cfg["patterns"]:
        cfg["patterns"] = ["dense", *cfg["patterns"]]
    per_rank = run_local(_rank_run, args.world, cfg, timeout=args.timeout, pg_timeout=600, threads=args.threads)
    single = single_process(cfg)
    rows = summarize(per_rank, single, cfg)
    print_table(rows, cfg)
    target = check_target(rows)
    if target:
        print(
            f"window(size=256): {100 * target['window_bytes_share']:.1f} % of the ring's bytes per rank "
            f"(target <= 10 %: {'met' if target['bytes_met'] else 'NOT met'}); fwd+bwd time "
            f"{target['window_over_ring_time']:.2f}x the ring's ({'faster' if target['faster_met'] else 'NOT faster'})"
        )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(config=cfg, rows=rows, target=target, per_rank=per_rank), f, indent=1)


if __name__ == "__main__":
    main()
