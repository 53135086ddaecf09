"""The eager block-sparse kernel against the dense reference: forward, lse and gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spattn
from spattn.kernels.blocksparse import blocksparse_attention
from spattn.kernels.reference import reference_attention
from spattn.layout import Layout

from .helpers import assert_matches_reference


@st.composite
def problems(draw, max_len=600):
    batch = draw(st.integers(1, 3))
    heads_kv = draw(st.integers(1, 2))
    heads_q = heads_kv * draw(st.sampled_from([1, 2, 3]))
    nq = draw(st.integers(1, max_len))
    nk = draw(st.one_of(st.just(nq), st.integers(1, max_len)))
    dim = draw(st.sampled_from([8, 16]))
    block_q = draw(st.sampled_from([8, 16, 32, 64]))
    block_k = draw(st.sampled_from([block_q, 16, 32]))
    per_batch = draw(st.booleans())
    per_head = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return batch, heads_q, heads_kv, nq, nk, dim, block_q, block_k, per_batch, per_head, seed


def _tensors(batch, heads_q, heads_kv, nq, nk, dim, seed, dtype=torch.float32, transposed=False):
    """Random q, k, v; ``transposed``: views ``[B, N, H, D] -> [B, H, N, D]`` as a transformers model
    passes them (not row-major per head)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads_q, nq, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, heads_kv, nk, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, heads_kv, nk, dim, generator=gen, dtype=torch.float64)
    out = [x.to(dtype) for x in (q, k, v)]
    if transposed:
        out = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in out]
    return (*out, gen)


def _random_layout(kind, batch, heads, nq, nk, block_q, block_k, gen):
    """Random layouts exercising every Layout feature the kernel reads."""
    nqb, nkb = -(-nq // block_q), -(-nk // block_k)
    if kind == "dense_mask":
        density = float(torch.rand(1, generator=gen)) * 0.5
        mask = torch.rand(batch, heads, nq, nk, generator=gen) < density
        mask[..., : max(1, nq // 7), :] = False  # some fully masked rows
        return Layout.from_dense(mask, block_q, block_k)
    # block map + a window-like predicate in partial tiles + optional columns
    block_map = torch.rand(batch, heads, nqb, nkb, generator=gen) < 0.4
    full_map = block_map & (torch.rand(batch, heads, nqb, nkb, generator=gen) < 0.5)
    width = int(torch.randint(1, 40, (1,), generator=gen))
    offset = nk - nq

    def near_diagonal(b, h, q_idx, kv_idx):
        return (q_idx + offset - kv_idx).abs() <= width + h

    column_map = None
    if kind == "columns":
        column_map = torch.rand(batch, heads, nqb, nk, generator=gen) < 0.05
    return Layout.from_block_map(
        block_map,
        q_len=nq,
        kv_len=nk,
        block_q=block_q,
        block_k=block_k,
        full_map=full_map,
        mask_mod=near_diagonal,
        column_map=column_map,
    )


@settings(max_examples=40)
@given(problems(), st.sampled_from(["dense_mask", "blocks", "columns"]), st.booleans())
@pytest.mark.slow
def test_random_layouts_match_reference(problem, kind, padded):
    batch, hq, hkv, nq, nk, dim, bq, bk, per_batch, per_head, seed = problem
    q, k, v, gen = _tensors(batch, hq, hkv, nq, nk, dim, seed)
    layout = _random_layout(kind, batch if per_batch else 1, hq if per_head else 1, nq, nk, bq, bk, gen)
    kpm = torch.rand(batch, nk, generator=gen) < 0.8 if padded else None
    assert_matches_reference(blocksparse_attention, q, k, v, layout, kpm)


@settings(max_examples=25)
@given(problems(), st.booleans(), st.booleans())
@pytest.mark.slow
def test_dense_and_causal_match_reference(problem, causal, transposed):
    batch, hq, hkv, nq, nk, dim, bq, bk, *_, seed = problem
    q, k, v, _ = _tensors(batch, hq, hkv, nq, nk, dim, seed, transposed=transposed)
    layout = spattn.pattern("dense", block=bq).layout(q, k, causal=causal)
    assert_matches_reference(blocksparse_attention, q, k, v, layout)


@pytest.mark.parametrize(
    "spec",
    [
        "dense(block=16)",
        "window(size=20, block=16)",
        "window(size=0, block=16)",
        "xattention(threshold=0.5, stride=4, block=16)",
        "block_topk(k=1, block=16)",
    ],
)
@pytest.mark.parametrize("heads", [(2, 2), (1, 3)])  # (batch, kv heads)
def test_transposed_inputs_with_band_keys(spec, heads):
    """Keys/values that are transposed views (as transformers passes them) and a key band needing no
    padding: the band's strided view must read row-major keys (regression: it read the view's storage)."""
    batch, hkv = heads
    q, k, v, _ = _tensors(batch, 2 * hkv, hkv, 64, 64, 8, 3, transposed=True)
    assert not k.is_contiguous()
    layout = spattn.pattern(spec).select(q, k, causal=True)  # band of only the diagonal tile: no padding
    assert_matches_reference(blocksparse_attention, q, k, v, layout)


@settings(max_examples=10)
@given(problems(max_len=200), st.sampled_from(["dense_mask", "blocks", "columns"]))
@pytest.mark.slow
def test_float64_to_1e10(problem, kind):
    batch, hq, hkv, nq, nk, dim, bq, bk, per_batch, per_head, seed = problem
    q, k, v, gen = _tensors(batch, hq, hkv, nq, nk, dim, seed, torch.float64)
    layout = _random_layout(kind, 1, hq if per_head else 1, nq, nk, bq, bk, gen)
    assert_matches_reference(blocksparse_attention, q, k, v, layout, atol=1e-10)


@pytest.mark.parametrize("kind", ["dense_mask", "blocks", "columns"])
def test_bfloat16_within_twice_reference_error(kind):
    q, k, v, gen = _tensors(2, 4, 2, 333, 301, 32, seed=7, dtype=torch.float64)
    layout = _random_layout(kind, 1, 4, 333, 301, 32, 32, gen)
    gold = reference_attention(q, k, v, layout)
    qb, kb, vb = (x.to(torch.bfloat16) for x in (q, k, v))
    ref_bf16 = reference_attention(qb.float(), kb.float(), vb.float(), layout).to(torch.bfloat16)
    got = blocksparse_attention(qb, kb, vb, layout)
    assert got.dtype == torch.bfloat16
    ref_err = (ref_bf16.double() - gold).abs().max().item()
    err = (got.double() - gold).abs().max().item()
    assert err <= 2 * ref_err, (err, ref_err)


def test_fully_masked_rows_give_zeros_and_zero_grads():
    q, k, v, _ = _tensors(1, 2, 2, 70, 70, 16, seed=1)
    mask = torch.rand(70, 70) < 0.3
    mask[10:30] = False
    layout = Layout.from_dense(mask, 16)
    q.requires_grad_()
    out, lse = blocksparse_attention(q, k, v, layout, return_lse=True)
    assert torch.all(out[:, :, 10:30] == 0)
    assert torch.all(torch.isneginf(lse[:, :, 10:30]))
    out.sum().backward()
    assert torch.all(q.grad[:, :, 10:30] == 0)
    assert not torch.isnan(q.grad).any()


def test_everything_masked_by_key_padding():
    q, k, v, _ = _tensors(2, 2, 1, 40, 50, 8, seed=2)
    layout = spattn.pattern("dense", block=16).layout(q, k)
    kpm = torch.zeros(2, 50, dtype=torch.bool)
    kpm[1, :5] = True
    for x in (q, k, v):
        x.requires_grad_()
    out = blocksparse_attention(q, k, v, layout, key_padding_mask=kpm)
    assert torch.all(out[0] == 0)
    out.sum().backward()
    assert not any(torch.isnan(x.grad).any() for x in (q, k, v))
    assert torch.all(k.grad[0] == 0) and torch.all(k.grad[1, :, 5:] == 0)


def test_small_chunks_give_the_same_result():
    q, k, v, gen = _tensors(1, 2, 1, 257, 257, 16, seed=3)
    layout = _random_layout("columns", 1, 2, 257, 257, 16, 16, gen)
    a = blocksparse_attention(q, k, v, layout)
    b = blocksparse_attention(q, k, v, layout, chunk_elems=1)  # one query tile per chunk
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@settings(max_examples=25)
@given(problems(max_len=300), st.sampled_from(["dense_mask", "blocks", "columns"]), st.booleans())
@pytest.mark.slow
def test_per_head_split_matches_reference(problem, kind, padded):
    """Per-head layouts run one call per head (forced here): same values and gradients."""
    from unittest import mock

    import spattn.kernels.blocksparse as bs

    batch, hq, hkv, nq, nk, dim, bq, bk, per_batch, _, seed = problem
    q, k, v, gen = _tensors(batch, hq, hkv, nq, nk, dim, seed)
    layout = _random_layout(kind, batch if per_batch else 1, hq, nq, nk, bq, bk, gen)
    kpm = torch.rand(batch, nk, generator=gen) < 0.8 if padded else None
    with mock.patch.object(bs, "_split_heads_pays", lambda lay, heads_q, pairs: lay.heads == heads_q > 1):
        assert_matches_reference(blocksparse_attention, q, k, v, layout, kpm)
    for h in range(hq):
        assert torch.equal(layout.head(h).to_dense(), layout.to_dense()[:, h : h + 1])


def test_split_heads_only_when_heads_differ_in_width():
    from spattn.kernels.blocksparse import _split_heads_pays

    nqb = 64
    uneven = torch.ones(1, 4, nqb, nqb, dtype=torch.bool).tril()
    uneven[:, 1:] &= ~torch.ones(nqb, nqb, dtype=torch.bool).tril(-2)  # heads 1-3: a narrow band
    lay = Layout.from_block_map(uneven, q_len=nqb * 64, kv_len=nqb * 64, block_q=64)
    assert _split_heads_pays(lay, 4, lay.q_len * lay.kv_len)
    even = Layout.from_block_map(uneven[:, 1:2].expand(1, 4, nqb, nqb), q_len=nqb * 64, kv_len=nqb * 64, block_q=64)
    assert not _split_heads_pays(even, 4, even.q_len * even.kv_len)
    assert not _split_heads_pays(lay, 4, 1000)  # short: one call
    with pytest.raises(ValueError, match="index must be an int"):
        lay.head(4)
