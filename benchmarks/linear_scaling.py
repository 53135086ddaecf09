"""Time and peak memory of the linear / low-rank mechanisms against sequence length (issue 4).

Forward pass (no autograd), B=1, H=4, D=64, float32, N = 1k .. 16k. For each mechanism the
log-log slope of time (the fastest of ``--repeat`` calls, the statistic least disturbed by other
processes) and of peak memory against N is fitted by least squares and printed:
~1 means linear growth, ~2 quadratic. Dense SDPA (quadratic) and the SQA layer (quadratic with
fewer query heads, against the dense layer it replaces) are measured alongside for reference.
Writes ``results/linear_scaling.json``.

Run from the repository root: ``python benchmarks/linear_scaling.py`` (a few minutes on 2 cores).
Timings on a shared machine are noisy: compare ratios from the same run. ``--threads`` (default 1)
avoids OpenMP thread oversubscription when other processes share the cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

from spattn.bench.timing import time_call
from spattn.nn import Attention
from spattn.nn.attention import build_mechanism

NS = (1024, 2048, 4096, 8192, 16384)
#: (label, spec, causal)
MECHANISMS = (
    ("linear", "linear", False),
    ("linear causal", "linear", True),
    ("performer", "performer(features=256)", False),
    ("performer causal", "performer(features=256)", True),
    ("lightning causal", "lightning", True),
    ("gla causal", "gla", True),
    ("nystrom", "nystrom(landmarks=64)", False),
    ("linformer", "linformer(k=256)", False),
    ("soft", "soft(landmarks=64)", False),
    ("dense sdpa", None, False),
    ("dense sdpa causal", None, True),
)
#: layer-level comparison: (label, attention spec) on x [1, N, heads * head_dim]
LAYERS = (("dense layer", None), ("sqa layer (H_q=2, H_kv=1)", "sqa"), ("xsqa layer (H_q=1)", "sqa(variant=extreme)"))


def loglog_slope(ns, ys) -> float | None:
    pts = [(math.log(n), math.log(y)) for n, y in zip(ns, ys) if y is not None and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    num = sum((x - mx) * (y - my) for x, y in pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return num / den


def run(ns, repeat: int, heads: int, dim: int, log=print) -> dict:
    torch.manual_seed(0)
    rows = []
    max_len = max(ns)
    for label, spec, causal in MECHANISMS:
        mech = (
            None
            if spec is None
            else build_mechanism(spec, heads=heads, kv_heads=heads, head_dim=dim, causal=causal, max_len=max_len).eval()
        )
        rec = {
            "label": label,
            "spec": spec or "dense (torch SDPA)",
            "causal": causal,
            "n": [],
            "median_s": [],
            "min_s": [],
            "peak_bytes": [],
        }
        for n in ns:
            q, k, v = (torch.randn(1, heads, n, dim) for _ in range(3))

            def call():
                with torch.no_grad():
                    if mech is None:
                        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                    return mech(q, k, v, causal=causal)

            t = time_call(call, warmup=1, repeat=repeat, memory=True)
            rec["n"].append(n)
            rec["median_s"].append(t["median_s"])
            rec["min_s"].append(min(t["times_s"]))
            rec["peak_bytes"].append(t["peak_bytes"])
            mb = "n/a" if t["peak_bytes"] is None else f"{t['peak_bytes'] / 2**20:.0f} MiB"
            log(
                f"{label:<26} N={n:>6} min {min(t['times_s']) * 1e3:9.1f} ms  median {t['median_s'] * 1e3:9.1f} ms"
                f"  peak {mb}"
            )
        rec["time_exponent"] = loglog_slope(rec["n"], rec["min_s"])
        rec["memory_exponent"] = loglog_slope(rec["n"], rec["peak_bytes"])
        rows.append(rec)
    for label, spec in LAYERS:
        layer = Attention(heads * dim, heads, attention=spec).eval()
        rec = {
            "label": label,
            "spec": spec or "dense",
            "causal": False,
            "n": [],
            "median_s": [],
            "min_s": [],
            "peak_bytes": [],
        }
        for n in ns:
            x = torch.randn(1, n, heads * dim)

            def call():
                with torch.no_grad():
                    return layer(x)

            t = time_call(call, warmup=1, repeat=repeat, memory=True)
            rec["n"].append(n)
            rec["median_s"].append(t["median_s"])
            rec["min_s"].append(min(t["times_s"]))
            rec["peak_bytes"].append(t["peak_bytes"])
            log(f"{label:<26} N={n:>6} min {min(t['times_s']) * 1e3:9.1f} ms  median {t['median_s'] * 1e3:9.1f} ms")
        rec["time_exponent"] = loglog_slope(rec["n"], rec["min_s"])
        rec["memory_exponent"] = loglog_slope(rec["n"], rec["peak_bytes"])
        rows.append(rec)
    return {
        "config": {
            "batch": 1,
            "heads": heads,
            "head_dim": dim,
            "dtype": "float32",
            "ns": list(ns),
            "repeat": repeat,
            "pass": "forward, no autograd",
            "time_statistic": "min over repeats (median also recorded)",
        },
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "load_average": os.getloadavg(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "results": rows,
    }


def print_table(result: dict) -> None:
    ns = result["config"]["ns"]
    head = f"{'mechanism':<26}" + "".join(f"{n:>10}" for n in ns) + f"{'time exp':>10}{'mem exp':>9}{'MiB@max':>9}"
    print("\nforward time in ms (fastest of the repeats); exponents = log-log slope vs N")
    print(head)
    for r in result["results"]:
        te = "-" if r["time_exponent"] is None else f"{r['time_exponent']:.2f}"
        me = "-" if r["memory_exponent"] is None else f"{r['memory_exponent']:.2f}"
        mem = "-" if r["peak_bytes"][-1] is None else f"{r['peak_bytes'][-1] / 2**20:.0f}"
        print(f"{r['label']:<26}" + "".join(f"{t * 1e3:10.1f}" for t in r["min_s"]) + f"{te:>10}{me:>9}{mem:>9}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=list(NS))
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--out", default=os.path.join("results", "linear_scaling.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(tuple(args.n), args.repeat, args.heads, args.dim, log=lambda m: print(m, file=sys.stderr, flush=True))
    print_table(result)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
