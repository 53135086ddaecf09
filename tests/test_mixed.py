"""Scatterbrain, SLA and SEA against naive dense references written from their definitions."""

from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spattn
from spattn.approx.featuremaps import orthogonal_gaussian
from spattn.approx.mixed import SLA, Scatterbrain, scatterbrain_attention
from spattn.approx.reference import allowed_pairs, naive_scatterbrain, naive_sea, naive_sla
from spattn.approx.sea import SEA

from .approx_helpers import assert_no_future_leak


def _inputs(B, Hq, Hkv, n, D, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, n, D, generator=g, dtype=dtype) * scale for h in (Hq, Hkv, Hkv)]


def _grads(fn, q, k, v, seed=1):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    return (out.detach(),) + torch.autograd.grad((out * g).sum(), (q, k, v))


def _assert_close(got, want, atol):
    for a, b in zip(got, want):
        assert not torch.isnan(a).any()
        err = (a.double() - b.double()).abs().max().item()
        assert err <= atol, f"max abs error {err:.3g} > {atol:.1g}"


# ------------------------------------------------------------------------------------ Scatterbrain
def _check_scatterbrain(B, Hq, Hkv, n, D, causal, pattern, kpm=None, dtype=torch.float64, atol=1e-10, m=16):
    q, k, v = _inputs(B, Hq, Hkv, n, D, dtype, scale=0.7)
    w = orthogonal_gaussian(m, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    pat = spattn.pattern(pattern)
    layout = pat.layout(q, k, causal=causal)
    support = layout.to_dense()
    got = _grads(
        lambda a, b, c: scatterbrain_attention(a, b, c, pat, w.to(dtype), causal=causal, key_padding_mask=kpm, chunk=4),
        q,
        k,
        v,
    )
    want = _grads(
        lambda a, b, c: naive_scatterbrain(a, b, c, support, w, allowed_pairs(n, causal, kpm, B)),
        q.double(),
        k.double(),
        v.double(),
    )
    _assert_close(got, want, atol)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pattern", ["window(size=2, block=4)", "bigbird(block=4, window=1, globals=1, random=1)"])
def test_scatterbrain_matches_definition(causal, pattern):
    _check_scatterbrain(2, 4, 2, 19, 8, causal, pattern)


def test_scatterbrain_fp32_padding():
    kpm = torch.ones(2, 13, dtype=torch.bool)
    kpm[0, 9:] = False
    kpm[1, :2] = False
    for causal in (False, True):
        _check_scatterbrain(2, 2, 1, 13, 8, causal, "window(size=3, block=4)", kpm, torch.float32, 1e-5)


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 17), size=st.integers(0, 5), causal=st.booleans(), heads=st.sampled_from([(1, 1), (2, 1)]))
def test_scatterbrain_property(n, size, causal, heads):
    _check_scatterbrain(1, heads[0], heads[1], n, 4, causal, f"window(size={size}, block=4)")


def test_scatterbrain_full_support_is_exact_softmax():
    q, k, v = _inputs(1, 2, 2, 12, 8, torch.float64)
    w = orthogonal_gaussian(8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for causal in (False, True):
        got = scatterbrain_attention(q, k, v, "window(size=100, block=4)", w, causal=causal)
        want = spattn.attention(q, k, v, causal=causal, backend="reference")
        assert (got - want).abs().max() < 1e-12


def test_scatterbrain_error_shrinks_with_features():
    """Unbiased estimator: with more random features the error to exact softmax shrinks (fixed seeds)."""
    q, k, v = _inputs(1, 4, 4, 96, 16, torch.float64, seed=3, scale=0.5)
    exact = spattn.attention(q, k, v, backend="reference")
    errs = {}
    for m in (8, 512):
        e = []
        for seed in range(3):
            w = orthogonal_gaussian(m, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            e.append((scatterbrain_attention(q, k, v, "window(size=4, block=8)", w) - exact).pow(2).mean())
        errs[m] = torch.stack(e).mean().item()
    assert errs[512] < 0.25 * errs[8]


def test_scatterbrain_causal_no_leakage():
    layer = Scatterbrain(features=16, pattern="window(size=3, block=4)")
    q, k, v = _inputs(1, 2, 2, 21, 8, torch.float32, seed=2)
    assert_no_future_leak(lambda q, k, v: layer(q, k, v, causal=True), q, k, v, (0, 6, 13))


def test_scatterbrain_redraw():
    layer = Scatterbrain(features=8, redraw=2).train()
    q, k, v = _inputs(1, 1, 1, 8, 4, torch.float32)
    layer(q, k, v)
    w0 = layer.projection.weight.clone()
    layer(q, k, v)
    assert torch.equal(w0, layer.projection.weight)
    layer(q, k, v)
    assert not torch.equal(w0, layer.projection.weight)


# ------------------------------------------------------------------------------------------- SLA
def _sla_layer(D, k, block, seed=0, dtype=torch.float64):
    layer = SLA(k=k, block=block, head_dim=D).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # zero-initialised in SLA; random here so the linear branch is tested
        layer.proj_l.weight.copy_(torch.randn(D, D, generator=g, dtype=dtype))
        layer.proj_l.bias.copy_(torch.randn(D, generator=g, dtype=dtype))
    return layer


@pytest.mark.parametrize("n,block,k,heads", [(20, 4, 2, (2, 1)), (16, 4, 0.5, (2, 2)), (9, 4, 3, (1, 1))])
def test_sla_matches_definition(n, block, k, heads):
    D = 4
    layer = _sla_layer(D, k, block)
    q, k_, v = _inputs(2, heads[0], heads[1], n, D)
    topk = layer.blocks_kept(n)
    got = _grads(lambda a, b, c: layer(a, b, c), q, k_, v)
    want = _grads(lambda a, b, c: naive_sla(a, b, c, block, topk, layer.proj_l), q, k_, v)
    _assert_close(got, want, 1e-10)


def test_sla_fp32_padding_and_zero_init():
    D, n = 8, 14
    kpm = torch.ones(2, n, dtype=torch.bool)
    kpm[0, 10:] = False
    kpm[1, 4:8] = False  # a key block with no real key is never critical
    layer = _sla_layer(D, 2, 4, dtype=torch.float32)
    q, k, v = _inputs(2, 2, 2, n, D, torch.float32)
    got = _grads(lambda a, b, c: layer(a, b, c, key_padding_mask=kpm), q, k, v)
    want = _grads(
        lambda a, b, c: naive_sla(a, b, c, 4, 2, layer.proj_l.double(), kpm), q.double(), k.double(), v.double()
    )
    _assert_close(got, want, 1e-5)
    fresh = SLA(k=2, block=4, head_dim=D)
    assert torch.equal(fresh.proj_l.weight, torch.zeros(D, D))
    # zero-initialised projection: exactly the block-sparse softmax branch
    zero = naive_sla(q.double(), k.double(), v.double(), 4, 2, lambda x: torch.zeros_like(x), kpm)
    assert (fresh(q, k, v, key_padding_mask=kpm).double() - zero).abs().max() < 1e-5


def test_sla_sequence_without_keys_gives_zeros():
    layer = _sla_layer(4, 2, 4, dtype=torch.float32)
    q, k, v = (t.requires_grad_() for t in _inputs(2, 2, 2, 10, 4, torch.float32))
    kpm = torch.ones(2, 10, dtype=torch.bool)
    kpm[1] = False
    out = layer(q, k, v, key_padding_mask=kpm)
    out.sum().backward()
    assert torch.equal(out[1], torch.zeros_like(out[1])) and out[0].abs().sum() > 0
    assert not any(torch.isnan(t.grad).any() for t in (q, k, v))


def test_sla_all_blocks_critical_is_softmax():
    q, k, v = _inputs(1, 2, 2, 10, 4)
    layer = _sla_layer(4, 1.0, 4)
    want = spattn.attention(q, k, v, backend="reference") + layer.proj_l.bias  # o_l = 0, proj_l(0) = bias
    assert float((layer(q, k, v) - want).detach().abs().max()) < 1e-12


# ------------------------------------------------------------------------------------------- SEA
@pytest.mark.parametrize("causal", [False, True])
def test_sea_matches_definition(causal):
    layer = SEA(k=2, chunks=5, features=16)
    q, k, v = _inputs(2, 2, 1, 23, 8, torch.float64, seed=4)
    kpm = torch.ones(2, 23, dtype=torch.bool)
    kpm[1, 17:] = False
    got = _grads(lambda a, b, c: layer(a, b, c, causal=causal, key_padding_mask=kpm), q, k, v)
    want = _grads(lambda a, b, c: naive_sea(a, b, c, layer, causal, kpm), q, k, v)
    _assert_close(got, want, 1e-10)
    sel = layer.last_selection.indices
    assert int((sel >= 0).sum(-1).max()) <= 2 * 5  # k chunks of 5 keys per query


def test_sea_causal_no_leakage():
    layer = SEA(k=2, chunks=4, features=8)
    q, k, v = _inputs(1, 2, 2, 16, 8, torch.float32, seed=2)
    assert_no_future_leak(lambda q, k, v: layer(q, k, v, causal=True), q, k, v, (0, 5, 11))


# --------------------------------------------------------------------------------- registry, errors
@pytest.mark.parametrize(
    "spec,causal",
    [
        ("scatterbrain", False),
        ("scatterbrain", True),
        ("scatterbrain(features=16, pattern='bigbird(block=8)')", True),
        ("sla", False),
        ("sla(k=2, block=16)", False),
        ("sea", False),
        ("sea(k=3)", True),
    ],
)
def test_nn_attention(spec, causal):
    layer = spattn.nn.Attention(32, 4, attention=spec, causal=causal, kv_heads=2)
    x = torch.randn(2, 50, 32, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == x.shape and not torch.isnan(x.grad).any()


def test_bad_parameters():
    with pytest.raises(ValueError, match="features"):
        Scatterbrain(features=0)
    with pytest.raises(ValueError, match="unknown"):
        Scatterbrain(pattern="nonsense(size=3)")
    with pytest.raises(ValueError, match="k"):
        SLA(k=0, head_dim=8)
    with pytest.raises(ValueError, match="fraction"):
        SLA(k=1.5, head_dim=8)
    with pytest.raises(ValueError, match="block"):
        SLA(block=0, head_dim=8)
    with pytest.raises(ValueError, match="head_dim"):
        SLA()
    with pytest.raises(ValueError, match="causal"):
        spattn.nn.Attention(16, 2, attention="sla", causal=True)
    q, k, v = _inputs(1, 2, 2, 8, 8, torch.float32)
    with pytest.raises(ValueError, match="causal"):
        SLA(head_dim=8)(q, k, v, causal=True)
    with pytest.raises(ValueError, match="head_dim"):
        SLA(head_dim=4)(q, k, v)
    with pytest.raises(ValueError, match="chunks"):
        SEA(chunks=0)
    with pytest.raises(ValueError, match="multiple"):
        SEA()(q, k[:, :1].expand(1, 3, 8, 8).contiguous()[:, :3], v[:, :1].expand(1, 3, 8, 8).contiguous())


def test_scatterbrain_takes_a_precomputed_layout_but_no_other_kind_of_selection():
    q, k, v = (torch.randn(1, 2, 24, 8, dtype=torch.float64) for _ in range(3))
    proj = orthogonal_gaussian(16, 8, generator=torch.Generator().manual_seed(0)).double()
    layout = spattn.pattern("window(size=4, block=8)").layout(q, k)
    want = scatterbrain_attention(q, k, v, "window(size=4, block=8)", proj)
    assert torch.allclose(scatterbrain_attention(q, k, v, layout, proj), want, atol=1e-12)
    tokens = spattn.pattern("topk(k=4)").select(q, k)
    with pytest.raises(
        TypeError, match="scatterbrain: pattern must be a Layout, a Pattern or a pattern spec, got TokenSelection"
    ):
        scatterbrain_attention(q, k, v, tokens, proj)
