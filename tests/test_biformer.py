"""BiFormer bi-level routing: brute-force definition, kernel vs reference on the selection, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spattn
from spattn.layout import Layout
from spattn.patterns.biformer import BiFormer
from spattn.patterns.reference import brute_biformer

from .helpers import assert_matches_reference


def _qkv(seed, batch, hq, hkv, n, dim, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, h, n, dim, generator=gen, dtype=dtype) for h in (hq, hkv, hkv))


@settings(max_examples=10, deadline=None)
@given(
    batch=st.integers(1, 2),
    hkv=st.integers(1, 2),
    group=st.sampled_from([1, 2]),
    regions=st.integers(1, 3),
    rh=st.integers(1, 3),
    rw=st.integers(1, 3),
    topk=st.integers(1, 9),
    per_head=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_selection_matches_brute_force(batch, hkv, group, regions, rh, rw, topk, per_head, seed):
    topk = min(topk, regions * regions)
    height, width = regions * rh, regions * rw
    q, k, _ = _qkv(seed, batch, hkv * group, hkv, height * width, 4, torch.float64)
    pat = BiFormer(regions=regions, topk=topk, grid=(height, width), per_head=per_head)
    sel = pat.select(q, k)
    assert sel.k == topk * rh * rw
    assert torch.equal(sel.to_dense(), brute_biformer(q, k, height, width, regions, topk, per_head))
    assert torch.equal(pat.layout(q, k).to_dense(), sel.to_dense())


def test_square_default_and_shared_routing():
    q, k, _ = _qkv(0, 2, 4, 2, 14 * 14, 8)
    sel = spattn.pattern("biformer").select(q, k)  # regions=7, topk=4 on a 14x14 grid
    assert sel.indices.shape == (2, 1, 196, 4 * 4)
    assert sel.pair_counts().eq(16).all()
    assert torch.equal(sel.to_dense(), brute_biformer(q, k, 14, 14, 7, 4, False))


def test_routing_follows_planted_affinity():
    # 2x2 regions of 2x2 tokens; region 0's queries align with region 3's keys only
    q = torch.zeros(1, 1, 16, 2)
    k = torch.zeros(1, 1, 16, 2)
    grid = torch.arange(16).view(4, 4)
    q[0, 0, grid[:2, :2].reshape(-1)] = torch.tensor([1.0, 0.0])
    k[0, 0, grid[2:, 2:].reshape(-1)] = torch.tensor([5.0, 0.0])
    sel = spattn.pattern("biformer(regions=2, topk=1)").select(q, k)
    assert sorted(sel.indices[0, 0, 0].tolist()) == sorted(grid[2:, 2:].reshape(-1).tolist())


@settings(max_examples=6, deadline=None)
@given(
    batch=st.integers(1, 2),
    group=st.sampled_from([1, 2]),
    per_head=st.booleans(),
    padded=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_attention_matches_reference_on_the_selection(batch, group, per_head, padded, seed):
    spec = f"biformer(regions=3, topk=2, grid=(6, 9), per_head={per_head})"
    q, k, v = _qkv(seed, batch, 2 * group, 2, 54, 8)
    kpm = (torch.rand(batch, 54, generator=torch.Generator().manual_seed(seed)) < 0.8) if padded else None
    layout = Layout.from_dense(spattn.pattern(spec).select(q, k, key_padding_mask=kpm).to_dense(), 16)

    def run(q_, k_, v_, _layout, **kw):
        return spattn.attention(q_, k_, v_, spec, **kw)

    assert_matches_reference(run, q, k, v, layout, kpm)


def test_routing_is_not_differentiated():
    q, k, v = (x.requires_grad_() for x in _qkv(1, 1, 2, 2, 16, 4))
    sel = spattn.pattern("biformer(regions=2, topk=2)").select(q, k)
    assert not sel.indices.requires_grad
    spattn.attention(q, k, v, "biformer(regions=2, topk=2)").sum().backward()
    assert torch.isfinite(q.grad).all()


def test_errors():
    q, k, _ = _qkv(0, 1, 2, 2, 20, 4)
    with pytest.raises(ValueError, match="not a square grid"):
        spattn.pattern("biformer(regions=2, topk=1)").select(q, k)
    with pytest.raises(ValueError, match="must be divisible by regions=3"):
        spattn.pattern("biformer(regions=3, topk=1, grid=(4, 5))")
    with pytest.raises(ValueError, match="holds 30 tokens but the input has 20"):
        spattn.pattern("biformer(regions=1, topk=1, grid=(5, 6))").select(q, k)
    with pytest.raises(ValueError, match="topk=5 exceeds the number of regions"):
        spattn.pattern("biformer(regions=2, topk=5)")
    with pytest.raises(ValueError, match="topk must be >= 1"):
        spattn.pattern("biformer(regions=2, topk=0)")
    with pytest.raises(TypeError, match="grid must be a"):
        spattn.pattern("biformer(regions=2, topk=1, grid=4)")
    with pytest.raises(ValueError, match="non-causal"):
        spattn.pattern("biformer(regions=1, topk=1, grid=(4, 5))").select(q, k, causal=True)
    with pytest.raises(ValueError, match="Nq == Nk"):
        spattn.pattern("biformer(regions=1, topk=1, grid=(4, 5))").select(q, k[:, :, :10])
