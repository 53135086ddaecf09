"""``spattn bench mqar``: Zoology's MQAR sweep (Arora et al. 2024, "Zoology", Fig. 2).

For each attention, each sequence length ``L`` (kv pairs = ``L / 16``: (64, 4), (128, 8), (256, 16))
and each width ``d_model``, a 2-layer model without MLP is trained until validation query accuracy
reaches the target (Zoology: 0.99) or the step budget runs out; the cell is the best test query
accuracy over the learning rates tried (Zoology reports the max over ``logspace(-4, -2, 4)``).
The result is a table ``attention x d_model`` by ``L`` (text + JSON).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Optional, Sequence

from .timing import timed
from .train import TrainConfig, check_attention, train

__all__ = ["run_mqar_sweep", "format_mqar_table", "add_mqar_arguments", "run_mqar"]

DEFAULT_ATTENTIONS = ("dense", "window(size=32)")
DEFAULT_SEQ_LENS = (64, 128, 256)
DEFAULT_DIMS = (64, 128, 256)


def run_mqar_sweep(
    attentions: Sequence[str] = DEFAULT_ATTENTIONS,
    seq_lens: Sequence[int] = DEFAULT_SEQ_LENS,
    dims: Sequence[int] = DEFAULT_DIMS,
    lrs: Sequence[float] = (3e-3,),
    *,
    steps: int = 2000,
    batch_size: int = 64,
    num_train: int = 20_000,
    num_test: int = 1000,
    vocab: int = 8192,
    target_acc: float = 0.99,
    eval_every: int = 100,
    seed: int = 0,
    progress: bool = False,
    json_path: Optional[str] = None,
    log=print,
) -> list[dict[str, Any]]:
    """Train every (attention, L, d_model, lr) cell; returns one row per (attention, L, d_model)."""
    from .tasks import get_task

    for attention in attentions:  # every spec checked before any data is generated
        check_attention(attention)
    task = get_task("mqar")
    rows = []
    data_cache: dict[int, Any] = {}
    for L in seq_lens:
        if L % 16 or L < 32:
            raise ValueError(f"bench mqar: sequence lengths must be multiples of 16 (kv pairs = L/16), got {L}")
        opts = dict(
            seq_len=L,
            kv_pairs=L // 16,
            vocab=vocab,
            num_train=num_train,
            num_test=num_test,
            num_val=min(num_test, 500),
            seed=seed,
        )
        data_cache[L] = (opts, task.make_data(**opts))
    for attention in attentions:
        for L in seq_lens:
            opts, data = data_cache[L]
            for d in dims:
                best = None
                for lr in lrs:
                    cfg = TrainConfig(
                        task="mqar",
                        attention=attention,
                        steps=steps,
                        batch_size=batch_size,
                        lr=lr,
                        warmup=min(100, steps // 10),
                        eval_every=eval_every,
                        eval_batches=4,
                        target_acc=target_acc,
                        seed=seed,
                        progress=progress,
                        model=dict(dim=d, max_len=L),
                        task_options=opts,
                    )
                    res, seconds = timed(lambda: train(cfg, data=data))
                    row = {
                        "attention": res["attention"],
                        "spec": attention,
                        "seq_len": L,
                        "kv_pairs": L // 16,
                        "dim": d,
                        "lr": lr,
                        "steps": res["steps"],
                        "stopped": res["stopped"],
                        "test_acc": res["test"]["acc"],
                        "val_acc": res["val"]["acc"],
                        "seconds": seconds,
                        "s_per_step": res["s_per_step"],
                    }
                    log(
                        f"mqar {attention:<24} L={L:<4} d={d:<4} lr={lr:.1e}: test query acc {row['test_acc']:.4f} "
                        f"after {row['steps']} steps ({row['stopped']}, {row['seconds']:.0f} s)"
                    )
                    if best is None or row["test_acc"] > best["test_acc"]:
                        best = row
                rows.append(best)
                if json_path:
                    _dump(json_path, rows)
    return rows


def _dump(path: str, rows) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"benchmark": "mqar", "rows": rows}, f, indent=1)


def format_mqar_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table: one line per (attention, d_model), one column per (L, kv pairs); test query accuracy %."""
    cols = sorted({(r["seq_len"], r["kv_pairs"]) for r in rows})
    keys = []
    for r in rows:
        if (r["spec"], r["dim"]) not in keys:
            keys.append((r["spec"], r["dim"]))
    cell = {(r["spec"], r["dim"], r["seq_len"]): r for r in rows}
    head = "| attention | d_model | " + " | ".join(f"L={L}, kv={kv}" for L, kv in cols) + " |"
    lines = [head, "|" + "---|" * (2 + len(cols))]
    for spec, d in keys:
        vals = []
        for L, _ in cols:
            r = cell.get((spec, d, L))
            vals.append("—" if r is None else f"{100 * r['test_acc']:.1f} ({r['steps']} st)")
        lines.append(f"| {spec} | {d} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def add_mqar_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attentions", nargs="+", default=list(DEFAULT_ATTENTIONS), metavar="SPEC")
    p.add_argument("--seq-lens", nargs="+", type=int, default=list(DEFAULT_SEQ_LENS), metavar="L")
    p.add_argument("--dims", nargs="+", type=int, default=list(DEFAULT_DIMS), metavar="D")
    p.add_argument(
        "--lrs",
        nargs="+",
        type=float,
        default=[3e-3],
        metavar="LR",
        help="learning rates; the cell is the best (Zoology: 1e-4 4.6e-4 2.2e-3 1e-2)",
    )
    p.add_argument("--steps", type=int, default=2000, help="step budget per cell (stops early at --target-acc)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-train", type=int, default=20_000)
    p.add_argument("--num-test", type=int, default=1000)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--target-acc", type=float, default=0.99)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="results/mqar.json", metavar="PATH")
    p.add_argument("--quick", action="store_true", help="L=64 only, d_model 64, 300 steps (a smoke run)")
    p.add_argument("--progress", action="store_true", help="a progress bar per cell")


def run_mqar(args: argparse.Namespace) -> int:
    if args.quick:
        args.seq_lens, args.dims, args.steps = [64], [64], min(args.steps, 300)
    rows = run_mqar_sweep(
        args.attentions,
        args.seq_lens,
        args.dims,
        args.lrs,
        steps=args.steps,
        batch_size=args.batch_size,
        num_train=args.num_train,
        num_test=args.num_test,
        vocab=args.vocab,
        target_acc=args.target_acc,
        seed=args.seed,
        progress=args.progress,
        json_path=args.json,
    )
    print(format_mqar_table(rows))
    print(f"(test query accuracy %, best over lr {', '.join(map(str, args.lrs))}; JSON: {args.json})")
    return 0
