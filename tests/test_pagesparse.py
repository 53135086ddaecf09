"""PageSelection and the page-sparse kernel against brute force and the dense reference."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import spattn
from spattn.kernels.pagesparse import pagesparse_attention
from spattn.patterns.reference import brute_page_dense
from spattn.selection import PageSelection


def _random_pages(b, h, nq, nk, page, slots, seed, unused=0.2):
    """Distinct page ids per query row (some slots unused)."""
    g = torch.Generator().manual_seed(seed)
    num = -(-nk // page)
    rows = []
    for _ in range(b * h * nq):
        perm = torch.randperm(num, generator=g)[:slots]
        if len(perm) < slots:
            perm = torch.cat([perm, torch.full((slots - len(perm),), -1)])
        drop = torch.rand(slots, generator=g) < unused
        rows.append(torch.where(drop, -1, perm))
    return torch.stack(rows).view(b, h, nq, slots)


def _qkv(b, hq, hkv, nq, nk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, hq, nq, d, generator=g, dtype=dtype),
        torch.randn(b, hkv, nk, d, generator=g, dtype=dtype),
        torch.randn(b, hkv, nk, d, generator=g, dtype=dtype),
    )


shapes = st.tuples(
    st.integers(1, 2),
    st.sampled_from([(1, 1), (4, 2), (6, 3)]),
    st.integers(1, 5),
    st.integers(1, 90),
    st.sampled_from([1, 4, 16]),
    st.integers(1, 6),
    st.booleans(),
    st.booleans(),
    st.integers(0, 10_000),
)


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_selection_semantics_and_kernel_match_reference(shape):
    b, (hq, hkv), nq, nk, page, slots, causal, per_head, seed = shape
    nq = min(nq, nk)
    sel = PageSelection(_random_pages(b, hq if per_head else 1, nq, nk, page, slots, seed), page, nq, nk, causal)
    want = brute_page_dense(sel)
    assert torch.equal(sel.to_dense(), want)
    assert torch.equal(sel.pair_counts(), want.sum(-1))
    for dtype, atol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        q, k, v = _qkv(b, hq, hkv, nq, nk, 8, dtype, seed)
        with torch.no_grad():  # the page path
            out, lse = pagesparse_attention(q, k, v, sel, return_lse=True)
        ref, ref_lse = spattn.attention(q.double(), k.double(), v.double(), sel, backend="reference", return_lse=True)
        assert (out.double() - ref).abs().max() <= atol
        empty = ~want.expand(b, hq, nq, nk).any(-1)
        assert torch.isneginf(lse[empty]).all() and (out[empty] == 0).all()
        assert torch.allclose(lse[~empty].double(), ref_lse[~empty], atol=atol)


def test_gradients_and_padding_take_the_token_path():
    q, k, v = _qkv(2, 4, 2, 3, 45, 8, torch.float32)
    sel = PageSelection(_random_pages(2, 4, 3, 45, 4, 5, 1, unused=0.0), 4, 3, 45, causal=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = spattn.attention(*leaves, sel)
    out.square().sum().backward()
    ref_leaves = [t.double().clone().requires_grad_() for t in (q, k, v)]
    ref = spattn.attention(*ref_leaves, sel, backend="reference")
    ref.square().sum().backward()
    assert (out.double() - ref).abs().max() <= 1e-5
    for a, r in zip(leaves, ref_leaves):
        assert (a.grad.double() - r.grad).abs().max() <= 1e-5
    kpm = torch.ones(2, 45, dtype=torch.bool)
    kpm[1, 30:] = False
    with torch.no_grad():
        got = spattn.attention(q, k, v, sel, key_padding_mask=kpm)
    want = spattn.attention(q.double(), k.double(), v.double(), sel, backend="reference", key_padding_mask=kpm)
    assert (got.double() - want).abs().max() <= 1e-5


def test_decode_on_cache_slice_and_transposed_keys(monkeypatch):
    """A cache slice k[:, :, :n] is read in place (never through token indices); a column-major
    view falls back to the token path and agrees."""
    import spattn.kernels.pagesparse as pagesparse

    token_path = pagesparse.tokensparse_attention
    calls = []
    monkeypatch.setattr(pagesparse, "tokensparse_attention", lambda *a, **kw: calls.append(1) or token_path(*a, **kw))
    b, hq, hkv, d, page = 1, 6, 2, 16, 8
    big_k, big_v = torch.randn(b, hkv, 200, d), torch.randn(b, hkv, 200, d)
    q = torch.randn(b, hq, 1, d)
    for n in (64, 77, 8, 5):
        k, v = big_k[:, :, :n], big_v[:, :, :n]
        num = -(-n // page)
        pages = torch.stack([torch.randperm(num)[: min(3, num)] for _ in range(hq)]).view(1, hq, 1, -1)
        sel = PageSelection(pages, page, 1, n, causal=True)
        with torch.no_grad():
            out = spattn.attention(q, k, v, sel)
            assert not calls
            column_major = k.transpose(2, 3).contiguous().transpose(2, 3)  # same values, stride 1 along N
            flipped = spattn.attention(q, column_major, v, sel)
        ref = spattn.attention(q.double(), k.double(), v.double(), sel, backend="reference")
        assert (out.double() - ref).abs().max() <= 1e-5
        assert (flipped.double() - ref).abs().max() <= 1e-5 and calls
        calls.clear()


def test_bad_page_selections():
    with pytest.raises(ValueError, match="page must be an int"):
        PageSelection(torch.zeros(1, 1, 1, 1, dtype=torch.long), 0, 1, 10)
    with pytest.raises(ValueError, match=r"must lie in \[-1, 3\)"):
        PageSelection(torch.tensor([[[[3]]]]), 4, 1, 10)
    with pytest.raises(TypeError, match="int64"):
        PageSelection(torch.zeros(1, 1, 1, 1), 4, 1, 10)
    sel = PageSelection(torch.zeros(1, 1, 1, 1, dtype=torch.long), 4, 1, 10)
    with pytest.raises(ValueError, match="flex"):
        spattn.attention(*_qkv(1, 1, 1, 1, 10, 4, torch.float32), sel, backend="flex")
    with pytest.raises(ValueError, match=r"\(Nq, Nk\)"):
        spattn.attention(*_qkv(1, 1, 1, 1, 12, 4, torch.float32), sel)


@settings(max_examples=25, deadline=None)
@given(shapes)
def test_pages_shared_by_a_query_group_match_reference(shape):
    b, (hq, hkv), nq, nk, page, slots, causal, _, seed = shape
    nq, g = min(nq, nk), hq // hkv
    per_kv = _random_pages(b, hkv, nq, nk, page, slots, seed)
    sel = PageSelection(per_kv.repeat_interleave(g, dim=1), page, nq, nk, causal, shared_by=g)
    q, k, v = _qkv(b, hq, hkv, nq, nk, 8, torch.float64, seed)
    with torch.no_grad():
        out, lse = pagesparse_attention(q, k, v, sel, return_lse=True)
    ref, ref_lse = spattn.attention(q, k, v, sel, backend="reference", return_lse=True)
    assert (out - ref).abs().max() <= 1e-10
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite) and torch.allclose(lse[finite], ref_lse[finite], atol=1e-10)


def test_shared_by_is_checked():
    pages = torch.tensor([[[[0]], [[1]]]])  # two heads, different pages
    with pytest.raises(ValueError, match="rows of a group of 2 heads differ"):
        PageSelection(pages, 4, 1, 10, shared_by=2)
    with pytest.raises(ValueError, match="shared_by must be a positive int dividing"):
        PageSelection(pages, 4, 1, 10, shared_by=3)
    assert PageSelection(pages, 4, 1, 10, shared_by=1).shared_by == 1
