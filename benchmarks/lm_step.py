"""Training-step time of the byte-level LM per attention (issue 6: sparse step >= 2x faster than dense).

Builds ``spattn train bytelm``'s model (the task's defaults: dim 128, 2 layers, 4 heads, RoPE,
MLP ratio 4, context 2048, batch 4) once per attention and times whole training steps — forward,
cross-entropy, backward, AdamW — on random bytes. The attentions take turns step by step (round
robin), so machine noise hits them alike; the table reports each one's median step and its speedup
over dense. Run from the repository root: ``python benchmarks/lm_step.py --threads 1``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from spattn.bench.tasks import get_task
from spattn.bench.timing import time_interleaved
from spattn.models.builder import ModelConfig, build_model

DEFAULT_ATTENTIONS = ["dense", "window(size=128)", "window(size=128, block=32)", "routing(clusters=8)", "linear"]


def _stepper(spec: str, seq_len: int, batch: int, seed: int):
    task = get_task("bytelm")
    config = ModelConfig(
        kind="lm", vocab_size=256, num_classes=256, max_len=seq_len, attention=spec, **task.model_defaults
    )
    torch.manual_seed(seed)
    model = build_model(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 256, (batch, seq_len), generator=torch.Generator().manual_seed(seed))

    def step() -> None:
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1))
        aux = getattr(model, "aux_loss", None)
        if isinstance(aux, torch.Tensor) and aux.requires_grad:
            loss = loss + aux
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--attention", nargs="+", default=DEFAULT_ATTENTIONS)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per attention (after 2 warm-up steps)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", default="results/lm_step.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # seq_len + 1 bytes per row: inputs and next-byte targets of length seq_len
    steppers = {spec: _stepper(spec, args.seq_len + 1, args.batch, 0) for spec in args.attention}
    # 2 warm-up steps each, then the attentions take turns: one timed step each per round
    timings = time_interleaved(steppers, warmup=2, repeat=args.steps)
    medians = {spec: t["median_s"] for spec, t in timings.items()}
    dense = medians.get("dense")
    rows = [
        {"attention": spec, "step_ms": 1e3 * m, "speedup_vs_dense": dense / m if dense else None}
        for spec, m in medians.items()
    ]
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(
            {
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "seq_len": args.seq_len,
                "batch": args.batch,
                "steps": args.steps,
                "rows": rows,
            },
            fh,
            indent=2,
        )
    print(f"{'attention':<32} {'step ms':>9} {'vs dense':>9}")
    for r in rows:
        speed = f"{r['speedup_vs_dense']:.2f}x" if r["speedup_vs_dense"] else "-"
        print(f"{r['attention']:<32} {r['step_ms']:>9.1f} {speed:>9}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
