"""spattn bench speed's reading of the results: implausible results flagged with their reason, every
printed column explained (synthetic results: no timing here; the timing itself: test_bench_timing.py)."""

import pytest

from spattn.bench.speed import TABLE_COLUMNS, flag_unreliable, format_speed_table


def _timed(ms, n=5):
    return {
        "median_s": ms / 1e3,
        "times_s": [ms / 1e3] * n,
        "first_s": ms / 1e3,
        "peak_bytes": None,
        "spread": 0.0,
        "stable": True,
    }


def _result(*records, cpus=2):
    return {
        "config": {
            "batch": 1,
            "heads": 4,
            "dim": 64,
            "dtype": "float32",
            "causal": False,
            "repeat": 3,
            "max_repeat": 10,
            "warmup": 1,
        },
        "environment": {"cpus": cpus, "threads": 2, "torch": "x", "load_average_start": [0.5]},
        "memory_method": "unavailable",
        "results": list(records),
    }


def _rec(n, pattern, density, sdpa, bs, bs_bwd=None, sdpa_bwd=None, kernel="blocksparse", load=(0.3, 0.4)):
    rec = {
        "n": n,
        "pattern": pattern,
        "density": density,
        "kernel": kernel,
        "sdpa": _timed(sdpa),
        "blocksparse": _timed(bs),
        "load_before": load[0],
        "load_after": load[1],
    }
    if bs_bwd is not None:
        rec["blocksparse_bwd"] = _timed(bs_bwd)
    if sdpa_bwd is not None:
        rec["sdpa_bwd"] = _timed(sdpa_bwd)
    return rec


def test_plausible_results_are_not_flagged():
    res = _result(
        _rec(2048, "window(size=256)", 0.25, 150, 40, 110, 500),
        _rec(4096, "window(size=256)", 0.125, 600, 80, 220, 2000),
    )
    assert flag_unreliable(res) == []
    assert all(r["unreliable"] == [] for r in res["results"])
    text = format_speed_table(res)
    assert "UNRELIABLE" not in text and "flag" not in text.splitlines()[0]


def test_the_issue_s_implausible_run_is_flagged_with_reasons():
    """Issue 17's numbers: window 966 ms vs dense 152 ms at N=2048, f+b/f 0.47, a negative exponent, on a busy machine."""
    res = _result(
        _rec(2048, "window(size=256)", 0.24, 152, 966, 454, 500, load=(9.6, 11.7)),
        _rec(2048, "linear", None, 152, 30, 60, 500, kernel="approximation", load=(9.6, 11.7)),
        _rec(4096, "linear", None, 600, 13, 40, 2000, kernel="approximation", load=(11.7, 11.0)),
    )
    run_level = flag_unreliable(res)
    win = res["results"][0]["unreliable"]
    assert any("slower than dense SDPA" in r and "density 0.24" in r for r in win)
    assert any(r.startswith("forward+backward 454") and "faster than the forward alone 966" in r for r in win)
    assert any("machine busy: load 9.6 -> 11.7 on 2 CPUs" in r for r in win)
    assert any("negative time exponent" in r for r in res["results"][2]["unreliable"])
    assert any(r.startswith("linear: forward time ∝ N^-1.") for r in run_level)
    assert any("machine was busy" in r for r in run_level)
    text = format_speed_table(res)
    assert "UNRELIABLE" in text and "N=2048 window(size=256): sparse forward 966" in text
    header = text.splitlines()[0].split()
    assert "flag" in header and "bs" not in header
    line = next(x for x in text.splitlines() if x.startswith("2048") and "linear" in x)
    assert "linear [approximation]" in line


def test_dense_baseline_flagged_once_per_n():
    res = _result(
        _rec(256, "window(size=32)", 0.24, 22.6, 0.3, 1.0, 0.6), _rec(256, "topk(k=8)", 0.03, 22.6, 18.9, 70, 0.6)
    )
    run_level = flag_unreliable(res)
    assert [r for r in run_level if r.startswith("N=256 dense SDPA")] == [
        "N=256 dense SDPA: dense SDPA forward+backward 0.6 ms faster than its forward alone 22.6 ms"
    ]
    assert any("under half its ideal" in r for r in res["results"][0]["unreliable"])
    assert all(any("dense baseline" in r for r in rec["unreliable"]) for rec in res["results"])


def test_every_printed_column_is_explained():
    res = _result(
        _rec(2048, "window(size=256)", 0.25, 150, 40, 110, 500),
        _rec(2048, "linear", None, 150, 30, 60, 500, kernel="approximation"),
    )
    text = format_speed_table(res)
    lines = text.splitlines()
    legend = lines[lines.index("columns:") + 1 :]
    explained = {line.strip()[:14].strip() for line in legend if line.startswith("  ")}
    header_names = [h for h, _, _ in TABLE_COLUMNS if h in lines[0]]
    assert header_names and set(header_names) <= explained
    assert all(doc for _, _, doc in TABLE_COLUMNS)
    # the approximation's time sits in its own column, the sparse path's in another
    cols = [c for c in lines[0].split("  ") if c.strip()]
    assert "approx ms" in [c.strip() for c in cols] and "sparse ms" in [c.strip() for c in cols]


@pytest.mark.parametrize("kw", [dict(max_repeat=2, repeat=3), dict(rel_tol=0.0), dict(budget_s=0.0), dict(warmup=-1)])
def test_speed_config_checks_timing_options(kw):
    from spattn.bench.speed import SpeedConfig

    with pytest.raises(ValueError):
        SpeedConfig(patterns=("window(size=8)",), ns=(64,), **kw).validate()
