"""``spattn bench plot``: heatmaps of which (query, key) pairs a pattern computes.

Static patterns are drawn from ``pattern.layout(q, k).to_dense()`` on a small ``n``; content-based
patterns (top-k, routing, ...) from ``pattern.select(q, k).to_dense()`` on random queries/keys, or on
the queries/keys of a trained model's first layer when a checkpoint is given (a *learned* layout).
Needs matplotlib (``pip install spattn[plot]``).
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import registry
from .._checks import int_at_least
from ..patterns import Pattern

__all__ = ["pattern_mask", "plot_patterns", "plot_speed", "add_plot_arguments", "run_plot", "DEFAULT_PLOT_PATTERNS"]

DEFAULT_PLOT_PATTERNS = (
    "window(size=8, block=8)",
    "bigbird(block=8)",
    "strided(stride=8, block=8)",
    "fixed(block=16, summary=2)",
    "dilated_window(size=4, dilation=2, block=8)",
    "a_shape(sinks=4, local=8, block=8)",
)


def _require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError(
            "spattn bench plot needs matplotlib: pip install matplotlib (or pip install 'spattn[plot]')"
        ) from None
    return plt


def pattern_mask(
    spec,
    n: int = 64,
    *,
    causal: bool = False,
    head: int = 0,
    q: Optional[Tensor] = None,
    k: Optional[Tensor] = None,
    seed: int = 0,
) -> Tensor:
    """bool ``[n, n]``: True where query ``i`` attends key ``j`` for ``head`` of the pattern ``spec``.

    ``q, k [1, H, n, D]`` are the inputs of content-based patterns (random with ``seed`` if not given).
    """
    int_at_least("pattern_mask: n", n)
    pat = spec if isinstance(spec, Pattern) else registry.build(spec) if isinstance(spec, str) else None
    if not isinstance(pat, Pattern):
        raise ValueError(
            f"pattern_mask: {spec!r} is not a registered pattern (approximations and layers have no layout)"
        )
    if q is None:
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(1, head + 1, n, 16, generator=g)
        k = torch.randn(1, head + 1, n, 16, generator=g)
    sel = pat.select(q, k, causal=causal) if pat.content_based else pat.layout(q, k, causal=causal)
    dense = sel.to_dense()
    dense = dense.reshape(-1, *dense.shape[-3:]) if dense.dim() == 4 else dense.reshape(-1, 1, *dense.shape[-2:])
    return dense[0, min(head, dense.shape[1] - 1)].bool()


def plot_patterns(
    specs: Sequence[str],
    n: int = 64,
    *,
    causal: bool = False,
    head: int = 0,
    out: str = "results/patterns.png",
    cols: int = 3,
) -> str:
    """One heatmap per spec (black = computed pair) in a grid; returns the PNG path."""
    plt = _require_matplotlib()
    if not specs:
        raise ValueError("plot_patterns: give at least one pattern spec")
    masks = [(s, pattern_mask(s, n, causal=causal, head=head)) for s in specs]
    cols = min(cols, len(masks))
    rows = math.ceil(len(masks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (spec, m) in zip(axes.flat, masks):
        ax.imshow(m.numpy(), cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
        ax.set_title(f"{spec}\n{100 * m.float().mean():.1f}% of pairs", fontsize=8)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"attention patterns, N={n}{', causal' if causal else ''}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_speed(result: dict, out: str) -> str:
    """Log-log time vs N from a ``spattn bench speed`` result: forward (left) and forward+backward
    (right); dense SDPA once, then each pattern's spattn path and compiled FlexAttention. -> ``out``."""
    plt = _require_matplotlib()
    panels = (("forward", ("sdpa", "blocksparse", "flex")), ("forward + backward", ("sdpa_bwd", "blocksparse_bwd")))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, (title, names) in zip(axes, panels):
        series: dict[str, list[tuple[int, float]]] = {}
        for rec in result["results"]:
            for name in names:
                t = (rec.get(name) or {}).get("median_s")
                if not t:
                    continue
                label = (
                    ("dense SDPA" + (" fwd+bwd" if name == "sdpa_bwd" else ""))
                    if name.startswith("sdpa")
                    else (f"{rec['pattern']}" + (" [flex]" if name == "flex" else ""))
                )
                if (rec["n"], t) not in series.setdefault(label, []):
                    series[label].append((rec["n"], t))
        for label, pts in sorted(series.items()):
            pts = sorted(set(pts))
            ns, ts = zip(*pts)
            dense = label.startswith("dense")
            ax.plot(
                ns,
                [1e3 * t for t in ts],
                "k--" if dense else "-o",
                label=label,
                linewidth=2 if dense else 1,
                markersize=3,
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("time (ms, median)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if series:
            ax.legend(fontsize=6)
    cfg = result.get("config", {})
    fig.suptitle(
        f"spattn bench speed: B={cfg.get('batch')} H={cfg.get('heads')} D={cfg.get('dim')} "
        f"{cfg.get('dtype')} causal={cfg.get('causal')}",
        fontsize=10,
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def add_plot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--patterns", nargs="+", default=list(DEFAULT_PLOT_PATTERNS), metavar="SPEC")
    p.add_argument("--n", type=int, default=128, help="sequence length of the plotted layout (default 128)")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--head", type=int, default=0, help="which head to draw (per-head patterns such as bigbird)")
    p.add_argument("--out", default="results/patterns.png", metavar="PNG")


def run_plot(args: argparse.Namespace) -> int:
    path = plot_patterns(args.patterns, args.n, causal=args.causal, head=args.head, out=args.out)
    print(f"wrote {path}")
    return 0
