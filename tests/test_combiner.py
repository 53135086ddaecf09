"""Combiner (Ren et al. 2021) against a naive reference written from the paper's definition.

The reference enumerates, for every query, the partition of its support into direct keys and
regions, builds each region's abstraction (max-pooled key, attention-weighted value), takes ONE
softmax over [direct, abstraction] logits and expands it into an explicit probability for every
key: ``p(j|i) = p_direct(j)`` or ``p(Omega|i) q(j|Omega)``. The output is ``sum_j p(j|i) v_j``.
"""

from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spattn
from spattn.approx.combiner import Combiner, combiner_attention
from spattn.approx.reference import naive_combiner


def _inputs(B, Hq, Hkv, n, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, n, D, generator=g, dtype=dtype) for h in (Hq, Hkv, Hkv)]


def _check(mode, L, causal, B, Hq, Hkv, n, D, kpm=None, dtype=torch.float64, atol=1e-10, row_summary="wsum"):
    q, k, v = _inputs(B, Hq, Hkv, n, D, dtype)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = combiner_attention(
        q, k, v, mode=mode, segment=L, causal=causal, key_padding_mask=kpm, row_summary=row_summary
    )
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    rep = Hq // Hkv
    want, total = naive_combiner(
        q2, k2.repeat_interleave(rep, 1), v2.repeat_interleave(rep, 1), mode, L, causal, kpm, row_summary
    )
    want_grads = torch.autograd.grad((want * g.double()).sum(), (q2, k2, v2))
    assert not torch.isnan(out).any()
    assert (out.double() - want).abs().max() <= atol
    for a, b in zip(grads, want_grads):
        assert not torch.isnan(a).any()
        assert (a.double() - b).abs().max() <= atol
    return total


@pytest.mark.parametrize("mode", ["fixed", "logsparse", "axial"])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_definition_fp64(mode, causal):
    L = None if mode == "logsparse" else 4
    total = _check(mode, L, causal, B=2, Hq=2, Hkv=1, n=11, D=4)
    assert torch.allclose(total, torch.ones_like(total))  # probabilities of all keys sum to one


@pytest.mark.parametrize("mode", ["fixed", "logsparse", "axial"])
def test_matches_definition_fp32_with_padding(mode):
    kpm = torch.ones(2, 10, dtype=torch.bool)
    kpm[0, 7:] = False
    kpm[1, :3] = False  # query 0..2 of batch 1 have no visible key when causal -> zeros
    L = None if mode == "logsparse" else 3
    for causal in (False, True):
        _check(mode, L, causal, B=2, Hq=2, Hkv=2, n=10, D=8, kpm=kpm, dtype=torch.float32, atol=1e-5)


def test_axial_max_summary():
    _check("axial", 3, True, B=1, Hq=1, Hkv=1, n=9, D=4, row_summary="max")
    _check("axial", 3, False, B=1, Hq=1, Hkv=1, n=8, D=4, row_summary="max")


@settings(max_examples=10, deadline=None)
@given(
    mode=st.sampled_from(["fixed", "logsparse", "axial"]),
    causal=st.booleans(),
    n=st.integers(1, 13),
    L=st.integers(1, 5),
    heads=st.sampled_from([(1, 1), (2, 1), (4, 2)]),
    B=st.integers(1, 2),
)
def test_property_matches_definition(mode, causal, n, L, heads, B):
    _check(mode, None if mode == "logsparse" else L, causal, B=B, Hq=heads[0], Hkv=heads[1], n=n, D=3)


@pytest.mark.parametrize("mode", ["fixed", "logsparse", "axial"])
def test_causal_no_leakage(mode):
    q, k, v = _inputs(1, 2, 2, 23, 8, torch.float32, seed=3)
    out = combiner_attention(q, k, v, mode=mode, causal=True)
    for t in (0, 7, 15, 22):
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, :, t + 1 :] = torch.randn_like(x[:, :, t + 1 :]) * 5
        out2 = combiner_attention(q2, k2, v2, mode=mode, causal=True)
        assert torch.equal(out[:, :, : t + 1], out2[:, :, : t + 1])


def test_default_segment_is_sqrt_and_fully_masked_rows_are_zero():
    q, k, v = _inputs(1, 1, 1, 16, 4)
    assert torch.allclose(combiner_attention(q, k, v, mode="fixed"), combiner_attention(q, k, v, segment=4))
    kpm = torch.zeros(1, 16, dtype=torch.bool)
    for mode in ("fixed", "logsparse", "axial"):
        qq = q.clone().requires_grad_()
        out = combiner_attention(qq, k, v, mode=mode, key_padding_mask=kpm)
        out.sum().backward()
        assert torch.equal(out, torch.zeros_like(out)) and not torch.isnan(qq.grad).any()


def test_nn_attention_and_registry():
    assert "combiner" in {m.name for m in spattn.mechanisms()}
    for spec in ("combiner", 'combiner(mode="logsparse")', 'combiner(mode="axial", segment=4)'):
        for causal in (False, True):
            layer = spattn.nn.Attention(16, 2, attention=spec, causal=causal)
            x = torch.randn(2, 10, 16, requires_grad=True)
            y = layer(x)
            y.sum().backward()
            assert y.shape == x.shape and not torch.isnan(x.grad).any()


def test_bad_parameters():
    with pytest.raises(ValueError, match="mode"):
        Combiner(mode="mixture")
    with pytest.raises(ValueError, match="segment"):
        Combiner(segment=0)
    with pytest.raises(ValueError, match="segment"):
        Combiner(mode="logsparse", segment=4)
    with pytest.raises(ValueError, match="row_summary"):
        Combiner(mode="axial", row_summary="proj")
    q, k, v = _inputs(1, 3, 2, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        Combiner()(q, k, v)
    with pytest.raises(TypeError, match="key_padding_mask"):
        Combiner()(q, k[:, :1], v[:, :1], key_padding_mask=torch.ones(1, 8))
