"""Speed and memory of sparse attention against dense SDPA: ``spattn bench speed``.

For each sequence length N and each pattern spec this times, on the same random q, k, v
(``B x H x N x D``, self-attention):

========================  ====================================================================
``sdpa``                  dense ``F.scaled_dot_product_attention`` forward (once per N)
``sdpa_bwd``              the same, forward + backward (once per N)
``sdpa_mask``             dense SDPA with the layout materialised as an N x N bool mask
                          (the memory comparison; mask construction not timed)
``blocksparse``           ``spattn.kernels.blocksparse`` forward
``blocksparse_bwd``       the same, forward + backward
``flex``                  compiled FlexAttention forward (``spattn.kernels.flex``); the first
                          call's extra time is reported as ``compile_s`` (a warm
                          Inductor disk cache makes it small: ``cold_compile``) and the
                          ``Layout.to_block_mask()`` time (once per layout, cached on
                          it) as ``block_mask_s``
========================  ====================================================================

**Timing** (:func:`spattn.bench.timing.time_call`, the one timing function of the project): first a warm-up that builds
or loads the compiled CPU kernels and starts torch's thread pool; per case ``warmup`` untimed calls,
then at least ``repeat`` wall-clock timings (``time.perf_counter``), continued up to ``max_repeat``
(within ``budget_s``) until the interquartile range is within ``rel_tol`` of the median; the median
is reported with its spread and whether it settled. ``torch.set_num_threads`` is left alone; the
thread count is recorded.

**Plausibility**: :func:`flag_unreliable` marks results no one should read as spattn's speed, with
the reason: unsettled timings, a sparse forward slower than dense SDPA at density <= 0.5 (or faster
than half its ideal, a disturbed dense timing), forward+backward faster than the forward, negative
time exponents over N, and the 1-minute load average before / after each case above the core count.
The printed table explains every column in a legend and lists the reasons under it.
Forward timings run under ``torch.no_grad()``; forward + backward ones call ``out.backward(g)``
with a fixed random ``g``.

**Peak memory** (Linux, :class:`spattn.bench.timing.PeakMemory`): before each timed call, free heap pages are returned to the OS
(``malloc_trim``) and the kernel's resident-set high-water mark is reset (``echo 5 >
/proc/self/clear_refs``); the case's peak is ``VmHWM - VmRSS`` read around the call, i.e. the
extra resident memory the call needed on top of its inputs. This is one extra untimed call after
the timed ones (re-faulting trimmed pages would slow the timed calls by up to ~25%). For
``sdpa_mask`` the N x N bool mask is built before the call, so its bytes are added. Where
``/proc/self/clear_refs`` cannot be written (macOS, some containers), memory is reported as null.

Results: a dict (see :func:`run_speed`) written as JSON, and a plain or ``rich`` table.
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from .._checks import int_at_least
from .timing import PeakMemory, memory_probe, time_call, timed

__all__ = [
    "SpeedConfig",
    "run_speed",
    "format_speed_table",
    "time_call",
    "PeakMemory",
    "MEASUREMENTS",
    "DEFAULT_NS",
    "DEFAULT_PATTERNS",
    "print_speed_table",
    "write_json",
    "expand_backends",
    "summarize",
    "fit_exponents",
    "flag_unreliable",
    "unreliable_reasons",
    "dense_reasons",
    "legend",
    "TABLE_COLUMNS",
]

DEFAULT_NS = (1024, 2048, 4096, 8192, 16384)
DEFAULT_PATTERNS = ("window(size=256)", "bigbird(block=64)")
#: every measurement name, in table order ("blocksparse" is the mechanism's own spattn path: the
#: blocksparse kernel for Layouts, the token-sparse / cluster kernels for per-token selections,
#: the mechanism's forward for approximations; see the record's "kernel")
MEASUREMENTS = ("sdpa", "sdpa_bwd", "sdpa_mask", "select", "blocksparse", "blocksparse_bwd", "flex")
#: short names accepted by ``--backends``, expanded to measurements
BACKEND_GROUPS = {
    "sdpa": ("sdpa", "sdpa_bwd"),
    "dense": ("sdpa", "sdpa_bwd"),
    "sdpa_mask": ("sdpa_mask",),
    "blocksparse": ("blocksparse", "blocksparse_bwd"),
    "flex": ("flex",),
    "spattn": ("blocksparse", "blocksparse_bwd"),
}
for _m in MEASUREMENTS:
    BACKEND_GROUPS.setdefault(_m, (_m,))

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


def expand_backends(names: Sequence[str]) -> tuple[str, ...]:
    """``["sdpa", "flex"]`` -> the measurements they stand for, in table order."""
    chosen = set()
    for name in names:
        if name not in BACKEND_GROUPS:
            raise ValueError(f"unknown backend {name!r}; valid: {', '.join(sorted(BACKEND_GROUPS))}")
        chosen.update(BACKEND_GROUPS[name])
    return tuple(m for m in MEASUREMENTS if m in chosen)


# --------------------------------------------------------------------------------- the benchmark
@dataclass
class SpeedConfig:
    """What ``run_speed`` measures. ``measurements`` is a subset of :data:`MEASUREMENTS`."""

    ns: Sequence[int] = DEFAULT_NS
    patterns: Sequence[str] = DEFAULT_PATTERNS
    measurements: Sequence[str] = MEASUREMENTS
    batch: int = 1
    heads: int = 4
    dim: int = 64
    dtype: str = "float32"
    causal: bool = False
    warmup: int = 1
    repeat: int = 3
    #: keep timing (up to this many calls, within ``budget_s`` per case) until the median is stable
    max_repeat: int = 8
    rel_tol: float = 0.05
    budget_s: float = 10.0
    memory: bool = True
    seed: int = 0
    #: compile FlexAttention with Inductor's on-disk caches off, so ``compile_s`` is a cold compile
    cold_compile: bool = False

    def validate(self) -> None:
        for n in self.ns:
            int_at_least("ns: every sequence length", n)
        for name in ("batch", "heads", "dim", "repeat"):
            int_at_least(name, getattr(self, name))
        int_at_least("warmup", self.warmup, 0)
        int_at_least("max_repeat", self.max_repeat, self.repeat, minimum_name="repeat")
        if not 0 < self.rel_tol < 1 or not self.budget_s > 0:
            raise ValueError(f"need 0 < rel_tol < 1 and budget_s > 0, got {self.rel_tol}, {self.budget_s}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        bad = [m for m in self.measurements if m not in MEASUREMENTS]
        if bad:
            raise ValueError(f"unknown measurement(s) {', '.join(bad)}; valid: {', '.join(MEASUREMENTS)}")
        if not self.patterns:
            raise ValueError("give at least one pattern spec")
        for spec in self.patterns:  # unknown names / parameters fail here, before anything runs
            _build(spec, self, max(self.ns))  # (at the longest N: a length-bound method such as linformer fits)


def _build(spec: str, cfg: "SpeedConfig", n: int):
    """The mechanism of ``spec`` for self-attention of length ``n`` (eval mode)."""
    from ..approx.base import AttentionLayer
    from ..nn.attention import build_for_heads

    mech = build_for_heads(spec, heads=cfg.heads, head_dim=cfg.dim, causal=cfg.causal, max_len=n)
    if isinstance(mech, AttentionLayer):
        raise ValueError(f"{spec!r} replaces the whole layer (x -> x); speed times q/k/v attention mechanisms only")
    if isinstance(mech, torch.nn.Module):
        mech.eval()
    return mech


def _environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # other processes competing for the cores distort timings: recorded at start and end
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _safe(fn: Callable[[], dict], log: Callable[[str], None], what: str) -> dict:
    try:
        return fn()
    except Exception as err:  # a failing backend is a result, not the end of the benchmark
        msg = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        log(f"  {what}: failed ({msg})")
        return {"error": msg}


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _get(rec: dict, key: str, field_: str = "median_s") -> Optional[float]:
    r = rec.get(key)
    if not isinstance(r, dict):
        return None
    return r.get(field_)


def summarize(rec: dict) -> dict[str, Optional[float]]:
    """Derived ratios of one (N, pattern) record."""
    d = rec.get("density")
    sdpa, sdpa_bwd = _get(rec, "sdpa"), _get(rec, "sdpa_bwd")
    bs, bs_bwd, flex = _get(rec, "blocksparse"), _get(rec, "blocksparse_bwd"), _get(rec, "flex")
    ideal = None if d is None or sdpa is None else d * sdpa
    ideal_bwd = None if d is None or sdpa_bwd is None else d * sdpa_bwd
    return {
        "select_over_sdpa": _ratio(_get(rec, "select"), sdpa),
        "ideal_s": ideal,
        "ideal_bwd_s": ideal_bwd,
        "blocksparse_over_flex": _ratio(bs, flex),
        "blocksparse_over_ideal": _ratio(bs, ideal),
        "flex_over_ideal": _ratio(flex, ideal),
        "bwd_over_fwd": _ratio(bs_bwd, bs),
        "bwd_over_ideal_bwd": _ratio(bs_bwd, ideal_bwd),
        "sdpa_bwd_over_fwd": _ratio(sdpa_bwd, sdpa),
        "mem_blocksparse_over_sdpa_mask": _ratio(
            _get(rec, "blocksparse", "peak_bytes"), _get(rec, "sdpa_mask", "peak_bytes")
        ),
        "mem_blocksparse_bwd_over_sdpa_mask": _ratio(
            _get(rec, "blocksparse_bwd", "peak_bytes"), _get(rec, "sdpa_mask", "peak_bytes")
        ),
    }


def run_speed(config: Optional[SpeedConfig] = None, *, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run the benchmark; returns ``{"config", "environment", "memory_method", "results"}``.

    ``results`` is a list of records, one per (N, pattern): ``n``, ``pattern``, ``density``,
    ``block_density``, ``layout_s``, one dict per measurement (``median_s``, ``times_s``,
    ``first_s``, ``peak_bytes`` or ``error``; flex adds ``compile_s`` and ``block_mask_s``) and
    ``summary`` (:func:`summarize`).
    """
    import torch.nn.functional as F

    from ..functional import backend_for, backends_for, kernel_for
    from ..patterns import Pattern

    cfg = config or SpeedConfig()
    cfg.validate()
    dtype = _DTYPES[cfg.dtype]
    want = set(cfg.measurements)
    peak = memory_probe() if cfg.memory else None
    timing = dict(
        warmup=cfg.warmup,
        repeat=cfg.repeat,
        memory=cfg.memory,
        max_repeat=cfg.max_repeat,
        rel_tol=cfg.rel_tol,
        budget_s=cfg.budget_s,
    )
    out: dict[str, Any] = {
        "benchmark": "speed",
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "environment": _environment(),
        "memory_method": (
            "peak RSS above the pre-call RSS (VmHWM reset via /proc/self/clear_refs, malloc_trim first); "
            "sdpa_mask adds the N x N bool mask"
            if peak is not None and peak.available
            else "unavailable"
        ),
        "results": [],
    }
    _warm_up(log)
    for n in cfg.ns:
        gen = torch.Generator().manual_seed(cfg.seed + n)
        shape = (cfg.batch, cfg.heads, n, cfg.dim)
        q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype) for _ in range(3))
        grad = torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
        dense: dict[str, Any] = {}

        def fwd_bwd(call):
            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

            def run():
                qg.grad = kg.grad = vg.grad = None
                call(qg, kg, vg).backward(grad)

            return run

        def sdpa_call(a, b, c):
            return F.scaled_dot_product_attention(a, b, c, is_causal=cfg.causal)

        if "sdpa" in want:
            log(f"N={n}: dense SDPA forward")
            with torch.no_grad():
                dense["sdpa"] = _safe(lambda: time_call(lambda: sdpa_call(q, k, v), **timing), log, "sdpa")
        if "sdpa_bwd" in want:
            log(f"N={n}: dense SDPA forward+backward")
            dense["sdpa_bwd"] = _safe(lambda: time_call(fwd_bwd(sdpa_call), **timing), log, "sdpa_bwd")

        for spec in cfg.patterns:
            rec: dict[str, Any] = {"n": n, "pattern": spec, **dense, "load_before": _load1()}
            mech = _build(spec, cfg, n)
            if isinstance(mech, Pattern):
                layout, rec["layout_s"] = timed(lambda: mech.select(q, k, causal=cfg.causal))
                # block Layouts run on the block-sparse kernel (tiles are its cost); other kinds on their own
                on_blocks = backend_for(layout, "blocksparse") == "blocksparse"
                kernel = kernel_for(layout, "blocksparse" if on_blocks else "auto")
                rec["kernel"] = kernel.name
                rec["density"] = layout.density()
                rec["block_density"] = layout.block_density() if on_blocks else None
                log(f"N={n} {spec}: density {rec['density']:.4f}")
            else:  # an approximation: no pairs, no mask, no flex
                layout, rec["kernel"], rec["density"], rec["block_density"] = None, "approximation", None, None

            if "select" in want and isinstance(mech, Pattern) and mech.content_based:
                log(f"N={n} {spec}: selection (estimation) time")
                with torch.no_grad():
                    rec["select"] = _safe(
                        lambda: time_call(lambda: mech.select(q, k, causal=cfg.causal), **{**timing, "memory": False}),
                        log,
                        "select",
                    )

            if "sdpa_mask" in want and layout is not None:

                def masked():
                    mask = layout.to_dense()
                    with torch.no_grad():
                        res = time_call(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), **timing)
                    if res["peak_bytes"] is not None:
                        res["peak_bytes"] += mask.numel() * mask.element_size()
                    res["mask_bytes"] = mask.numel() * mask.element_size()
                    return res

                log(f"N={n} {spec}: dense SDPA with materialised mask")
                rec["sdpa_mask"] = _safe(masked, log, "sdpa_mask")
                gc.collect()

            if layout is None:

                def bs_call(a, b, c, mech=mech):
                    return mech(a, b, c, causal=cfg.causal)
            else:

                def bs_call(a, b, c, layout=layout, run=kernel.run):
                    return run(a, b, c, layout)

            if "blocksparse" in want:
                log(f"N={n} {spec}: {rec['kernel']} forward")

                def bs_fwd():
                    with torch.no_grad():
                        return time_call(lambda: bs_call(q, k, v), **timing)

                rec["blocksparse"] = _safe(bs_fwd, log, "blocksparse")
            if "blocksparse_bwd" in want:
                log(f"N={n} {spec}: {rec['kernel']} forward+backward")
                rec["blocksparse_bwd"] = _safe(lambda: time_call(fwd_bwd(bs_call), **timing), log, "blocksparse_bwd")
            if "flex" in want and layout is not None and "flex" in backends_for(layout):
                log(f"N={n} {spec}: compiled FlexAttention forward (first call compiles)")
                rec["flex"] = _safe(lambda: _time_flex(q, k, v, layout, cfg), log, "flex")
            rec["load_after"] = _load1()
            rec["summary"] = summarize(rec)
            out["results"].append(rec)
            layout = None  # free it before the next case
            gc.collect()
    if hasattr(os, "getloadavg"):
        out["environment"]["load_average_end"] = list(os.getloadavg())
    flag_unreliable(out)
    return out


def _load1() -> Optional[float]:
    """The 1-minute load average (processes wanting a core), or None where unknown."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _warm_up(log: Callable[[str], None]) -> None:
    """Before any timing: build (or load) the compiled CPU loops and start torch's thread pool, so no
    timed call pays for a build or a first-call setup."""
    import torch.nn.functional as F

    from .. import _compiled

    log("warming up: loading the compiled CPU kernels (built once, about a minute, if not cached) ...")

    def warm():
        ops = _compiled.ops()
        x = torch.randn(1, 2, 256, 32)
        F.scaled_dot_product_attention(x, x, x)
        return ops

    ops, seconds = timed(warm)
    log(
        f"warm-up done in {seconds:.1f} s"
        + ("" if ops is not None else f" (compiled kernels unavailable: {_compiled.build_error()}; eager paths timed)")
    )


#: a sparse path slower than dense SDPA at this density or below is implausible (the kernels' whole point)
LOW_DENSITY = 0.5


def _unstable(rec: dict, keys) -> list[str]:
    out = []
    for key, label in keys:
        r = rec.get(key)
        if isinstance(r, dict) and r.get("stable") is False:
            out.append(
                f"{label} timings unstable (interquartile range {r['spread']:.0%} of the median "
                f"after {len(r['times_s'])} runs)"
            )
    return out


def dense_reasons(rec: dict) -> list[str]:
    """Why the dense SDPA baseline of one N (shared by that N's records) is implausible."""
    reasons = _unstable(rec, (("sdpa", "dense forward"), ("sdpa_bwd", "dense forward+backward")))
    f, fb = _get(rec, "sdpa"), _get(rec, "sdpa_bwd")
    if f and fb and fb < f:
        reasons.append(f"dense SDPA forward+backward {_ms(fb)} ms faster than its forward alone {_ms(f)} ms")
    return reasons


def unreliable_reasons(rec: dict, cpus: Optional[int] = None) -> list[str]:
    """Why one (N, pattern) record should not be read as the library's speed (empty: plausible).

    Flags: unstable timings of the mechanism, a sparse forward slower than dense SDPA at low density
    (or faster than half its ideal, which points at a disturbed dense timing), forward+backward
    faster than the forward alone, and a machine load beyond the cores before or after the case.
    The dense baseline's own flags are :func:`dense_reasons`.
    """
    reasons = _unstable(
        rec,
        (
            ("blocksparse", "forward"),
            ("blocksparse_bwd", "forward+backward"),
            ("select", "selection"),
            ("flex", "flex"),
        ),
    )
    d, sdpa, bs = rec.get("density"), _get(rec, "sdpa"), _get(rec, "blocksparse")
    if rec.get("kernel") != "approximation" and d is not None and sdpa and bs:
        if d <= LOW_DENSITY and bs > sdpa:
            reasons.append(f"sparse forward {_ms(bs)} ms slower than dense SDPA {_ms(sdpa)} ms at density {d:.2f}")
        elif bs < 0.5 * d * sdpa:
            reasons.append(
                f"sparse forward {_ms(bs)} ms under half its ideal {_ms(d * sdpa)} ms (density x dense): "
                "the dense timing is suspect"
            )
    f, fb = _get(rec, "blocksparse"), _get(rec, "blocksparse_bwd")
    if f and fb and fb < f:
        reasons.append(f"forward+backward {_ms(fb)} ms faster than the forward alone {_ms(f)} ms")
    if dense_reasons(rec):
        reasons.append("the dense baseline at this N is unreliable (below)")
    cpus = cpus or os.cpu_count() or 1
    loads = [x for x in (rec.get("load_before"), rec.get("load_after")) if x is not None]
    if loads and max(loads) > cpus + 0.5:
        reasons.append(f"machine busy: load {loads[0]:.1f} -> {loads[-1]:.1f} on {cpus} CPUs")
    return reasons


def flag_unreliable(result: dict[str, Any]) -> list[str]:
    """Add ``unreliable`` (reasons) to every record of ``result`` and the run-level reasons (the dense
    baseline per N, negative time exponents) to ``result["unreliable"]``; returns the run-level reasons."""
    cpus = result.get("environment", {}).get("cpus")
    run_level, seen_n = [], set()
    for rec in result["results"]:
        rec["unreliable"] = unreliable_reasons(rec, cpus)
        if rec["n"] not in seen_n:
            seen_n.add(rec["n"])
            run_level += [f"N={rec['n']} dense SDPA: {r}" for r in dense_reasons(rec)]
    for name, x in fit_exponents(result).items():
        if x < 0:
            run_level.append(f"{name}: forward time ∝ N^{x:.2f}, i.e. it falls as N grows")
            for rec in result["results"]:
                if rec["pattern"] == name:
                    rec["unreliable"].append(f"negative time exponent {x:.2f} over N")
    loads = [x for r in result["results"] for x in (r.get("load_before"), r.get("load_after")) if x is not None]
    if loads and max(loads) > (cpus or os.cpu_count() or 1) + 0.5:
        run_level.append(
            f"the machine was busy (1-minute load {min(loads):.1f}-{max(loads):.1f} on {cpus} CPUs): "
            "other processes competed for the cores, so times and ratios may be distorted"
        )
    result["unreliable"] = run_level
    return run_level


def _time_flex(q, k, v, layout, cfg: SpeedConfig) -> dict[str, Any]:
    from ..kernels.flex import _layout_block_mask, _unavailable_reason, flex_attention

    reason = _unavailable_reason(q.device)
    if reason is not None:
        raise RuntimeError(reason)
    # Layout.to_block_mask(), kept on the layout for later calls
    block_mask_s = timed(lambda: _layout_block_mask(layout, q.device))[1]

    def first_call():
        if cfg.cold_compile:
            with torch.compiler.config.patch(force_disable_caches=True):
                flex_attention(q, k, v, layout)
        else:
            flex_attention(q, k, v, layout)  # compiles, or loads Inductor's on-disk cache

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = timed(first_call)[1]
        res = time_call(
            lambda: flex_attention(q, k, v, layout),
            warmup=max(cfg.warmup - 1, 0),
            repeat=cfg.repeat,
            memory=cfg.memory,
            max_repeat=cfg.max_repeat,
            rel_tol=cfg.rel_tol,
            budget_s=cfg.budget_s,
        )
    res["first_s"] = first
    res["compile_s"] = max(0.0, first - res["median_s"])
    res["compile_cold"] = cfg.cold_compile
    res["block_mask_s"] = block_mask_s
    return res


# --------------------------------------------------------------------------------- output
def _ms(x: Optional[float]) -> str:
    return "-" if x is None else (f"{x * 1e3:.0f}" if x >= 1.0 else f"{x * 1e3:.1f}")


def _x(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"


def _mb(x: Optional[float]) -> str:
    return "-" if x is None else f"{x / 2**20:.0f}"


#: (header, key, legend): every printed column is explained under the table
TABLE_COLUMNS = (
    ("N", "n", "sequence length (queries = keys)"),
    (
        "pattern",
        "pattern",
        "the mechanism's spec; [tokensparse] / [clustered]: computed by that kernel instead of "
        "blocksparse; [approximation]: no pairs, the mechanism's own forward",
    ),
    ("density", "density", "fraction of (query, key) pairs computed"),
    ("dense ms", "sdpa", "dense F.scaled_dot_product_attention forward (the baseline), milliseconds"),
    ("ideal ms", "ideal", "density x dense ms: the time if cost followed the computed pairs exactly"),
    ("select ms", "select", "time of the content-based selection (estimation) alone"),
    ("select/dense", "sel/sdpa", "select ms / dense ms"),
    ("sparse ms", "sparse", "spattn forward on the selected pairs (blocksparse, tokensparse or clustered kernel)"),
    ("approx ms", "approx", "the approximation's forward ([approximation] rows)"),
    ("flex ms", "flex", "compiled FlexAttention forward on the same layout"),
    ("sparse/flex", "bs/flex", "sparse ms / flex ms"),
    ("sparse/ideal", "bs/ideal", "sparse ms / ideal ms (1.0 = cost follows the pairs exactly)"),
    ("dense f+b ms", "sdpa_bwd", "dense SDPA forward + backward"),
    ("sparse f+b ms", "sparse_bwd", "spattn forward + backward on the selected pairs"),
    ("approx f+b ms", "approx_bwd", "the approximation's forward + backward"),
    ("f+b/f", "f+b/f", "spattn forward+backward / its forward (dense SDPA: about 3-4)"),
    ("f+b/ideal", "f+b/ideal", "sparse f+b ms / (density x dense f+b ms)"),
    ("compile s", "compile", "FlexAttention's first-call compile time"),
    ("blockmask ms", "blockmask", "building FlexAttention's BlockMask from the layout (once per layout)"),
    ("mask MB", "mask_mb", "peak extra memory of dense SDPA with the layout as an N x N bool mask (mask included)"),
    ("fwd MB", "bs_mb", "peak extra memory of the spattn forward (sparse or approximation)"),
    ("fwd/mask mem", "memratio", "fwd MB / mask MB"),
    ("flag", "flag", "! = unreliable result: the reasons are listed under the table"),
)


def _row(rec: dict) -> list[str]:
    s = rec.get("summary") or summarize(rec)

    def t(key):
        r = rec.get(key)
        if isinstance(r, dict) and "error" in r:
            return "err"
        return _ms(_get(rec, key))

    flex = rec.get("flex") if isinstance(rec.get("flex"), dict) else {}
    approx = rec.get("kernel") == "approximation"
    cells = {
        "n": str(rec["n"]),
        "density": "-" if rec.get("density") is None else f"{rec['density']:.3f}",
        "pattern": rec["pattern"]
        + ("" if rec.get("kernel", "blocksparse") == "blocksparse" else f" [{rec['kernel']}]"),
        "select": t("select"),
        "sel/sdpa": _x(s.get("select_over_sdpa")),
        "sdpa": t("sdpa"),
        "ideal": _ms(s["ideal_s"]),
        "sparse": "-" if approx else t("blocksparse"),
        "approx": t("blocksparse") if approx else "-",
        "flex": t("flex"),
        "bs/flex": _x(s["blocksparse_over_flex"]),
        "bs/ideal": _x(s["blocksparse_over_ideal"]),
        "sdpa_bwd": t("sdpa_bwd"),
        "sparse_bwd": "-" if approx else t("blocksparse_bwd"),
        "approx_bwd": t("blocksparse_bwd") if approx else "-",
        "f+b/f": _x(s["bwd_over_fwd"]),
        "f+b/ideal": _x(s["bwd_over_ideal_bwd"]),
        "compile": "-" if flex.get("compile_s") is None else f"{flex['compile_s']:.1f}",
        "blockmask": _ms(flex.get("block_mask_s")),
        "mask_mb": _mb(_get(rec, "sdpa_mask", "peak_bytes")),
        "bs_mb": _mb(_get(rec, "blocksparse", "peak_bytes")),
        "memratio": _x(s["mem_blocksparse_over_sdpa_mask"]),
        "flag": "!" if rec.get("unreliable") else "-",
    }
    return [cells[key] for _, key, _ in TABLE_COLUMNS]


def _kept_columns(rows: list[list[str]]) -> list[int]:
    """N, pattern, then every column with data."""
    return [i for i in range(len(TABLE_COLUMNS)) if i < 2 or any(r[i] != "-" for r in rows)]


def legend(result: dict[str, Any], columns: Optional[Sequence[int]] = None) -> list[str]:
    """One line per printed column, then the reasons for every flagged result."""
    if columns is None:
        columns = _kept_columns([_row(r) for r in result["results"]])
    lines = ["columns:"] + [f"  {TABLE_COLUMNS[i][0]:<14} {TABLE_COLUMNS[i][2]}" for i in columns]
    flagged = [r for r in result["results"] if r.get("unreliable")]
    if flagged or result.get("unreliable"):
        lines.append("UNRELIABLE results (do not read them as spattn's speed; re-run on an idle machine):")
        for r in flagged:
            lines.append(f"  N={r['n']} {r['pattern']}: " + "; ".join(r["unreliable"]))
        lines += [f"  {reason}" for reason in result.get("unreliable", [])]
    return lines


def fit_exponents(result: dict[str, Any], measurement: str = "blocksparse") -> dict[str, float]:
    """Least-squares slope of log(time) vs log(N) per pattern (and for dense SDPA): time ∝ N^slope.

    Only patterns timed at two or more lengths get a slope; linear-time mechanisms should be ~1,
    dense attention ~2 (less at small N, where per-call overhead dominates).
    """
    series: dict[str, list[tuple[float, float]]] = {}
    for rec in result["results"]:
        for key, name in ((measurement, rec["pattern"]), ("sdpa", "dense SDPA")):
            t = _get(rec, key)
            if t and t > 0 and (rec["n"], t) not in series.get(name, []):
                series.setdefault(name, []).append((rec["n"], t))
    slopes = {}
    for name, pts in series.items():
        ns = sorted({n for n, _ in pts})
        if len(ns) < 2:
            continue
        xs = [math.log(n) for n, _ in pts]
        ys = [math.log(t) for _, t in pts]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slopes[name] = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slopes


def _load(env: dict) -> str:
    start, end = env.get("load_average_start"), env.get("load_average_end")
    if not start:
        return ""
    return f" (load avg {start[0]:.1f}" + (f" -> {end[0]:.1f})" if end else ")")


def _footer(result: dict[str, Any]) -> str:
    env, cfg = result.get("environment", {}), result.get("config", {})
    return (
        f"B={cfg.get('batch')} H={cfg.get('heads')} D={cfg.get('dim')} {cfg.get('dtype')} "
        f"causal={cfg.get('causal')}; torch {env.get('torch')}, {env.get('threads')} threads{_load(env)}, "
        f"median of {cfg.get('repeat')}-{cfg.get('max_repeat', cfg.get('repeat'))} runs (until the interquartile "
        f"range is within {cfg.get('rel_tol', 0.05):.0%} of the median) after {cfg.get('warmup')} warmup; "
        f"memory: {result.get('memory_method')}"
    )


def _exponent_line(result: dict[str, Any]) -> Optional[str]:
    slopes = fit_exponents(result) if result["results"] else {}
    if not slopes:
        return None
    return "forward time ∝ N^x: " + ", ".join(f"{name} x={x:.2f}" for name, x in slopes.items())


def format_speed_table(result: dict[str, Any]) -> str:
    """Plain-text table of :func:`run_speed`'s result (columns with no data are left out), its legend and
    the reasons for any result flagged as unreliable."""
    if result["results"] and any("unreliable" not in r for r in result["results"]):
        flag_unreliable(result)
    rows = [_row(r) for r in result["results"]]
    keep = _kept_columns(rows)
    header = [TABLE_COLUMNS[i][0] for i in keep]
    body = [[r[i] for i in keep] for r in rows]
    widths = [max(len(h), *(len(r[j]) for r in body)) if body else len(h) for j, h in enumerate(header)]
    left = {1}  # pattern

    def line(cells):
        return "  ".join(c.ljust(w) if j in left else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths)))

    lines = [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in body), _footer(result)]
    exponents = _exponent_line(result)
    if exponents:
        lines.append(exponents)
    if result["results"]:
        lines += legend(result, keep)
    return "\n".join(lines)


def print_speed_table(result: dict[str, Any], file=None) -> None:
    """Print with ``rich`` when installed, else plain text; both with the legend and the flags."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(format_speed_table(result), file=file or sys.stdout)
        return
    if any("unreliable" not in r for r in result["results"]):
        flag_unreliable(result)
    rows = [_row(r) for r in result["results"]]
    keep = _kept_columns(rows)
    table = Table(title="spattn bench speed", caption=_footer(result))
    for i in keep:
        table.add_column(TABLE_COLUMNS[i][0], justify="left" if i == 1 else "right")
    for r in rows:
        table.add_row(*[r[i] for i in keep])
    console = Console(file=file, width=max(160, 12 * len(keep)))
    console.print(table)
    exponents = _exponent_line(result)
    if exponents:
        console.print(exponents)
    for text in legend(result, keep):
        console.print(text, markup=False, highlight=False)


def write_json(result: dict[str, Any], path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(_finite(result), f, indent=2, default=_json_default, allow_nan=False)
        f.write("\n")


def _finite(obj):
    """Non-finite floats become null, so the file is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _json_default(obj):
    if isinstance(obj, torch.dtype):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")
