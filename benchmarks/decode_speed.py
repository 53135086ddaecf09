"""Decode-time attention per generated token: dense SDPA vs Quest / Double Sparsity (issue 5).

One new query per step attends to a KV cache of N tokens, with SmolLM2-135M's attention shape
(9 query heads, 3 kv heads, D=64, fp32). Timed per step, as in a decoding loop with a
:class:`spattn.kvcache.SelectorState` that already summarises the cache (the summaries are
updated incrementally: one appended key per step, included in the timing):

* ``dense``: ``F.scaled_dot_product_attention(..., enable_gqa=True)`` of the query over all N keys,
  what transformers' SDPA attention runs;
* ``dense_grouped``: ``spattn.attention`` dense, which folds the query heads of a kv head into one
  head (K/V read once per kv head; the fastest eager dense decode we know on CPU);
* ``quest(budget)``: page bounds -> top pages -> page-sparse attention (``Quest.plan`` + kernel);
  ``group_pages=True`` keeps one page set per kv head (read once for its query heads);
* ``double_sparsity(budget)``: label-cache scores -> top tokens -> token-sparse attention
  (calibrated on random q/k first; the timing does not depend on which channels were chosen);
  ``group_tokens=True`` keeps one token set per kv head (one label row per kv head, the selected
  rows fetched once per group by the page-sparse kernel's shared path; ``--label-dtype bfloat16``
  stores its labels in 16 bits).

``--layers L`` keeps L independent caches and visits each once per step, as a model's decoding
step does (SmolLM2 has 30 layers): then no layer's cache is still in the CPU's caches when it is
read again, which is the situation inside a model; with the default ``--layers 1`` one 8k cache
(12.6 MB) stays in a 32 MB L3 and dense attention runs from cache. Times are per layer.

This is the attention time alone; a whole decoding step of the model adds the projections and the
MLP (see ``spattn longctx`` for end-to-end decode time and accuracy). Medians of ``--repeat``
steps after a warm-up. Run from the repository root: ``python benchmarks/decode_speed.py``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

import spattn
from spattn.bench.timing import time_call
from spattn.kvcache import SelectorState
from spattn.patterns.decode import DoubleSparsity, Quest


def _step_times(step, repeat: int) -> float:
    """Median time of steps 1..repeat after step 0 (which builds the summaries of the whole cache once)."""
    steps = iter(range(repeat + 1))
    return time_call(lambda: step(next(steps)), warmup=1, repeat=repeat, memory=False)["median_s"]


def run(
    ns,
    budgets,
    repeat: int,
    hq: int = 9,
    hkv: int = 3,
    d: int = 64,
    channels: int = 16,
    label_dtype=None,
    layers: int = 1,
) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for n in ns:
        # one cache per layer: a model's step reads every layer's cache once, so none stays in the CPU's cache
        ks = [torch.randn(1, hkv, n + repeat + 1, d, generator=gen) for _ in range(layers)]
        vs = [torch.randn(1, hkv, n + repeat + 1, d, generator=gen) for _ in range(layers)]
        qs = [torch.randn(1, hq, repeat + 1, d, generator=gen) for _ in range(layers)]

        def cache(i, layer):  # the cache grows by one token per step
            return ks[layer][:, :, : n + i + 1], vs[layer][:, :, : n + i + 1], qs[layer][:, :, i : i + 1]

        def dense(i):
            for layer in range(layers):
                kc, vc, qi = cache(i, layer)
                F.scaled_dot_product_attention(qi, kc, vc, enable_gqa=True)

        def dense_grouped(i):
            for layer in range(layers):
                kc, vc, qi = cache(i, layer)
                spattn.attention(qi, kc, vc)

        row = {
            "n": n,
            "layers": layers,
            "dense_ms": 1e3 * _step_times(dense, repeat) / layers,
            "dense_grouped_ms": 1e3 * _step_times(dense_grouped, repeat) / layers,
        }
        ds = DoubleSparsity(channels=channels, budget=max(budgets))
        ds.calibrate(
            torch.randn(1, hq, 512, d, generator=gen), torch.randn(1, hkv, 512, d, generator=gen)
        )  # every layer
        for budget in budgets:
            for name, selector in (
                (f"quest(budget={budget})", Quest(page=16, budget=budget)),
                (f"quest(budget={budget}, group_pages=True)", Quest(page=16, budget=budget, group_pages=True)),
                (f"double_sparsity(budget={budget})", _with_budget(ds, budget)),
                (
                    f"double_sparsity(budget={budget}, group_tokens=True)",
                    _with_budget(ds, budget, group_tokens=True, label_dtype=label_dtype),
                ),
            ):
                state = SelectorState()

                def sparse(i, selector=selector, state=state):
                    for layer in range(layers):
                        kc, vc, qi = cache(i, layer)
                        sel = selector.select(qi, kc, True, state=state.at(layer))
                        spattn.attention(qi, kc, vc, None if getattr(sel, "every_visible_key", False) else sel)

                ms = 1e3 * _step_times(sparse, repeat) / layers
                row[name] = {
                    "ms": ms,
                    "speedup": row["dense_ms"] / ms,
                    "speedup_vs_grouped": row["dense_grouped_ms"] / ms,
                }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _with_budget(ds: DoubleSparsity, budget: int, group_tokens: bool = False, label_dtype=None) -> DoubleSparsity:
    out = DoubleSparsity(channels=ds.channels, budget=budget, group_tokens=group_tokens, label_dtype=label_dtype)
    out.load_state_dict(ds.state_dict())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--channels", type=int, default=16, help="Double Sparsity label channels r")
    ap.add_argument(
        "--layers",
        type=int,
        default=1,
        help="independent per-layer caches visited in turn each step (SmolLM2: 30); times are per layer",
    )
    ap.add_argument(
        "--label-dtype",
        default=None,
        choices=["bfloat16", "float16"],
        help="label cache precision of the grouped Double Sparsity rows",
    )
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", default="results/decode_speed.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with torch.no_grad():
        rows = run(
            args.n, args.budgets, args.repeat, channels=args.channels, label_dtype=args.label_dtype, layers=args.layers
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump({"threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}, fh, indent=2)
    dense_keys = ("n", "layers", "dense_ms", "dense_grouped_ms")
    print("ms per step (speedup vs dense SDPA / vs grouped dense)")
    print(f"{'N':>6} {'dense':>7} {'grouped':>8} " + " ".join(f"{k:>30}" for k in rows[0] if k not in dense_keys))
    for r in rows:
        cells = [
            f"{r[k]['ms']:.3f} ({r[k]['speedup']:.2f}x / {r[k]['speedup_vs_grouped']:.2f}x)"
            for k in r
            if k not in dense_keys
        ]
        print(f"{r['n']:>6} {r['dense_ms']:>7.3f} {r['dense_grouped_ms']:>8.3f} " + " ".join(f"{c:>30}" for c in cells))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
