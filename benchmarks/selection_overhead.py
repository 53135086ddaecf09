"""Selection overhead of the dynamic patterns: estimation time vs dense causal attention (issue 3).

For N in (8192, 16384), B=1, H heads, D=64, fp32, causal: times ``pattern.layout(q, k, causal=True)``
(the estimation, including building the Layout) for ``vertical_slash``, ``xattention``,
``flexprefill``, ``minference_block`` and, when registered, ``block_topk`` and ``routing``;
and dense causal SDPA on the same q, k, v. Prints ratio = estimation / dense (target <= 0.25)
plus the layout's block density and estimation / (dense x (1 - block density)), the time the
sparsity could save (DESIGN.md's form of the target), and writes ``results/selection_overhead.json``.
Inputs are random (diffuse attention), so the selectors keep many blocks: the densities are not
representative of real LLM heads, the estimation times are.

Run from the repository root: ``python benchmarks/selection_overhead.py`` (a few minutes on 2 cores).
The machine is shared: numbers are medians of ``--repeat`` runs, ratios come from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

import spattn
from spattn import registry
from spattn.bench.timing import time_call

SPECS = (
    "vertical_slash(vertical=1000, slash=6096)",
    "xattention(threshold=0.9, stride=8, block=128)",
    "flexprefill(gamma=0.9, tau=0.1)",
    "minference_block(k=100, block=64)",
    "block_topk",
    "routing",
)
TARGET = 0.25


def timings(fn, repeat: int, warmup: int = 1) -> tuple[float, float]:
    """(median, min) wall time of ``fn`` over ``repeat`` calls after ``warmup``."""
    t = time_call(fn, warmup=warmup, repeat=repeat, memory=False)
    return t["median_s"], min(t["times_s"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--specs", nargs="+", default=list(SPECS))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    p.add_argument("--out", default="results/selection_overhead.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    known = {m.name for m in registry.mechanisms()}
    rows = []
    for n in args.n:
        gen = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, args.heads, n, args.dim, generator=gen) for _ in range(3))
        with torch.no_grad():
            dense, dense_min = timings(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), args.repeat)
        for spec in args.specs:
            name = registry.parse_spec(spec)[0]
            if name not in known:
                print(f"skip {spec}: not registered")
                continue
            pat = spattn.pattern(spec)
            with torch.no_grad():
                est, est_min = timings(lambda: pat.layout(q, k, causal=True), args.repeat)
                layout = pat.layout(q, k, causal=True)
            rows.append(
                {
                    "n": n,
                    "heads": args.heads,
                    "dim": args.dim,
                    "spec": pat.spec(),
                    "estimation_s": est,
                    "dense_sdpa_causal_s": dense,
                    "ratio": est / dense,
                    "estimation_min_s": est_min,
                    "dense_min_s": dense_min,
                    "ratio_of_minima": est_min / dense_min,
                    "block_density": layout.block_density(),
                    "met": est / dense <= TARGET,
                }
            )
            # DESIGN.md's form of the target: estimation vs the dense time the sparsity saves
            saved = dense * (1.0 - rows[-1]["block_density"])
            rows[-1]["ratio_to_saved"] = est / saved if saved > 0 else None
            r = rows[-1]
            print(
                f"N={n:6d} {r['spec'][:60]:60s} est {est * 1e3:8.1f} ms  dense {dense * 1e3:8.1f} ms  "
                f"ratio {r['ratio']:.3f} (minima {r['ratio_of_minima']:.3f})  block density {r['block_density']:.3f}",
                flush=True,
            )

    print(f"\nthreads={torch.get_num_threads()}, medians of {args.repeat} (ratio of minima in brackets)")
    print(
        "| N | pattern | estimation (ms) | dense causal SDPA (ms) | ratio | target <= 0.25 | block density | est / saved |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['n']} | `{r['spec']}` | {r['estimation_s'] * 1e3:.1f} | {r['dense_sdpa_causal_s'] * 1e3:.1f} | "
            f"{r['ratio']:.3f} ({r['ratio_of_minima']:.3f}) | {'yes' if r['met'] else 'no'} | {r['block_density']:.3f} | "
            f"{'-' if r['ratio_to_saved'] is None else format(r['ratio_to_saved'], '.3f')} |"
        )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(
            {
                "target": TARGET,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "command": " ".join(sys.argv),
                "load_avg": os.getloadavg(),
                "results": rows,
            },
            fh,
            indent=2,
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
