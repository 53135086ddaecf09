"""How new mechanisms plug in: context parameters, ApproxAttention / AttentionLayer in nn.Attention,
precomputed token selections in spattn.attention, learned patterns compared by identity."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import spattn
from spattn import registry
from spattn.approx.base import ApproxAttention, AttentionLayer
from spattn.kernels.reference import reference_attention
from spattn.layout import Layout
from spattn.nn import build_mechanism
from spattn.patterns import Pattern
from spattn.selection import TokenSelection


class ExactSoftmax(ApproxAttention):
    """Plain softmax attention written out: an 'approximation' with zero error."""

    name = "exact_softmax_for_test"

    def __init__(self, temperature: float = 1.0, heads=None, head_dim=None):
        super().__init__()
        self.temperature, self.heads, self.head_dim = temperature, heads, head_dim
        self.gain = nn.Parameter(torch.ones(heads or 1, 1, 1))

    def forward(self, q, k, v, *, causal=False, key_padding_mask=None):
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))
        s = q @ k.transpose(-1, -2) / (math.sqrt(q.shape[-1]) * self.temperature)
        if causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        if key_padding_mask is not None:
            s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
        return self.gain * (s.softmax(-1) @ v)


class NonCausal(ExactSoftmax):
    name = "noncausal_for_test"
    supports_causal = False


class Doubler(AttentionLayer):
    name = "doubler_for_test"

    def __init__(self, dim: int, factor: float = 2.0):
        super().__init__()
        self.dim, self.factor = dim, factor
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, key_padding_mask=None):
        self.aux_loss = x.new_tensor(0.5)
        return self.factor * self.proj(x)


@pytest.fixture
def registered(monkeypatch):
    for cls, kind in ((ExactSoftmax, "approximation"), (NonCausal, "approximation"), (Doubler, "layer")):
        monkeypatch.setitem(registry._REGISTRY, cls.name, registry.Mechanism(cls.name, kind, cls, "test", "none"))


def test_context_is_passed_only_when_declared_and_not_set(registered):
    mech = build_mechanism("exact_softmax_for_test(temperature=2.0)", dim=32, heads=4, head_dim=8, causal=True)
    assert (mech.temperature, mech.heads, mech.head_dim) == (2.0, 4, 8)
    assert build_mechanism("exact_softmax_for_test(heads=2)", heads=4).heads == 2  # the spec wins
    assert mech.spec() == "exact_softmax_for_test(temperature=2.0)"  # context is not part of the spec
    with pytest.raises(ValueError, match="unknown context"):
        build_mechanism("dense", width=3)
    with pytest.raises(TypeError, match="spec string"):
        build_mechanism(3.5)


@pytest.mark.parametrize("causal", [False, True])
def test_approx_attention_runs_inside_the_layer(registered, causal):
    torch.manual_seed(0)
    layer = spattn.nn.Attention(dim=32, heads=4, kv_heads=2, attention="exact_softmax_for_test", causal=causal)
    assert isinstance(layer.mechanism, ExactSoftmax) and layer.mechanism.heads == 4
    assert any(n.startswith("mechanism.") for n, _ in layer.named_parameters())  # its parameters train
    dense = spattn.nn.Attention(dim=32, heads=4, kv_heads=2, causal=causal)
    dense.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("mechanism.")})
    x = torch.randn(2, 37, 32)
    kpm = torch.ones(2, 37, dtype=torch.bool)
    kpm[1, 30:] = False
    torch.testing.assert_close(layer(x, key_padding_mask=kpm), dense(x, key_padding_mask=kpm), atol=1e-5, rtol=0)
    assert layer.spec == "exact_softmax_for_test(temperature=1.0)"


def test_mechanism_without_causal_form_is_refused(registered):
    with pytest.raises(ValueError, match="no causal form"):
        spattn.nn.Attention(dim=16, heads=2, attention="noncausal_for_test", causal=True)
    spattn.nn.Attention(dim=16, heads=2, attention="noncausal_for_test")


def test_attention_layer_replaces_the_whole_layer(registered):
    layer = spattn.nn.Attention(dim=16, heads=2, attention="doubler_for_test(factor=3.0)")
    assert not hasattr(layer, "q_proj") and layer.mechanism.dim == 16
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(layer(x), 3.0 * layer.mechanism.proj(x))
    assert float(layer.aux_loss) == 0.5


def test_functional_refuses_approximations(registered):
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="not a pattern"):
        spattn.attention(q, q, q, "exact_softmax_for_test")


def test_precomputed_token_selection():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)
    idx = torch.randint(0, 12, (2, 4, 9, 3))
    idx[..., 1] = -1
    idx[0, 0, 4] = -1  # a query with nothing to attend to
    idx = torch.where((idx[..., :1] == idx) & (torch.arange(3) > 0), -1, idx)  # no duplicate keys
    sel = TokenSelection(idx, 9, 12)
    out = spattn.attention(q, k, v, sel, backend="reference")
    want = reference_attention(q, k, v, Layout.from_dense(sel.to_dense(), 4, 4))
    torch.testing.assert_close(out, want)
    assert torch.equal(out[0, 0, 4], torch.zeros(8))
    with pytest.raises(ValueError, match="causality is part of the TokenSelection"):
        spattn.attention(q, k, v, sel, causal=True)
    with pytest.raises(ValueError, match=r"is for \(Nq, Nk\) = \(9, 12\)"):
        spattn.attention(q[:, :, :5], k, v, sel)
    with pytest.raises(ValueError, match="flex"):
        spattn.attention(q, k, v, sel, backend="flex")


def test_token_selection_validation_and_density():
    with pytest.raises(TypeError, match="int64"):
        TokenSelection(torch.zeros(1, 1, 2, 2, dtype=torch.int32), 2, 4)
    with pytest.raises(ValueError, match=r"\[-1, 4\)"):
        TokenSelection(torch.full((1, 1, 2, 2), 4), 2, 4)
    with pytest.raises(ValueError, match="q_len"):
        TokenSelection(torch.zeros(1, 1, 2, 2, dtype=torch.long), 3, 4)
    sel = TokenSelection(torch.tensor([[[[0, 3], [2, -1]]]]), 2, 4)
    assert sel.density() == pytest.approx(3 / 8)
    assert sel.to_dense().tolist() == [[[[True, False, False, True], [False, False, True, False]]]]


class LearnedPattern(Pattern, nn.Module):
    name = "learned_for_test"

    def __init__(self):
        nn.Module.__init__(self)
        self.register_buffer("state", torch.zeros(3))

    def layout(self, q, k, causal=False):  # pragma: no cover - not used
        raise NotImplementedError


def test_learned_patterns_compare_by_identity():
    a, b = LearnedPattern(), LearnedPattern()
    assert a != b and a == a and hash(a) != hash(b)
    model = nn.ModuleList([a, b])
    assert len(model.state_dict()) == 2  # both layers' state survives de-duplication
    assert spattn.pattern("window(size=3)") == spattn.pattern("window(size=3)")


@pytest.mark.slow
def test_speed_bench_times_approximations_and_fits_exponents(registered):
    from spattn.bench.speed import SpeedConfig, fit_exponents, format_speed_table, run_speed

    cfg = SpeedConfig(
        ns=(64, 128),
        patterns=("exact_softmax_for_test", "window(size=8, block=16)"),
        measurements=("sdpa", "select", "blocksparse", "blocksparse_bwd", "sdpa_mask"),
        heads=2,
        dim=8,
        warmup=0,
        repeat=1,
        memory=False,
    )
    result = run_speed(cfg)
    kinds = {(r["pattern"], r["kernel"]) for r in result["results"]}
    assert kinds == {("exact_softmax_for_test", "approximation"), ("window(size=8, block=16)", "blocksparse")}
    approx = [r for r in result["results"] if r["kernel"] == "approximation"]
    assert all(r["density"] is None and "sdpa_mask" not in r and r["blocksparse_bwd"]["median_s"] > 0 for r in approx)
    assert "exact_softmax_for_test [approximation]" in format_speed_table(result)
    synthetic = {
        "results": [
            {"n": 1000, "pattern": "p", "blocksparse": {"median_s": 1.0}},
            {"n": 2000, "pattern": "p", "blocksparse": {"median_s": 4.0}},
            {"n": 4000, "pattern": "p", "blocksparse": {"median_s": 16.0}},
        ]
    }
    assert fit_exponents(synthetic) == {"p": pytest.approx(2.0)}
    with pytest.raises(ValueError, match="whole layer"):
        SpeedConfig(patterns=("doubler_for_test",)).validate()
    SpeedConfig(ns=(64, 128), patterns=("linformer(k=100)",)).validate()  # length-bound methods fit the longest N
    with pytest.raises(ValueError, match="max_len"):
        SpeedConfig(ns=(64,), patterns=("linformer(k=100)",)).validate()
