"""Low-rank approximations (linformer, nystrom) against naive quadratic references."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import spattn
from spattn.approx.lowrank import Linformer, Nystromformer, nystrom_pinv
from spattn.approx.reference import naive_linformer, naive_nystrom, naive_pinv, rep

from .approx_helpers import assert_close_rel, assert_matches, padding_mask, rand_qkv


# ------------------------------------------------------------------------------- linformer
@pytest.mark.parametrize("n", [24, 40])
def test_linformer_matches_naive(n):
    q, k, v = rand_qkv(n=n)
    mech = Linformer(k=8, max_len=40)
    assert_matches(lambda a, b, c: mech(a, b, c), lambda a, b, c: naive_linformer(a, b, c, mech.E, mech.F, 40), q, k, v)


def test_linformer_padding_share_and_grads():
    q, k, v = rand_qkv(n=30)
    mech = Linformer(k=6, max_len=32, share_kv=True)
    assert mech.F is None
    kpm = padding_mask(2, 30, [30, 13])
    out = mech(q, k, v, key_padding_mask=kpm)
    want = naive_linformer(q.double(), k.double(), v.double(), mech.E, mech.E, 32, kpm)
    assert_close_rel(out, want, 1e-5, "padding")
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 13:], v2[1, :, 13:] = 7.0, -7.0
    assert torch.equal(out, mech(q, k2, v2, key_padding_mask=kpm))
    out.sum().backward()
    assert mech.E.grad is not None and mech.E.grad[:, 30:].abs().max() == 0, "unused columns get no gradient"


def test_linformer_errors():
    q, k, v = rand_qkv(n=20)
    with pytest.raises(ValueError, match="max_len is required"):
        Linformer(k=4)
    with pytest.raises(ValueError, match="exceeds max_len"):
        Linformer(k=4, max_len=16)(q, k, v)
    with pytest.raises(ValueError, match="causal"):
        Linformer(k=4, max_len=32)(q, k, v, causal=True)
    with pytest.raises(ValueError, match="<= max_len"):
        Linformer(k=64, max_len=32)
    with pytest.raises(ValueError, match="max_len is required"):
        spattn.nn.Attention(32, 4, attention="linformer")
    with pytest.raises(ValueError, match="no causal form"):
        spattn.nn.Attention(32, 4, attention="linformer", causal=True, max_len=512)


# ------------------------------------------------------------------------------- nystrom
@pytest.mark.parametrize("n,m", [(32, 8), (37, 8), (30, 7)])
def test_nystrom_matches_naive(n, m):
    q, k, v = rand_qkv(n=n)
    mech = Nystromformer(landmarks=m)
    assert_matches(lambda a, b, c: mech(a, b, c), lambda a, b, c: naive_nystrom(a, b, c, m), q, k, v, rtol32=2e-5)


def test_nystrom_padding():
    q, k, v = rand_qkv(n=33)
    kpm = padding_mask(2, 33, [33, 12])  # batch 1 has empty segments: their landmarks are dropped
    mech = Nystromformer(landmarks=8)
    out = mech(q, k, v, key_padding_mask=kpm)
    assert_close_rel(out, naive_nystrom(q.double(), k.double(), v.double(), 8, kpm=kpm), 2e-5, "padding")
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 12:], v2[1, :, 12:] = 9.0, -9.0
    assert_close_rel(mech(q, k2, v2, key_padding_mask=kpm), out, 1e-6, "padded keys do not contribute")
    none = mech(q, k, v, key_padding_mask=torch.zeros(2, 33, dtype=torch.bool))
    assert torch.isfinite(none).all() and none.abs().max() == 0


def test_nystrom_pinv_and_exact_limits():
    a = torch.softmax(torch.randn(3, 6, 6, dtype=torch.float64), -1)
    assert_close_rel(nystrom_pinv(a, 6), naive_pinv(a, 6), 1e-12, "iteration")
    assert_close_rel(nystrom_pinv(a, 40), torch.linalg.pinv(a), 1e-8, "converges to pinv")
    q, k, v = rand_qkv(n=12, dtype=torch.float64)
    exact = torch.softmax(q @ rep(k, 4).transpose(-1, -2) / math.sqrt(8), -1) @ rep(v, 4)
    assert_close_rel(Nystromformer(landmarks=12)(q, k, v), exact, 1e-12, "landmarks = N is exact")


def test_nystrom_conv_residual():
    q, k, v = rand_qkv(n=32)
    torch.manual_seed(0)
    mech = Nystromformer(landmarks=8, conv=5, heads=4)
    base = copy.deepcopy(mech)
    base.conv_layer = None
    conv_only = mech(q, k, v) - base(q, k, v)
    vv = rep(v, 4)
    w = mech.conv_layer.weight[:, 0, :, 0]  # [H, 5]
    want = torch.zeros_like(vv)
    for t in range(32):
        for j in range(5):
            s = t + j - 2
            if 0 <= s < 32:
                want[:, :, t] += w[None, :, j, None] * vv[:, :, s]
    assert_close_rel(conv_only, want, 1e-5, "depthwise conv")
    with pytest.raises(ValueError, match="heads"):
        Nystromformer(conv=5)
    with pytest.raises(ValueError, match="odd"):
        Nystromformer(conv=4, heads=4)


def test_nystrom_errors():
    q, k, v = rand_qkv(n=20)
    with pytest.raises(ValueError, match="causal"):
        Nystromformer()(q, k, v, causal=True)
    with pytest.raises(ValueError, match="landmarks"):
        Nystromformer(landmarks=0)
    with pytest.raises(ValueError, match="as many queries"):
        Nystromformer(landmarks=4)(q[:, :, :10], k, v)


@pytest.mark.parametrize("spec", ["linformer", "linformer(k=16)", "nystrom", "nystrom(landmarks=8, conv=33)"])
def test_nn_attention_builds_every_spec(spec):
    torch.manual_seed(0)
    layer = spattn.nn.Attention(32, 4, attention=spec, kv_heads=2, max_len=300)
    x = torch.randn(2, 40, 32, requires_grad=True)
    y = layer(x, key_padding_mask=padding_mask(2, 40, [40, 21]))
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
