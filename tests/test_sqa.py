"""Sparse Query Attention against a naive multi-head attention written out with H_q query heads."""

from __future__ import annotations

import copy

import pytest
import torch

import spattn
from spattn.nn.reference import naive_sqa
from spattn.nn.sqa import SparseQueryAttention

from .approx_helpers import assert_close_rel, padding_mask


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("variant,hq,hkv", [("standard", 4, 2), ("symmetric", 4, 4), ("extreme", 2, 2)])
def test_sqa_matches_naive(causal, variant, hq, hkv):
    torch.manual_seed(0)
    layer = SparseQueryAttention(dim=64, heads=8, variant=variant, causal=causal, bias=True)
    assert (layer.query_heads, layer.key_value_heads) == (hq, hkv)
    assert layer.q_proj.out_features == hq * 8 and layer.out_proj.in_features == hq * 8
    assert layer.k_proj.out_features == hkv * 8
    ref = copy.deepcopy(layer).double()
    x = torch.randn(2, 19, 64, dtype=torch.float64)
    kpm = padding_mask(2, 19, [19, 11])
    xg, xr = x.float().requires_grad_(), x.clone().requires_grad_()
    out, want = layer(xg, key_padding_mask=kpm), naive_sqa(ref, xr, causal, kpm)
    assert_close_rel(out, want, 1e-5, "out")
    g = torch.randn_like(want)
    (out * g.float()).sum().backward()
    (want * g).sum().backward()
    assert_close_rel(xg.grad, xr.grad, 1e-5, "dx")
    for (name, p), p_ref in zip(layer.named_parameters(), ref.parameters()):
        if name == "k_proj.bias":  # softmax ignores q . b_k, the same for every key: zero gradient
            assert p.grad.abs().max() < 1e-5 and p_ref.grad.abs().max() < 1e-12
            continue
        assert_close_rel(p.grad, p_ref.grad, 1e-5, name)


def test_sqa_causality_and_overrides():
    torch.manual_seed(0)
    layer = SparseQueryAttention(dim=32, heads=8, query_heads=3, key_value_heads=1, causal=True)
    x = torch.randn(1, 16, 32)
    y = layer(x)
    x2 = x.clone()
    x2[:, 9:] = torch.randn(1, 7, 32)
    assert_close_rel(layer(x2)[:, :9], y[:, :9], 1e-6, "causal")
    assert layer.spec() == "sqa(query_heads=3, key_value_heads=1, variant='standard')"
    windowed = SparseQueryAttention(dim=32, heads=8, pattern="window(size=4)", causal=True)
    yw = windowed(x)
    assert yw.shape == x.shape and torch.isfinite(yw).all()
    x3 = x.clone()
    x3[:, :2] = torch.randn(1, 2, 32)  # far outside the window of the last query
    assert_close_rel(windowed(x3)[:, -1], yw[:, -1], 1e-6, "window")


def test_sqa_errors():
    with pytest.raises(ValueError, match="query_heads"):
        SparseQueryAttention(dim=32, heads=4, query_heads=8)
    with pytest.raises(ValueError, match="key_value_heads"):
        SparseQueryAttention(dim=32, heads=8, query_heads=2, key_value_heads=4)
    with pytest.raises(ValueError, match="key_value_heads"):
        SparseQueryAttention(dim=32, heads=8, query_heads=3, key_value_heads=2)
    with pytest.raises(ValueError, match="variant"):
        SparseQueryAttention(dim=32, heads=8, variant="tiny")
    with pytest.raises(ValueError, match="divisible"):
        SparseQueryAttention(dim=30, heads=8)
    with pytest.raises(ValueError, match="shape"):
        SparseQueryAttention(dim=32, heads=8)(torch.randn(2, 5, 31))


@pytest.mark.parametrize(
    "spec", ["sqa", "sqa(variant=symmetric)", "sqa(variant='extreme')", "sqa(query_heads=2, key_value_heads=1)"]
)
@pytest.mark.parametrize("causal", [False, True])
def test_nn_attention_builds_sqa(spec, causal):
    layer = spattn.nn.Attention(64, 8, attention=spec, causal=causal)
    assert isinstance(layer.mechanism, SparseQueryAttention) and layer.mechanism.causal == causal
    x = torch.randn(2, 12, 64, requires_grad=True)
    y = layer(x, key_padding_mask=padding_mask(2, 12, [12, 5]))
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
