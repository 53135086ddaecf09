"""A pattern defined outside the package, following docs/adding-a-mechanism.md, runs everywhere a
spec string is accepted — spattn.attention, spattn.nn.Attention, the CLI and sparsify — with no
edit inside spattn."""

from __future__ import annotations

import json

import pytest
import torch

import spattn
from spattn import registry
from spattn.cli import main
from spattn.layout import Layout, translation_invariant
from spattn.patterns import Pattern
from spattn.patterns.base import check_int, check_qk


class Residues(Pattern):
    """Query ``i`` sees key ``j`` iff ``i' ≡ j (mod period)`` (``i' = i + Nk - Nq``); causal: also ``j <= i'``.

    Every tile holds some allowed pair, so the Layout lists every tile as partial and leaves the
    rule to its predicate; O(tiles) to build.
    """

    name = "residues_for_test"

    def __init__(self, period: int = 3, block: int = 16):
        check_int(self.name, "period", period, 1)
        check_int(self.name, "block", block, 1)
        self.period, self.block = period, block

    def layout(self, q, k, causal=False):
        _, _, _, nq, nk = check_qk(q, k)
        offset, period = nk - nq, self.period

        @translation_invariant
        def rule(b, h, q_idx, kv_idx):
            keep = (q_idx + offset - kv_idx) % period == 0
            return keep & (kv_idx <= q_idx + offset) if causal else keep

        nqb, nkb = -(-nq // self.block), -(-nk // self.block)
        tiles = torch.ones(1, 1, nqb, nkb, dtype=torch.bool, device=q.device)
        if causal:  # drop tiles whose first key lies after their last query
            last_q = (torch.arange(nqb, device=q.device) * self.block + self.block - 1).clamp(max=nq - 1) + offset
            tiles &= (torch.arange(nkb, device=q.device) * self.block)[None, :] <= last_q[:, None]
        return Layout.from_block_map(tiles, q_len=nq, kv_len=nk, block_q=self.block, mask_mod=rule)


def brute_force(nq: int, nk: int, period: int, causal: bool) -> torch.Tensor:
    i = torch.arange(nq)[:, None] + (nk - nq)
    j = torch.arange(nk)[None, :]
    keep = (i - j) % period == 0
    return keep & (j <= i) if causal else keep


@pytest.fixture
def residues(monkeypatch):
    """Register through the public decorator into a copy of the registry (undone after the test)."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register(
        "residues_for_test", kind="static", description="keys in the query's residue class", paper="none (test)"
    )(Residues)
    return Residues


@pytest.mark.parametrize("causal", [False, True])
def test_attention_and_layout_follow_the_definition(residues, causal):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 70, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 90, 8, dtype=torch.float64), torch.randn(2, 2, 90, 8, dtype=torch.float64)
    lay = spattn.pattern("residues_for_test(period=4)").layout(q, k, causal=causal)
    assert torch.equal(lay.to_dense()[0, 0], brute_force(70, 90, 4, causal))
    out = spattn.attention(q, k, v, "residues_for_test(period=4)", causal=causal)
    ref = spattn.attention(q, k, v, "residues_for_test(period=4)", causal=causal, backend="reference")
    assert (out - ref).abs().max() <= 1e-10
    assert any(m.name == "residues_for_test" for m in spattn.mechanisms())


def test_nn_attention_trains_with_it(residues):
    torch.manual_seed(0)
    layer = spattn.nn.Attention(dim=32, heads=4, kv_heads=2, attention="residues_for_test(period=2)", causal=True)
    x = torch.randn(2, 50, 32, requires_grad=True)
    layer(x).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert layer.spec == "residues_for_test(period=2, block=16)"


def test_cli_benchmarks_it(residues, tmp_path, capsys):
    path = tmp_path / "speed.json"
    assert (
        main(
            [
                "bench",
                "speed",
                "--quick",
                "--n",
                "96",
                "--patterns",
                "residues_for_test(period=3)",
                "--backends",
                "blocksparse",
                "--heads",
                "2",
                "--dim",
                "16",
                "--json",
                str(path),
                "--quiet",
            ]
        )
        == 0
    )
    assert "residues_for_test" in capsys.readouterr().out
    assert {r["pattern"] for r in json.loads(path.read_text())["results"]} == {"residues_for_test(period=3)"}


@torch.no_grad()
def test_sparsify_runs_it_inside_a_model(residues):
    transformers = pytest.importorskip("transformers")
    from spattn.integrations import hf

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 97, (1, 80), generator=torch.Generator().manual_seed(0))
    dense = model(ids).logits
    with hf.sparsify(model, prefill="residues_for_test(period=3)"):
        sparse = model(ids).logits
    with hf.sparsify(model, prefill="residues_for_test(period=3)", backend="reference"):
        oracle = model(ids).logits
    assert (sparse - oracle).abs().max() <= 1e-5
    assert (sparse - dense).abs().max() > 1e-3  # the pattern really changed the attention
