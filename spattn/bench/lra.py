"""``spattn bench lra``: the Long Range Arena tasks available on this machine, as an LRA table.

ListOps and Pathfinder are generated (:mod:`spattn.data`); Text, Retrieval and Image need the
official release files (``--data-dir``). Each task is trained with each attention using a
CPU-scaled configuration (below; override with the options) and the test accuracies are printed
beside the published rows of Tay et al. 2021, Table 1, which are labelled "published": they were
obtained with the full-size configurations on TPUs and are not comparable cell by cell.
"""

from __future__ import annotations

import math

import argparse
import json
import os
from typing import Any, Optional, Sequence

from .train import TrainConfig, check_attention, train

__all__ = ["PUBLISHED", "LRA_TASKS", "CPU_CONFIGS", "run_lra_sweep", "format_lra_table", "add_lra_arguments", "run_lra"]

LRA_TASKS = ("listops", "text", "retrieval", "image", "pathfinder")
COLUMNS = ("ListOps", "Text", "Retrieval", "Image", "Pathfinder", "Path-X")

#: Tay et al. 2021 ("Long Range Arena"), Table 1 (the repository README agrees); Path-X: FAIL
PUBLISHED = {
    "Transformer": (36.37, 64.27, 57.46, 42.44, 71.40, None, 54.39),
    "BigBird": (36.05, 64.02, 59.29, 40.83, 74.87, None, 55.01),
    "Performer": (18.01, 65.40, 53.82, 42.77, 77.05, None, 51.41),
}

#: CPU-scaled runs (2 cores): shorter ListOps, fewer steps, small models. Options of the task and TrainConfig.
CPU_CONFIGS: dict[str, dict[str, Any]] = {
    "listops": dict(
        task_options=dict(max_len=1000, num_train=20_000),
        steps=1500,
        batch_size=32,
        lr=1e-3,
        warmup=50,
        model=dict(dim=64, depth=2, heads=2, mlp_ratio=2.0, pool="cls"),
    ),
    "pathfinder": dict(
        task_options=dict(resolution=32, num_train=20_000),
        steps=2000,
        batch_size=64,
        lr=1e-3,
        warmup=100,
        model=dict(dim=32, depth=2, heads=2, mlp_ratio=2.0, pool="mean"),
    ),
    "text": dict(
        task_options=dict(max_len=1000),
        steps=2000,
        batch_size=32,
        lr=1e-3,
        warmup=100,
        model=dict(dim=64, depth=2, heads=2, pool="cls"),
    ),
    "retrieval": dict(
        task_options=dict(max_len=1000),
        steps=2000,
        batch_size=16,
        lr=1e-3,
        warmup=100,
        model=dict(dim=64, depth=2, heads=2, pool="cls"),
    ),
    "image": dict(
        task_options=dict(),
        steps=2000,
        batch_size=64,
        lr=1e-3,
        warmup=100,
        model=dict(dim=32, depth=1, heads=1, pool="mean"),
    ),
}


def available_tasks(tasks: Sequence[str], data_dir: Optional[str]) -> tuple[list[str], list[str]]:
    """(runnable, skipped-with-reason) — file-based tasks need ``data_dir``."""
    run, skipped = [], []
    for t in tasks:
        if t not in LRA_TASKS:
            raise ValueError(f"bench lra: unknown LRA task {t!r}; valid: {', '.join(LRA_TASKS)}")
        if t in ("text", "retrieval", "image") and not data_dir:
            skipped.append(f"{t} (needs the LRA release files: --data-dir)")
        else:
            run.append(t)
    return run, skipped


def run_lra_sweep(
    attentions: Sequence[str],
    tasks: Sequence[str] = ("listops", "pathfinder"),
    *,
    data_dir: Optional[str] = None,
    steps: Optional[int] = None,
    max_minutes: Optional[float] = None,
    seed: int = 0,
    progress: bool = False,
    overrides: Optional[dict[str, dict]] = None,
    json_path: Optional[str] = None,
    log=print,
) -> dict[str, Any]:
    """Train every (task, attention); returns ``{"rows": [...], "skipped": [...]}`` (accuracies in %)."""
    from .tasks import get_task

    for attention in attentions:  # every spec checked before any data is generated
        check_attention(attention)
    runnable, skipped = available_tasks(tasks, data_dir)
    rows = []
    for task_name in runnable:
        base = dict(CPU_CONFIGS[task_name])
        base.update((overrides or {}).get(task_name, {}))
        opts = dict(base.pop("task_options", {}))
        if data_dir and task_name in ("text", "retrieval", "image"):
            opts["data_dir"] = data_dir
        opts["seed"] = seed if "seed" in get_task(task_name).options() else opts.get("seed", 0)
        opts = {k: v for k, v in opts.items() if k in get_task(task_name).options()}
        data = get_task(task_name).make_data(**opts)
        for attention in attentions:
            cfg = TrainConfig(
                task=task_name,
                attention=attention,
                seed=seed,
                progress=progress,
                eval_every=100,
                eval_batches=8,
                max_minutes=max_minutes,
                task_options=opts,
                **base,
            )
            if steps is not None:
                cfg.steps = steps
            res = train(cfg, data=data)
            row = {
                "task": task_name,
                "spec": attention,
                "attention": res["attention"],
                "test_acc": 100 * res["test"]["acc"],
                "steps": res["steps"],
                "stopped": res["stopped"],
                "train_seconds": res["train_seconds"],
                "s_per_step": res["s_per_step"],
                "majority_acc": None if res["majority_acc"] is None else 100 * res["majority_acc"],
            }
            rows.append(row)
            log(
                f"lra {task_name:<10} {attention:<24} test acc {row['test_acc']:.2f}% after {row['steps']} steps "
                f"({row['train_seconds']:.0f} s, {1000 * row['s_per_step']:.0f} ms/step)"
            )
            if json_path:
                os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
                with open(json_path, "w") as f:
                    json.dump({"benchmark": "lra", "rows": rows, "skipped": skipped}, f, indent=1)
    return {"rows": rows, "skipped": skipped}


def format_lra_table(rows: Sequence[dict[str, Any]], published: bool = True) -> str:
    """Markdown LRA table: our test accuracies (%) per attention, then the published rows."""
    col_of = dict(zip(LRA_TASKS, COLUMNS))
    lines = ["| model | " + " | ".join(COLUMNS) + " | Avg (tasks run) |", "|" + "---|" * (len(COLUMNS) + 2)]
    specs = []
    for r in rows:
        if r["spec"] not in specs:
            specs.append(r["spec"])
    for spec in specs:
        cells = {col_of[r["task"]]: r["test_acc"] for r in rows if r["spec"] == spec}
        vals = [f"{cells[c]:.2f}" if c in cells else "—" for c in COLUMNS]
        avg = sum(cells.values()) / len(cells)
        lines.append(f"| ours: {spec} (CPU-scaled) | " + " | ".join(vals) + f" | {avg:.2f} |")
    if published:
        for name, vals in PUBLISHED.items():
            cells = [("FAIL" if v is None else f"{v:.2f}") for v in vals[:6]]
            lines.append(
                f"| {name} (published, Tay et al. 2021) | " + " | ".join(cells) + f" | {vals[6]:.2f} (5 tasks) |"
            )
    majority = {col_of[r["task"]]: r["majority_acc"] for r in rows if r.get("majority_acc") is not None}
    if majority:
        lines.append(
            "| majority class (our test split) | "
            + " | ".join(f"{majority[c]:.2f}" if c in majority else "—" for c in COLUMNS)
            + " | |"
        )
    return "\n".join(lines)


def add_lra_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attentions", nargs="+", default=["dense", "bigbird(block=32)"], metavar="SPEC")
    p.add_argument(
        "--tasks",
        nargs="+",
        default=["listops", "pathfinder"],
        metavar="TASK",
        help=f"LRA tasks among {', '.join(LRA_TASKS)} (text/retrieval/image need --data-dir)",
    )
    p.add_argument("--data-dir", help="directory holding the official LRA release files")
    p.add_argument("--steps", type=int, help="override the CPU-scaled step budget of every task")
    p.add_argument("--max-minutes", type=float, help="time budget per (task, attention) run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="results/lra.json", metavar="PATH")
    p.add_argument("--progress", action="store_true")


def run_lra(args: argparse.Namespace) -> int:
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be a positive int, got {args.steps}")
    if args.max_minutes is not None and not (math.isfinite(args.max_minutes) and args.max_minutes > 0):
        raise ValueError(f"--max-minutes must be a positive number of minutes, got {args.max_minutes}")
    res = run_lra_sweep(
        args.attentions,
        args.tasks,
        data_dir=args.data_dir,
        steps=args.steps,
        max_minutes=args.max_minutes,
        seed=args.seed,
        progress=args.progress,
        json_path=args.json,
    )
    print(format_lra_table(res["rows"]))
    for s in res["skipped"]:
        print(f"skipped: {s}")
    print(
        "Published rows: full-size models on TPU (Tay et al. 2021, Table 1); ours: CPU-scaled runs (see spattn.bench.lra.CPU_CONFIGS)."
    )
    return 0
