"""``spattn bench fidelity``: metrics against hand computations, planted keys, CLI, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from spattn.bench.fidelity import FidelityConfig, format_fidelity_table, make_inputs, run_fidelity
from spattn.cli import main


@pytest.mark.slow
def test_dense_pattern_has_zero_error_and_full_recall():
    cfg = FidelityConfig(n=96, heads=2, dim=16, specs=("dense(block=32)",), topk=4)
    result = run_fidelity(cfg)
    for rec in result["records"]:
        assert rec["rel_error"] < 1e-5
        assert rec["topk_recall"] == 1.0 and rec["density"] == pytest.approx(1.0)
        if rec["input"] == "planted":
            assert rec["planted_recall"] == 1.0


def test_window_metrics_equal_a_hand_computation():
    n, w, topk = 80, 5, 3
    cfg = FidelityConfig(n=n, heads=2, dim=8, specs=(f"window(size={w}, block=16)",), topk=topk, inputs=("planted",))
    rec = run_fidelity(cfg)["records"][0]
    q, k, v, planted = make_inputs("planted", cfg)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed, keep = j <= i, (j <= i) & (i - j <= w)
    assert rec["density"] == pytest.approx(float(keep.sum() / allowed.sum()))
    scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~allowed, float("-inf"))
    top = scores.topk(topk, -1)
    real = torch.isfinite(top.values)
    assert rec["topk_recall"] == pytest.approx(
        float((keep.expand_as(scores).gather(-1, top.indices) & real).sum() / real.sum())
    )
    assert rec["planted_recall"] == pytest.approx(float((i.squeeze(1) - planted <= w).float().mean()))
    p = scores.softmax(-1).masked_fill(~keep, 0)
    out = (p / p.sum(-1, keepdim=True)) @ v
    dense = scores.softmax(-1) @ v
    assert rec["rel_error"] == pytest.approx(float((out - dense).norm() / dense.norm()), rel=1e-4)


def test_planted_keys_are_visible_and_strong():
    cfg = FidelityConfig(n=200, heads=2, dim=32, causal=True)
    q, k, _, planted = make_inputs("planted", cfg)
    assert (planted <= torch.arange(200)).all() and (planted >= 0).all()
    scores = q @ k.transpose(-1, -2) / math.sqrt(32)
    scores = scores.masked_fill(torch.ones(200, 200, dtype=torch.bool).triu(1), float("-inf"))
    rank1 = (scores.argmax(-1) == planted).float().mean()
    assert rank1 > 0.6  # the planted key is usually each query's best key (chance: < 5%)
    q2, k2, _, planted2 = make_inputs("planted", cfg)
    assert torch.equal(planted, planted2) and torch.equal(k, k2)  # deterministic by seed


def test_cli_writes_json_and_rejects_unknown(tmp_path, capsys):
    path = tmp_path / "fid.json"
    assert (
        main(
            [
                "bench",
                "fidelity",
                "--n",
                "64",
                "--heads",
                "1",
                "--dim",
                "8",
                "--topk",
                "2",
                "--specs",
                "window(size=8, block=16)",
                "--json",
                str(path),
                "--quiet",
            ]
        )
        == 0
    )
    data = json.loads(path.read_text())
    assert [r["input"] for r in data["records"]] == ["random", "planted"]
    assert "window(size=8, block=16)" in capsys.readouterr().out
    assert main(["bench", "fidelity", "--n", "64", "--specs", "no_such_mechanism"]) == 2
    assert "unknown attention mechanism" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=0), "n must be a positive int"),
        (dict(n=8, topk=9), "topk=9 must be <= n=8"),
        (dict(inputs=("noise",)), "inputs must be"),
        (dict(specs=()), "at least one"),
        (dict(specs=("window(size=",)), "cannot parse"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FidelityConfig(**kwargs).validate()


def test_table_mentions_untrained_and_skipped():
    result = run_fidelity(
        FidelityConfig(n=64, heads=1, dim=8, topk=2, specs=("window(size=4, block=16)", "zzz_missing"))
    )
    text = format_fidelity_table(result)
    assert "skipped (not registered): zzz_missing" in text


def test_default_sweep_skips_what_cannot_run_causally_and_user_specs_fail():
    specs = ("window(size=4, block=16)", "nystrom(landmarks=4)")
    result = run_fidelity(FidelityConfig(n=64, heads=1, dim=8, topk=2, specs=specs, skip_unknown=True))
    assert [r["spec"] for r in result["records"]] == ["window(size=4, block=16)"] * 2
    assert "causal" in result["unsupported"]["nystrom(landmarks=4)"]
    assert "skipped nystrom(landmarks=4)" in format_fidelity_table(result)
    with pytest.raises(ValueError, match="causal"):
        run_fidelity(FidelityConfig(n=64, heads=1, dim=8, topk=2, specs=specs, skip_unknown=False))
