"""Train one task with several attentions under the same budget; print accuracy / bits-per-byte and step time.

    python benchmarks/compare_attention.py listops --attentions dense "bigbird(block=32)" --max-minutes 30 \
        -- --max-len 1000 --num-train 5000 --batch-size 32 --lr 1e-3 --warmup 30 --steps 1500 --eval-every 50
    python benchmarks/compare_attention.py bytelm --attentions dense "window(size=128)" "routing(clusters=4)" linear \
        -- --seq-len 2048 --batch-size 4 --steps 300 --eval-every 50

Everything after ``--`` is passed to ``spattn train`` (see ``spattn.bench.train.add_train_arguments``);
each attention gets its own output directory under ``--out`` (checkpoints, metrics.json) and can be resumed.
"""

import argparse
import json
import os
import sys

from spattn.bench.train import add_train_arguments, config_from_args, summary_line, train


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task")
    p.add_argument("--attentions", nargs="+", required=True, metavar="SPEC")
    p.add_argument("--max-minutes", type=float, help="training-time budget per attention")
    p.add_argument("--out", default="runs/compare", metavar="DIR")
    a = p.parse_args(own)
    rows = []
    for spec in a.attentions:
        tp = argparse.ArgumentParser()
        add_train_arguments(tp)
        safe = "".join(c if c.isalnum() else "_" for c in spec).strip("_")
        args = tp.parse_args(
            [a.task, "--attention", spec, "--out", os.path.join(a.out, a.task, safe), *extra]
            + (["--max-minutes", str(a.max_minutes)] if a.max_minutes else [])
        )
        res = train(config_from_args(args))
        print(summary_line(res), flush=True)
        rows.append(
            {
                k: res[k]
                for k in (
                    "task",
                    "attention",
                    "steps",
                    "stopped",
                    "train_seconds",
                    "s_per_step",
                    "parameters",
                    "majority_acc",
                    "val",
                    "test",
                )
                if k in res
            }
        )
    metric = "bpb" if a.task == "bytelm" else "acc"
    print(f"\n| attention | steps | test {metric} | ms/step | training s |\n|---|---|---|---|---|")
    for r in rows:
        v = r.get("test", r["val"])[metric]
        print(
            f"| {r['attention']} | {r['steps']} | {v:.4f} | {1000 * r['s_per_step']:.0f} | {r['train_seconds']:.0f} |"
        )
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"{a.task}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
