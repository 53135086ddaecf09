"""How close each mechanism stays to dense attention: ``spattn bench fidelity``.

For every input kind and every mechanism spec this reports, against dense softmax attention on
the same ``q, k, v [B, H, N, D]``:

* ``density``: fraction of (query, key) pairs the mechanism computes (patterns only);
* ``rel_error``: ``||out - out_dense||_F / ||out_dense||_F``;
* ``topk_recall``: fraction of each query's true top-``topk`` keys (by dense score, among the keys
  it may see) that the selection contains (patterns only);
* ``planted_recall`` (planted inputs): fraction of queries whose planted strong key is selected;
* ``select_s``: wall-clock time of the selection (``pattern.select``).

Input kinds:

``random``   q, k, v i.i.d. standard normal: scores have unit spread, attention is diffuse, no
             selector can do much better than its density.
``planted``  the same plus one planted strong key per query: query i is paired with a key j_i,
             local (i - j_i geometric with mean 32) for half the queries and uniform over the
             visible keys for the other half, and ``k[j_i] += (8 / sqrt(D)) q_i`` so the planted
             logit stands ~8 above the noise; a content-based selector should find j_i.

Approximations that are not pair selections (e.g. ``performer``) get ``rel_error`` only; learned
mechanisms are evaluated at their initialisation (routing centroids untrained, gates random), which
the table says. Everything is fp32 on CPU; the dense reference materialises ``N x N`` scores, so
keep N moderate (default 2048).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .. import registry
from .._checks import int_at_least
from ..approx.base import ApproxAttention, AttentionLayer
from ..functional import attention
from ..nn.attention import build_for_heads
from ..patterns import Pattern
from .timing import timed

__all__ = ["FidelityConfig", "DEFAULT_SPECS", "make_inputs", "run_fidelity", "format_fidelity_table", "plot_fidelity"]

#: three sparsity levels per family at N = 2048 (names not registered are skipped with a note)
DEFAULT_SPECS = (
    "window(size=64)",
    "window(size=128)",
    "window(size=256)",
    "bigbird(block=64, window=1, globals=1, random=1)",
    "bigbird(block=64, window=3, globals=1, random=2)",
    "bigbird(block=64, window=3, globals=2, random=6)",
    "a_shape(sinks=64, local=128)",
    "a_shape(sinks=64, local=256)",
    "a_shape(sinks=128, local=512)",
    "topk(k=16)",
    "topk(k=64)",
    "topk(k=256)",
    "block_topk(k=2, block=64)",
    "block_topk(k=4, block=64)",
    "block_topk(k=8, block=64)",
    "block_mass(threshold=0.5, block=64)",
    "block_mass(threshold=0.8, block=64)",
    "block_mass(threshold=0.95, block=64)",
    "xattention(threshold=0.8, stride=8, block=64)",
    "xattention(threshold=0.9, stride=8, block=64)",
    "xattention(threshold=0.95, stride=8, block=64)",
    "vertical_slash(vertical=64, slash=64)",
    "vertical_slash(vertical=256, slash=256)",
    "vertical_slash(vertical=512, slash=512)",
    "flexprefill(gamma=0.8)",
    "flexprefill(gamma=0.9)",
    "flexprefill(gamma=0.95)",
    "routing(clusters=16)",
    "routing(clusters=8)",
    "routing(clusters=4)",
    "performer(features=64)",
    "performer(features=256)",
    "nystrom(landmarks=64)",
)
INPUT_KINDS = ("random", "planted")


@dataclass
class FidelityConfig:
    n: int = 2048
    batch: int = 1
    heads: int = 4
    dim: int = 64
    causal: bool = True
    inputs: tuple[str, ...] = INPUT_KINDS
    specs: tuple[str, ...] = DEFAULT_SPECS
    topk: int = 16
    seed: int = 0
    #: skip specs whose mechanism name is not registered instead of failing
    skip_unknown: bool = True

    def validate(self) -> None:
        for name in ("n", "batch", "heads", "dim", "topk"):
            int_at_least(f"fidelity: {name}", getattr(self, name))
        if self.topk > self.n:
            raise ValueError(f"fidelity: topk={self.topk} must be <= n={self.n}")
        bad = [kind for kind in self.inputs if kind not in INPUT_KINDS]
        if bad or not self.inputs:
            raise ValueError(f"fidelity: inputs must be a non-empty subset of {INPUT_KINDS}, got {self.inputs}")
        if not self.specs:
            raise ValueError("fidelity: specs must name at least one mechanism")
        for spec in self.specs:
            name, _ = registry.parse_spec(spec)  # syntax errors fail early
            if not self.skip_unknown:
                registry.lookup(name)


def make_inputs(
    kind: str, cfg: FidelityConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``q, k, v [B, H, N, D]`` and, for planted inputs, the planted key of each query ``[B, H, N]``."""
    gen = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.batch, cfg.heads, cfg.n, cfg.dim)
    q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
    if kind == "random":
        return q, k, v, None
    n = cfg.n
    i = torch.arange(n).expand(cfg.batch, cfg.heads, n)
    visible = (i + 1) if cfg.causal else torch.full_like(i, n)
    uniform = (torch.rand(i.shape, generator=gen) * visible).long()
    # geometric offsets (mean ~32) by inversion, from the seeded generator
    offset = (torch.log1p(-torch.rand(i.shape, generator=gen)) / math.log1p(-1 / 32)).long()
    local = (
        (i - offset).clamp(min=0)
        if cfg.causal
        else (i + torch.where(torch.rand(i.shape, generator=gen) < 0.5, -offset, offset)).clamp(0, n - 1)
    )
    planted = torch.where(torch.rand(i.shape, generator=gen) < 0.5, local, uniform)
    k = k.index_put(
        (torch.arange(cfg.batch)[:, None, None], torch.arange(cfg.heads)[None, :, None], planted),
        q * (8.0 / math.sqrt(cfg.dim)),
        accumulate=True,
    )
    return q, k, v, planted


def _dense(q, k, v, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense output and the (masked) scores ``[B, H, N, N]``."""
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        n = q.shape[2]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal), scores


def _build(spec: str, cfg: FidelityConfig):
    """The mechanism of ``spec`` for this configuration; ``ValueError`` if it cannot run in it."""
    mech = build_for_heads(spec, heads=cfg.heads, head_dim=cfg.dim, causal=cfg.causal, max_len=cfg.n)
    if isinstance(mech, ApproxAttention) and cfg.causal and not mech.supports_causal:
        raise ValueError(f"{spec} has no causal form; run the fidelity bench with --non-causal")
    return mech


def _evaluate(spec: str, q, k, v, planted, scores, dense_out, cfg: FidelityConfig) -> dict[str, Any]:
    mech = _build(spec, cfg)  # fresh per input kind: routing's centroids start from these inputs
    if isinstance(mech, torch.nn.Module):
        mech.eval()
    rec: dict[str, Any] = {
        "spec": spec,
        "learned": isinstance(mech, torch.nn.Module) and any(True for _ in mech.parameters()),
    }
    with torch.no_grad():
        if isinstance(mech, Pattern):
            selection, rec["select_s"] = timed(lambda: mech.select(q, k, causal=cfg.causal))
            out = attention(q, k, v, selection)
            mask = selection.to_dense().expand(q.shape[0], q.shape[1], -1, -1)
            allowed = torch.ones(cfg.n, cfg.n, dtype=torch.bool)
            if cfg.causal:
                allowed = allowed.tril()
            rec["density"] = float((mask & allowed).sum() / (allowed.sum() * q.shape[0] * q.shape[1]))
            top = scores.topk(cfg.topk, dim=-1)
            real = torch.isfinite(top.values)  # causal rows near the start have fewer than topk keys
            rec["topk_recall"] = float((mask.gather(-1, top.indices) & real).sum() / real.sum())
            if planted is not None:
                rec["planted_recall"] = float(mask.gather(-1, planted[..., None]).float().mean())
        elif isinstance(mech, ApproxAttention):
            out, rec["forward_s"] = timed(lambda: mech(q, k, v, causal=cfg.causal))
            rec["select_s"] = None
        else:
            kind = "AttentionLayer" if isinstance(mech, AttentionLayer) else type(mech).__name__
            raise ValueError(
                f"fidelity: {spec!r} is an {kind}, which replaces the whole layer; it has no q/k/v to compare"
            )
    rec["rel_error"] = float((out - dense_out).norm() / dense_out.norm())
    return rec


def run_fidelity(
    config: Optional[FidelityConfig] = None, *, log: Callable[[str], None] = lambda s: None
) -> dict[str, Any]:
    """Run every (input kind, spec) case; returns ``{"config", "environment", "records", "skipped", "unsupported"}``.

    With ``skip_unknown`` (the default sweep), unregistered names are listed in ``skipped`` and specs
    that cannot run in this configuration (e.g. a non-causal-only method in a causal run) in
    ``unsupported`` with the reason; otherwise both are errors.
    """
    cfg = config or FidelityConfig()
    cfg.validate()
    known = {m.name for m in registry.mechanisms()}
    specs = [s for s in cfg.specs if registry.parse_spec(s)[0] in known]
    skipped = [s for s in cfg.specs if s not in specs]
    if skipped:
        log(f"skipping unregistered: {', '.join(skipped)}")
    unsupported = {}  # e.g. a non-causal-only mechanism in a causal run of the default sweep
    for spec in list(specs):
        try:
            _build(spec, cfg)
        except ValueError as err:
            if not cfg.skip_unknown:
                raise
            specs.remove(spec)
            unsupported[spec] = str(err)
            log(f"skipping {spec}: {err}")
    records = []
    for kind in cfg.inputs:
        q, k, v, planted = make_inputs(kind, cfg)
        dense_out, scores = _dense(q, k, v, cfg.causal)
        for spec in specs:
            log(f"{kind:8s} {spec}")
            rec = _evaluate(spec, q, k, v, planted, scores, dense_out, cfg)
            rec["input"] = kind
            records.append(rec)
    return {
        "benchmark": "fidelity",
        "config": asdict(cfg),
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "records": records,
        "skipped": skipped,
        "unsupported": unsupported,
    }


def _fmt(x: Optional[float], pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.3g}"


def format_fidelity_table(result: dict[str, Any]) -> str:
    header = ("input", "spec", "density", "rel_error", "top-k recall", "planted recall", "select ms")
    rows = [header]
    for r in result["records"]:
        sel = r.get("select_s")
        rows.append(
            (
                r["input"],
                r["spec"] + (" (untrained)" if r.get("learned") else ""),
                _fmt(r.get("density"), True),
                _fmt(r["rel_error"]),
                _fmt(r.get("topk_recall"), True),
                _fmt(r.get("planted_recall"), True),
                "-" if sel is None else f"{1e3 * sel:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    cfg = result["config"]
    if result.get("skipped"):
        lines.append(f"skipped (not registered): {', '.join(result['skipped'])}")
    for spec, reason in result.get("unsupported", {}).items():
        lines.append(f"skipped {spec}: {reason}")
    lines.append(
        f"N={cfg['n']} B={cfg['batch']} H={cfg['heads']} D={cfg['dim']} causal={cfg['causal']} "
        f"top-k={cfg['topk']} seed={cfg['seed']}"
    )
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)


def plot_fidelity(result: dict[str, Any], path: str) -> None:
    """Relative error vs density per family (one panel per input kind); needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'spattn[plot]'") from err
    kinds = sorted({r["input"] for r in result["records"]})
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        families: dict[str, list[tuple[float, float]]] = {}
        for r in result["records"]:
            if r["input"] == kind and r.get("density") is not None:
                families.setdefault(registry.parse_spec(r["spec"])[0], []).append((r["density"], r["rel_error"]))
        for name, pts in sorted(families.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("density (fraction of causal pairs computed)")
        ax.set_ylabel("relative output error vs dense")
        ax.set_title(f"{kind} inputs")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
