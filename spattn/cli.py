"""The ``spattn`` command.

::

    spattn list                                   every registered mechanism: name, kind, signature, paper
    spattn bench                                  a short default speed benchmark (N = 2048, 4096)
    spattn bench speed [--n 4096 8192] [--patterns "window(size=256)" "bigbird(block=64)"]
                       [--backends sdpa blocksparse flex ...] [--json out.json] [--quick]
    spattn bench fidelity [--n 2048] [--specs "topk(k=64)" ...] [--inputs random planted] [--plot out.png]

Errors (unknown pattern, bad option) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]

SHORT_NS = (2048, 4096)
QUICK_NS = (1024, 2048)
DEFAULT_JSON = "results/speed.json"


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spattn", description="Sparse and efficient attention for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="{list,bench}", parser_class=_Parser)
    sub.add_parser("list", help="list every registered mechanism with its paper")

    bench = sub.add_parser(
        "bench", help="benchmarks (no sub-command: a short default speed run)",
        description="Benchmarks. Without a sub-command: speed at N=2048, 4096 for window(size=256) and "
                    "bigbird(block=64) on every backend (a few minutes on 2 cores); the options are those "
                    "of 'spattn bench speed'.",
    )
    _add_speed_options(bench)
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="{speed,fidelity}", parser_class=_Parser)
    speed = bench_sub.add_parser(
        "speed", help="time dense SDPA, blocksparse (fwd, fwd+bwd) and compiled FlexAttention",
        description="Time dense SDPA, blocksparse forward and forward+backward and compiled FlexAttention "
                    "on each pattern; print a table and write JSON.",
    )
    _add_speed_options(speed)
    fidelity = bench_sub.add_parser(
        "fidelity", help="output error and top-key recall of each mechanism vs dense attention",
        description="Relative output error vs dense, recall of the true top-k keys and of planted keys, density, "
                    "for random and planted-key inputs; prints a table, writes JSON (and a PNG with --plot).",
    )
    _add_fidelity_options(fidelity)
    return parser


def _add_fidelity_options(p: argparse.ArgumentParser) -> None:
    from .bench.fidelity import DEFAULT_SPECS, INPUT_KINDS

    p.add_argument("--n", type=int, default=2048, help="sequence length (default %(default)s)")
    p.add_argument("--specs", nargs="+", metavar="SPEC", default=list(DEFAULT_SPECS),
                   help="mechanism specs, several sparsity levels per family (default: a sweep of every family)")
    p.add_argument("--inputs", nargs="+", choices=INPUT_KINDS, default=list(INPUT_KINDS))
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--topk", type=int, default=16, help="recall of each query's true top-k keys (default %(default)s)")
    p.add_argument("--non-causal", dest="causal", action="store_false", help="bidirectional attention (default causal)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="results/fidelity.json", metavar="PATH")
    p.add_argument("--plot", metavar="PNG", help="also plot error vs density (needs matplotlib)")
    p.add_argument("--quiet", action="store_true")


def _add_speed_options(p: argparse.ArgumentParser) -> None:
    from .bench.speed import BACKEND_GROUPS, DEFAULT_NS, DEFAULT_PATTERNS

    p.add_argument("--n", type=int, nargs="+", metavar="N",
                   help=f"sequence lengths (default {' '.join(map(str, DEFAULT_NS))}; "
                        f"with --quick {' '.join(map(str, QUICK_NS))})")
    p.add_argument("--patterns", nargs="+", metavar="SPEC", default=list(DEFAULT_PATTERNS),
                   help="pattern specs (default: %(default)s)")
    p.add_argument("--backends", nargs="+", metavar="NAME",
                   help=f"what to time (default all): {', '.join(sorted(BACKEND_GROUPS))}")
    p.add_argument("--json", default=DEFAULT_JSON, metavar="PATH", help="where to write results (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="fewer lengths and repeats (1 warmup, 2 timed)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | float64")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--repeat", type=int, help="timed repeats per case (default 3; --quick 2)")
    p.add_argument("--warmup", type=int, help="untimed calls per case (default 1)")
    p.add_argument("--cold-compile", action="store_true",
                   help="disable Inductor's on-disk caches so FlexAttention's compile time is a cold compile")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip peak-memory measurement")
    p.add_argument("--quiet", action="store_true", help="no progress messages")


def _cmd_list() -> int:
    import spattn

    mechs = spattn.mechanisms()
    rows = [(m.name, m.kind, m.signature(), m.paper) for m in mechs]
    header = ("name", "kind", "signature", "paper")
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in range(3)]
    print("  ".join(h.ljust(w) for h, w in zip(header[:3], widths)) + "  " + header[3])
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    print(f"{len(rows)} mechanisms; use a signature as a spec, e.g. spattn.pattern(\"window(size=256)\")")
    return 0


def _cmd_speed(args: argparse.Namespace, default_ns: Optional[Sequence[int]] = None) -> int:
    from .bench.speed import DEFAULT_NS, MEASUREMENTS, SpeedConfig, expand_backends, print_speed_table, run_speed, write_json

    ns = args.n or (QUICK_NS if args.quick else (default_ns or DEFAULT_NS))
    measurements = expand_backends(args.backends) if args.backends else MEASUREMENTS
    cfg = SpeedConfig(
        ns=tuple(ns), patterns=tuple(args.patterns), measurements=measurements, batch=args.batch,
        heads=args.heads, dim=args.dim, dtype=args.dtype, causal=args.causal,
        warmup=1 if args.warmup is None else args.warmup,
        repeat=args.repeat if args.repeat is not None else (2 if args.quick else 3),
        memory=args.memory, cold_compile=args.cold_compile,
    )
    cfg.validate()  # bad specs / values fail before anything runs

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    result = run_speed(cfg, log=log)
    print_speed_table(result)
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


def _cmd_fidelity(args: argparse.Namespace) -> int:
    from .bench.fidelity import DEFAULT_SPECS, FidelityConfig, format_fidelity_table, plot_fidelity, run_fidelity, write_json

    cfg = FidelityConfig(n=args.n, batch=args.batch, heads=args.heads, dim=args.dim, causal=args.causal,
                         inputs=tuple(args.inputs), specs=tuple(args.specs), topk=args.topk, seed=args.seed,
                         skip_unknown=tuple(args.specs) == DEFAULT_SPECS)  # names the user typed must exist
    cfg.validate()
    result = run_fidelity(cfg, log=(lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True)))
    print(format_fidelity_table(result))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot_fidelity(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "list":
            code = _cmd_list()
        elif args.command == "bench":
            if args.bench_command == "speed":
                code = _cmd_speed(args)
            elif args.bench_command == "fidelity":
                code = _cmd_fidelity(args)
            else:
                code = _cmd_speed(args, default_ns=SHORT_NS)
        else:
            parser.print_help()
            code = 0
    except (_UsageError, ValueError, TypeError) as err:
        print(f"spattn: error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("spattn: interrupted", file=sys.stderr)
        code = 130
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
