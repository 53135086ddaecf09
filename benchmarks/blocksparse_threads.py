"""Does the compiled block-sparse forward use the second core, and does it hold up on a busy machine?

SmolLM2-135M's attention shape (9 query / 3 kv heads, head dim 64) at ``--n`` tokens, random inputs,
a causal XAttention layout; no gradient, float32 (the compiled loop of
``spattn/csrc/blocksparse_cpu.cpp``). Times, as medians of ``--repeat`` calls: the compiled forward
and dense causal SDPA at 1 and 2 threads, first with nothing else running, then while ``--busy``
processes each spin a core (``python -c "while True: pass"``). Prints the 2-thread gain of each
and the busy / idle ratio at the default thread count.

    python benchmarks/blocksparse_threads.py                 # N=8192, ~2 min idle
    python benchmarks/blocksparse_threads.py --n 4096 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import spattn
from spattn.bench.timing import time_call
from spattn.kernels import blocksparse_cpu


def _median_ms(fn, repeat: int) -> float:
    return time_call(fn, repeat=repeat, memory=False)["median_s"] * 1e3


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


@torch.no_grad()
def run(args) -> dict:
    torch.manual_seed(0)
    q = torch.randn(1, 9, args.n, 64)
    k, v = torch.randn(1, 3, args.n, 64), torch.randn(1, 3, args.n, 64)
    layout = spattn.pattern(args.pattern).layout(q, k, causal=True)
    if not blocksparse_cpu.applies(q, k, v, layout, None):
        raise SystemExit("the compiled block-sparse loop is not available here (spattn doctor says why)")
    kk, vv = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
    calls = {
        "compiled": lambda: blocksparse_cpu.compiled_forward(q, k, v, layout, 0.125),
        "sdpa": lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=True),
    }
    default_threads = torch.get_num_threads()
    result = {
        "n": args.n,
        "pattern": args.pattern,
        "density_of_causal": 2 * layout.density(),
        "load_before": _load(),
        "default_threads": default_threads,
        "times_ms": {},
    }
    for condition in ("idle", "busy"):
        busy = (
            [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
            if condition == "busy"
            else []
        )
        try:
            time.sleep(1.0 if busy else 0.0)
            for threads in sorted({1, default_threads}):
                torch.set_num_threads(threads)
                for name, fn in calls.items():
                    result["times_ms"][f"{name}/{threads}t/{condition}"] = _median_ms(fn, args.repeat)
        finally:
            for proc in busy:
                proc.kill()
                proc.wait()
            torch.set_num_threads(default_threads)
    result["load_after"] = _load()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--pattern", default="xattention(threshold=0.9, stride=16, block=64)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--busy", type=int, default=1, help="spinning processes in the 'busy' condition")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    r = run(args)
    t, d = r["times_ms"], r["default_threads"]
    print(
        f"N={r['n']} {r['pattern']} causal density {r['density_of_causal']:.2f}; load before {r['load_before']}, "
        f"after {r['load_after']}"
    )
    for name in ("compiled", "sdpa"):
        line = "  ".join(f"{key.split('/', 1)[1]} {ms:.0f} ms" for key, ms in t.items() if key.startswith(name + "/"))
        print(f"{name:9s} {line}")
        if d > 1:
            print(
                f"{'':9s} gain from {d} threads: idle {t[f'{name}/1t/idle'] / t[f'{name}/{d}t/idle']:.2f}x, "
                f"busy {t[f'{name}/1t/busy'] / t[f'{name}/{d}t/busy']:.2f}x; busy / idle at {d} threads "
                f"{t[f'{name}/{d}t/busy'] / t[f'{name}/{d}t/idle']:.2f}"
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
