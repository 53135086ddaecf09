"""Score soft-capping (Gemma 2: scaled scores s -> cap * tanh(s / cap)) in every kernel, against the
dense fp64 reference with the same cap: forward, log-sum-exp and gradients of q, k, v."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spattn
from spattn.kernels.blocksparse import blocksparse_attention
from spattn.kernels.pagesparse import pagesparse_attention
from spattn.kernels.reference import reference_attention
from spattn.kernels.tokensparse import tokensparse_attention
from spattn.layout import Layout
from spattn.selection import PageSelection, TokenSelection

from .helpers import assert_matches_reference


def _compare(fn, q, k, v, layout, kpm, softcap, atol):
    """``fn(..., softcap=)`` in the inputs' dtype against the fp64 reference with the same cap."""
    assert_matches_reference(fn, q, k, v, layout, kpm, atol=atol, softcap=softcap)


def _qkv(gen, batch, hq, hkv, nq, nk, dim, spread=3.0):
    # large scores (|s| up to ~10) so that the cap changes the result
    q = torch.randn(batch, hq, nq, dim, generator=gen) * spread
    k = torch.randn(batch, hkv, nk, dim, generator=gen) * spread
    v = torch.randn(batch, hkv, nk, dim, generator=gen)
    return q, k, v


def test_reference_applies_the_cap_to_scaled_scores():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (x.double() for x in _qkv(gen, 1, 2, 2, 5, 7, 4))
    layout = Layout.from_dense(torch.ones(1, 1, 5, 7, dtype=torch.bool), 4)
    cap = 2.0
    scores = torch.tanh(q @ k.transpose(-1, -2) * 0.5 / cap) * cap
    want = torch.softmax(scores, -1) @ v
    torch.testing.assert_close(reference_attention(q, k, v, layout, softcap=cap), want, rtol=0, atol=1e-12)
    assert (reference_attention(q, k, v, layout) - want).abs().max() > 1e-2  # the cap matters here


def _random_layout(gen, bsel, hsel, nq, nk, causal, density, block):
    dense = torch.rand(bsel, hsel, nq, nk, generator=gen) < density
    if causal:
        dense &= torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)
    return Layout.from_dense(dense, block)


@settings(max_examples=12, deadline=None)
@given(
    batch=st.integers(1, 2),
    hkv=st.integers(1, 2),
    group=st.sampled_from([1, 2, 3]),
    nq=st.integers(1, 40),
    nk=st.integers(1, 45),
    dim=st.sampled_from([4, 8]),
    causal=st.booleans(),
    density=st.sampled_from([0.0, 0.3, 1.0]),
    block=st.sampled_from([4, 16]),
    shared=st.booleans(),
    padded=st.booleans(),
    cap=st.sampled_from([1.0, 5.0, 30.0]),
    seed=st.integers(0, 10_000),
)
def test_blocksparse_matches_reference(
    batch, hkv, group, nq, nk, dim, causal, density, block, shared, padded, cap, seed
):
    gen = torch.Generator().manual_seed(seed)
    hq = hkv * group
    layout = _random_layout(gen, 1 if shared else batch, 1 if shared else hq, nq, nk, causal, density, block)
    q, k, v = _qkv(gen, batch, hq, hkv, nq, nk, dim)
    kpm = (torch.rand(batch, nk, generator=gen) < 0.7) if padded else None
    _compare(blocksparse_attention, q, k, v, layout, kpm, cap, 1e-5)
    _compare(blocksparse_attention, q.double(), k.double(), v.double(), layout, kpm, cap, 1e-10)


def test_blocksparse_band_and_split_heads_paths():
    """A causal window (the band path, zero-copy strided tiles) and per-head layouts split per head."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = _qkv(gen, 2, 4, 2, 70, 70, 8)
    window = spattn.pattern("window(size=9, block=16)").select(q, k, causal=True)
    _compare(blocksparse_attention, q, k, v, window, None, 4.0, 1e-5)
    from spattn.kernels import blocksparse

    per_head = _random_layout(gen, 1, 4, 70, 70, True, 0.4, 16)
    old = blocksparse.SPLIT_HEADS_MIN_PAIRS
    blocksparse.SPLIT_HEADS_MIN_PAIRS = 0
    try:
        _compare(blocksparse_attention, q, k, v, per_head, None, 4.0, 1e-5)
    finally:
        blocksparse.SPLIT_HEADS_MIN_PAIRS = old


@settings(max_examples=12, deadline=None)
@given(
    batch=st.integers(1, 2),
    hkv=st.integers(1, 2),
    group=st.sampled_from([1, 2, 3]),
    nq=st.integers(1, 30),
    nk=st.integers(1, 40),
    dim=st.sampled_from([4, 8]),
    slots=st.integers(1, 12),
    unused=st.sampled_from([0.0, 0.3, 1.0]),
    padded=st.booleans(),
    cap=st.sampled_from([1.0, 5.0]),
    seed=st.integers(0, 10_000),
)
def test_tokensparse_matches_reference(batch, hkv, group, nq, nk, dim, slots, unused, padded, cap, seed):
    gen = torch.Generator().manual_seed(seed)
    hq = hkv * group
    slots = min(slots, nk)
    idx = torch.rand(batch, hq, nq, nk, generator=gen).argsort(-1)[..., :slots]
    idx = torch.where(torch.rand(idx.shape, generator=gen) < unused, -1, idx)
    sel = TokenSelection(idx, nq, nk)
    q, k, v = _qkv(gen, batch, hq, hkv, nq, nk, dim)
    kpm = (torch.rand(batch, nk, generator=gen) < 0.7) if padded else None
    layout = Layout.from_dense(sel.to_dense(), 16)
    kernel = lambda q, k, v, layout, **kw: tokensparse_attention(q, k, v, sel, **kw)
    _compare(kernel, q, k, v, layout, kpm, cap, 1e-5)
    _compare(kernel, q.double(), k.double(), v.double(), layout, kpm, cap, 1e-10)


@pytest.mark.parametrize("grad", [False, True])
def test_pagesparse_decode_matches_reference(grad):
    """One query against a cache (the page path without a cap; the token path with one)."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = _qkv(gen, 1, 4, 2, 1, 37, 8)
    pages = torch.tensor([[[[0, 3, 4]]]]).expand(1, 4, 1, 3)
    sel = PageSelection(pages, page=8, q_len=1, kv_len=37)
    layout = sel.to_layout()
    if grad:
        kernel = lambda q, k, v, layout, **kw: pagesparse_attention(q, k, v, sel, **kw)
        _compare(kernel, q, k, v, layout, None, 3.0, 1e-5)
    else:
        with torch.no_grad():
            out = pagesparse_attention(q, k, v, sel, softcap=3.0)
        want = reference_attention(q.double(), k.double(), v.double(), layout, softcap=3.0)
        assert (out.double() - want).abs().max() <= 1e-5


def test_attention_dispatch_never_drops_the_cap():
    """spattn.attention with softcap: dense fast paths step aside, every backend and selection kind agrees."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = _qkv(gen, 1, 4, 2, 33, 33, 8)
    full = Layout.from_dense(torch.ones(1, 1, 33, 33, dtype=torch.bool).tril(), 16)
    want = reference_attention(q.double(), k.double(), v.double(), full, softcap=2.0)
    for pattern, backend in ((None, "auto"), ("dense", "auto"), (None, "blocksparse"), (None, "reference")):
        got = spattn.attention(q, k, v, pattern, causal=True, backend=backend, softcap=2.0)
        assert (got.double() - want).abs().max() <= 1e-5, (pattern, backend)
    assert (spattn.attention(q, k, v, None, causal=True).double() - want).abs().max() > 1e-2
    sel = TokenSelection(
        torch.arange(33).expand(1, 4, 33, 33).tril().masked_fill(~torch.ones(33, 33, dtype=torch.bool).tril(), -1),
        33,
        33,
    )
    got = spattn.attention(q, k, v, sel, softcap=2.0)
    assert (got.double() - want).abs().max() <= 1e-5


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan, True, "5"])
def test_bad_softcap(bad):
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="softcap"):
        spattn.attention(q, q, q, softcap=bad)


def test_routing_windows_reject_softcap():
    q = torch.randn(1, 2, 32, 8)
    with pytest.raises(ValueError, match="softcap"):
        spattn.attention(q, q, q, "routing(clusters=2, window=8)", softcap=5.0)


@pytest.mark.slow
def test_flex_score_mod_matches_reference():
    from spattn.kernels.flex import flex_attention, flex_available

    if not flex_available("cpu"):
        pytest.skip("compiled FlexAttention is not available here")
    gen = torch.Generator().manual_seed(4)
    q, k, v = _qkv(gen, 1, 4, 2, 128, 128, 16)
    layout = spattn.pattern("window(size=40, block=32)").select(q, k, causal=True)
    with torch.no_grad():
        got = flex_attention(q, k, v, layout, softcap=4.0)
    want = reference_attention(q.double(), k.double(), v.double(), layout, softcap=4.0)
    assert (got.double() - want).abs().max() <= 1e-5
