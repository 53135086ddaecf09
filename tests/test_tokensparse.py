"""Token-sparse kernel against the dense fp64 reference on the same selection (forward and grads)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spattn.kernels import tokensparse
from spattn.kernels.reference import reference_attention
from spattn.kernels.tokensparse import tokensparse_attention
from spattn.layout import Layout
from spattn.selection import TokenSelection

from .helpers import assert_matches_reference, run_with_grads


def _random_selection(gen, bsel, hsel, nq, nk, slots, unused):
    """Distinct random keys per query; a fraction ``unused`` of slots set to -1."""
    idx = torch.rand(bsel, hsel, nq, nk, generator=gen).argsort(-1)[..., :slots]
    drop = torch.rand(idx.shape, generator=gen) < unused
    return TokenSelection(torch.where(drop, -1, idx), nq, nk)


def _qkv(gen, batch, hq, hkv, nq, nk, dim, dtype=torch.float32):
    return tuple(torch.randn(batch, h, n, dim, generator=gen).to(dtype) for h, n in ((hq, nq), (hkv, nk), (hkv, nk)))


def _kernel(selection):
    return lambda q, k, v, layout, **kw: tokensparse_attention(q, k, v, selection, **kw)


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(1, 2),
    hkv=st.integers(1, 2),
    group=st.sampled_from([1, 2, 3]),
    nq=st.integers(1, 40),
    nk=st.integers(1, 45),
    dim=st.sampled_from([4, 8]),
    slots=st.integers(1, 12),
    unused=st.sampled_from([0.0, 0.3, 1.0]),
    shared_batch=st.booleans(),
    shared_heads=st.booleans(),
    padded=st.booleans(),
    small_chunks=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_matches_reference_fp32_and_fp64(
    batch, hkv, group, nq, nk, dim, slots, unused, shared_batch, shared_heads, padded, small_chunks, seed
):
    gen = torch.Generator().manual_seed(seed)
    hq = hkv * group
    slots = min(slots, nk)
    sel = _random_selection(gen, 1 if shared_batch else batch, 1 if shared_heads else hq, nq, nk, slots, unused)
    q, k, v = _qkv(gen, batch, hq, hkv, nq, nk, dim)
    kpm = (torch.rand(batch, nk, generator=gen) < 0.7) if padded else None
    layout = Layout.from_dense(sel.to_dense(), 16)
    budget = tokensparse.GATHER_BUDGET
    tokensparse.GATHER_BUDGET = 1500 if small_chunks else budget  # several query chunks
    try:
        assert_matches_reference(_kernel(sel), q, k, v, layout, kpm, atol=1e-5)
        assert_matches_reference(_kernel(sel), q.double(), k.double(), v.double(), layout, kpm, atol=1e-10)
    finally:
        tokensparse.GATHER_BUDGET = budget


def test_fully_masked_rows_give_zeros_and_finite_grads():
    gen = torch.Generator().manual_seed(1)
    q, k, v = _qkv(gen, 2, 2, 1, 6, 9, 4)
    idx = torch.full((2, 2, 6, 3), -1, dtype=torch.long)
    idx[:, :, 1:3, 0] = 4
    idx[0, 1, 4] = torch.tensor([0, 8, 2])
    kpm = torch.ones(2, 9, dtype=torch.bool)
    kpm[1, 4] = False  # batch 1 rows 1-2 only had key 4: now empty
    sel = TokenSelection(idx, 6, 9)
    q.requires_grad_()
    out, lse = tokensparse_attention(q, k, v, sel, key_padding_mask=kpm, return_lse=True)
    (out.sum() + torch.where(torch.isinf(lse), 0, lse).sum()).backward()
    assert torch.equal(out[:, :, [0, 5]], torch.zeros_like(out[:, :, [0, 5]]))
    assert torch.equal(out[1, :, 1:3], torch.zeros_like(out[1, :, 1:3]))
    assert torch.isinf(lse[1, :, 1:3]).all() and torch.isfinite(lse[0, :, 1:3]).all()
    assert not torch.isnan(q.grad).any()
    assert torch.equal(q.grad[:, :, 0], torch.zeros_like(q.grad[:, :, 0]))


def test_zero_slots_selection():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (x.requires_grad_() for x in _qkv(gen, 1, 2, 2, 5, 7, 4))
    sel = TokenSelection(torch.zeros(1, 1, 5, 0, dtype=torch.long), 5, 7)
    out, lse = tokensparse_attention(q, k, v, sel, return_lse=True)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all()
    assert torch.equal(k.grad, torch.zeros_like(k))


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_half_precision_within_same_dtype_reference_error(dtype, atol):
    gen = torch.Generator().manual_seed(3)
    q, k, v = _qkv(gen, 2, 4, 2, 33, 41, 16, dtype)
    sel = _random_selection(gen, 2, 4, 33, 41, 10, 0.2)
    layout = Layout.from_dense(sel.to_dense(), 16)
    got = run_with_grads(_kernel(sel), q, k, v, layout)
    want = run_with_grads(reference_attention, q.double(), k.double(), v.double(), layout)
    ref_same = run_with_grads(reference_attention, q.float(), k.float(), v.float(), layout)
    for name, a, b, r in zip(("out", "lse", "dq", "dk", "dv"), got, want, ref_same):
        assert a.dtype == (torch.float32 if name == "lse" else dtype)
        assert not torch.isnan(a).any()
        err = (a.double() - b).abs().max().item()
        # the kernel accumulates in fp32; its error is the rounding of inputs/outputs to `dtype`
        assert err <= atol, f"{name}: {err:.3g}"
        assert (r.double() - b).abs().max().item() <= 1e-5


def test_scale_is_used():
    gen = torch.Generator().manual_seed(4)
    q, k, v = _qkv(gen, 1, 2, 2, 8, 8, 4)
    sel = _random_selection(gen, 1, 2, 8, 8, 4, 0.0)
    layout = Layout.from_dense(sel.to_dense(), 4)
    got = tokensparse_attention(q, k, v, sel, scale=0.3)
    want = reference_attention(q, k, v, layout, scale=0.3)
    assert (got - want).abs().max() <= 1e-6


def test_bad_inputs():
    gen = torch.Generator().manual_seed(5)
    q, k, v = _qkv(gen, 2, 4, 2, 6, 7, 4)
    sel = TokenSelection(torch.arange(2).expand(1, 1, 6, 2), 6, 7)
    with pytest.raises(TypeError, match="selection must be a TokenSelection"):
        tokensparse_attention(q, k, v, Layout.from_dense(torch.ones(6, 7, dtype=torch.bool), 4))
    with pytest.raises(ValueError, match="selection is for"):
        tokensparse_attention(q, k, v, TokenSelection(torch.arange(2).expand(1, 1, 6, 2), 6, 9))
    with pytest.raises(ValueError, match="batch 1 or 2"):
        tokensparse_attention(q, k, v, TokenSelection(torch.arange(2).expand(3, 1, 6, 2), 6, 7))
    with pytest.raises(ValueError, match="heads 1 or 4"):
        tokensparse_attention(q, k, v, TokenSelection(torch.arange(2).expand(1, 2, 6, 2), 6, 7))
    with pytest.raises(ValueError, match="Hq % Hkv"):
        tokensparse_attention(q[:, :3], k, v, sel)
    with pytest.raises(TypeError, match="floating"):
        tokensparse_attention(q.long(), k, v, sel)
    with pytest.raises(TypeError, match="key_padding_mask must be a bool"):
        tokensparse_attention(q, k, v, sel, key_padding_mask=torch.ones(2, 7))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        tokensparse_attention(q, k, v, sel, key_padding_mask=torch.ones(2, 6, dtype=torch.bool))


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(6)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in _qkv(gen, 2, 4, 2, 11, 13, 4))
    assert not k.is_contiguous()
    sel = _random_selection(gen, 2, 4, 11, 13, 5, 0.1)
    assert_matches_reference(_kernel(sel), q, k, v, Layout.from_dense(sel.to_dense(), 4))


@pytest.mark.parametrize("causal_slice", [False, True])
def test_decode_shape_reads_rows_without_stacking_the_cache(causal_slice):
    """One query and a few keys out of a long cache (the decode case): k and v are gathered
    separately (no [k | v] copy of the cache), also from a slice of a larger cache; fwd and grads exact."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = _qkv(gen, 2, 6, 2, 1, 300, 8)
    if causal_slice:  # the cache as a view k[:, :, :n] of a bigger buffer: not contiguous
        k, v = k[:, :, :290], v[:, :, :290]
        assert not k.is_contiguous()
    sel = _random_selection(gen, 2, 6, 1, k.shape[2], 7, 0.2)
    assert _rows_read_smaller(q, k, sel)
    assert_matches_reference(_kernel(sel), q, k, v, Layout.from_dense(sel.to_dense(), 4), atol=1e-5)
    assert_matches_reference(
        _kernel(sel), q.double(), k.double(), v.double(), Layout.from_dense(sel.to_dense(), 4), atol=1e-10
    )


def _rows_read_smaller(q, k, sel) -> bool:
    return tokensparse._rows_read(q, sel.indices) < k.shape[0] * k.shape[1] * k.shape[2]
