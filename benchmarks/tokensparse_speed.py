"""Token-sparse kernel vs dense SDPA: time and peak memory (issue 3, item 2).

B=1, H=4, D=64, float32, non-causal. For each N and k: each query attends to k keys (a random
selection, built outside the timed region), forward and forward+backward of
``tokensparse_attention`` against ``F.scaled_dot_product_attention`` on all N keys. Also times the
Explicit-Sparse top-k *selection* itself (``topk_selections``: chunked dense scores + top-k),
which is what ``spattn.attention(q, k, v, "topk(k=...)")`` adds in front of the kernel, and the
estimation cost of ``block_topk`` / ``block_mass`` (causal layouts) against causal dense SDPA.

Medians of ``--repeat`` calls; peak memory is the extra RSS high-water mark of one more call.
The machine is shared: read ratios measured in the same run, not absolute times.

Run from the repository root: ``python benchmarks/tokensparse_speed.py [--n 4096 8192] [--k 64 128 256]``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

import spattn

from spattn.bench.timing import time_call
from spattn.kernels.tokensparse import tokensparse_attention
from spattn.patterns.topk import topk_selections
from spattn.selection import TokenSelection


def random_selection(batch: int, heads: int, n: int, k: int, gen: torch.Generator) -> TokenSelection:
    """k distinct random keys per query, without an N x N tensor (sampling with rejection of repeats)."""
    idx = torch.randint(0, n, (batch, heads, n, 2 * k), generator=gen)
    idx = torch.sort(idx, dim=-1).values
    dup = torch.zeros_like(idx, dtype=torch.bool)
    dup[..., 1:] = idx[..., 1:] == idx[..., :-1]
    # put duplicates last (key n), keep the first k distinct ones
    idx = torch.sort(torch.where(dup, n, idx), dim=-1).values[..., :k]
    return TokenSelection(torch.where(idx < n, idx, -1), n, n)


def fwd_bwd(fn, q, k, v):
    def run():
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        fn(qq, kk, vv).sum().backward()

    return run


def measure(n: int, ks: list[int], repeat: int, heads: int, dim: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, dim, generator=gen) for _ in range(3))
    dense = lambda a, b, c: F.scaled_dot_product_attention(a, b, c)  # noqa: E731
    sdpa_f = time_call(lambda: dense(q, k, v), repeat=repeat)
    sdpa_fb = time_call(fwd_bwd(dense, q, k, v), repeat=repeat)
    rows = []
    for kk in ks:
        sel = random_selection(1, heads, n, kk, gen)
        sparse = lambda a, b, c, s=sel: tokensparse_attention(a, b, c, s)  # noqa: E731
        ts_f = time_call(lambda: sparse(q, k, v), repeat=repeat)
        ts_fb = time_call(fwd_bwd(sparse, q, k, v), repeat=repeat)
        select = time_call(lambda: topk_selections(q, k, [kk]), repeat=max(1, repeat // 2))
        rows.append(
            {
                "n": n,
                "k": kk,
                "density": kk / n,
                "sdpa_fwd_s": sdpa_f["median_s"],
                "sdpa_fwdbwd_s": sdpa_fb["median_s"],
                "tokensparse_fwd_s": ts_f["median_s"],
                "tokensparse_fwdbwd_s": ts_fb["median_s"],
                "topk_select_s": select["median_s"],
                "sdpa_fwd_peak_mb": (sdpa_f["peak_bytes"] or 0) / 2**20,
                "sdpa_fwdbwd_peak_mb": (sdpa_fb["peak_bytes"] or 0) / 2**20,
                "tokensparse_fwd_peak_mb": (ts_f["peak_bytes"] or 0) / 2**20,
                "tokensparse_fwdbwd_peak_mb": (ts_fb["peak_bytes"] or 0) / 2**20,
                "topk_select_peak_mb": (select["peak_bytes"] or 0) / 2**20,
            }
        )
        print(format_row(rows[-1]), flush=True)
    return rows


HEADER = (
    "   N     k | SDPA fwd  fwd+bwd | tokensparse fwd  fwd+bwd (x SDPA)      | topk select | "
    "peak MB: SDPA f/fb  tokensparse f/fb  select"
)


def format_row(r: dict) -> str:
    ms = lambda s: f"{1e3 * s:7.0f}ms"  # noqa: E731
    return (
        f"{r['n']:5d} {r['k']:5d} | {ms(r['sdpa_fwd_s'])} {ms(r['sdpa_fwdbwd_s'])} | "
        f"{ms(r['tokensparse_fwd_s'])} {ms(r['tokensparse_fwdbwd_s'])} "
        f"({r['tokensparse_fwd_s'] / r['sdpa_fwd_s']:.2f}x / {r['tokensparse_fwdbwd_s'] / r['sdpa_fwdbwd_s']:.2f}x) | "
        f"{ms(r['topk_select_s'])} | {r['sdpa_fwd_peak_mb']:6.0f}/{r['sdpa_fwdbwd_peak_mb']:<6.0f} "
        f"{r['tokensparse_fwd_peak_mb']:6.0f}/{r['tokensparse_fwdbwd_peak_mb']:<6.0f} {r['topk_select_peak_mb']:6.0f}"
    )


def measure_block_selection(n: int, repeat: int, heads: int, dim: int, block: int = 64) -> list[dict]:
    """Estimation cost of block_topk / block_mass (pooled scores + sort + Layout) vs dense SDPA forward."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, heads, n, dim, generator=gen) for _ in range(3))
    sdpa = time_call(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), repeat=repeat, memory=False)
    rows = []
    for spec in (f"block_topk(k=8, block={block})", f"block_mass(threshold=0.9, block={block})"):
        pat = spattn.pattern(spec)
        t = time_call(lambda: pat.layout(q, k, causal=True), repeat=repeat, memory=False)
        # millisecond-scale calls on a shared machine: the minimum is the cost, the median shows the noise
        rows.append(
            {
                "n": n,
                "spec": spec,
                "select_s": t["median_s"],
                "select_min_s": min(t["times_s"]),
                "sdpa_causal_fwd_s": sdpa["median_s"],
                "select_over_sdpa": t["median_s"] / sdpa["median_s"],
            }
        )
        print(
            f"{n:6d} {spec:36s} select median {1e3 * t['median_s']:7.1f}ms (min {1e3 * min(t['times_s']):6.1f}ms)"
            f"  causal SDPA fwd {1e3 * sdpa['median_s']:7.0f}ms  median ratio {rows[-1]['select_over_sdpa']:.3f}",
            flush=True,
        )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="*", default=[4096, 8192])
    p.add_argument("--k", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--block-n",
        type=int,
        nargs="*",
        default=[8192, 16384],
        help="N for the block_topk / block_mass estimation-cost rows (empty: skip)",
    )
    p.add_argument("--out", default="results/tokensparse_speed.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"B=1 H={args.heads} D={args.dim} fp32, non-causal, {args.threads} threads, load {os.getloadavg()}")
    print(HEADER)
    rows = []
    for n in args.n:
        rows += measure(n, args.k, args.repeat, args.heads, args.dim)
    block_rows = []
    for n in args.block_n:
        block_rows += measure_block_selection(n, args.repeat, args.heads, args.dim)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {"config": vars(args), "load_avg_end": os.getloadavg(), "results": rows, "block_selection": block_rows},
            f,
            indent=1,
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
