"""No read outside the tensors, no masked key winning, NaN exactly where the dense reference puts it
(issue 16 items 1 and 2), for every kernel: reference, block-sparse eager and compiled, token-, page-
and cluster-sparse, FlexAttention (CPU inference)."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import spattn
from spattn import _compiled
from spattn.kernels import blocksparse_cpu
from spattn.kernels.blocksparse import blocksparse_attention
from spattn.kernels.clustered import clustered_attention
from spattn.kernels.pagesparse import pagesparse_attention
from spattn.kernels.reference import nan_reach, reference_attention
from spattn.kernels.tokensparse import tokensparse_attention
from spattn.selection import ClusterSelection, PageSelection, TokenSelection

NAN = float("nan")


def _qkv(b, hq, hkv, nq, nk, d, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g) * scale
    k = torch.randn(b, hkv, nk, d, generator=g) * scale
    v = torch.randn(b, hkv, nk, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _ops():
    ops = _compiled.ops()
    if ops is None or not ops.block_sparse_blas():
        pytest.skip(f"compiled loops unavailable: {_compiled.build_error()}")
    return ops


# ---------------------------------------------------------------------- item 1: indices, counts, mask ids
@pytest.mark.parametrize("edit", ["count", "negative", "past_end", "unsorted"])
@pytest.mark.parametrize("backend", ["auto", "blocksparse", "reference"])
def test_layout_edited_in_place_raises(edit, backend):
    q, k, v = _qkv(1, 2, 2, 256, 256, 32)
    lay = spattn.pattern("window(size=8, block=32)").layout(q, k)
    if edit == "count":
        lay.kv_num_blocks[0, 0, 0] = 10**4
    elif edit == "negative":
        lay.kv_indices[0, 0, 3, 0] = -3
    elif edit == "past_end":
        lay.kv_indices[0, 0, 3, 0] = 99
    else:
        lay.kv_indices[0, 0, 3, :2] = lay.kv_indices[0, 0, 3, :2].flip(0)
    with torch.no_grad(), pytest.raises(ValueError, match="kv_num_blocks|kv_indices"):
        spattn.attention(q, k, v, lay, backend=backend)


def test_layout_edited_validly_after_a_call_is_honoured():
    """Cached block maps must follow the tables: the second call sees the edit (no stale cache)."""
    q, k, v = _qkv(1, 1, 1, 128, 128, 16)
    lay = spattn.pattern("window(size=8, block=32)").layout(q, k)
    with torch.no_grad():
        spattn.attention(q, k, v, lay, backend="blocksparse", return_lse=True)
        lay.kv_num_blocks[0, 0, 2] = 1  # query block 2 keeps only its first key block
        got = spattn.attention(q, k, v, lay, backend="blocksparse")
    want = reference_attention(q, k, v, lay)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_compiled_loop_checks_every_table_it_reads():
    ops = _ops()
    q, k, v = _qkv(1, 2, 2, 256, 256, 32)
    lay = spattn.pattern("window(size=8, block=32)").layout(q, k)
    mask_id, masks = blocksparse_cpu.partial_tile_masks(lay)
    args = [lay.kv_num_blocks, lay.kv_indices, mask_id]
    cases = [
        (0, (0, 0, 0), 10**4, "kv_num_blocks must lie in"),
        (0, (0, 0, 2), -1, "kv_num_blocks must lie in"),
        (1, (0, 0, 3, 0), -3, "kv_indices must lie in"),
        (1, (0, 0, 3, 0), 8, "kv_indices must lie in"),
        (2, (0, 0, 3, 0), masks.shape[0], "mask_id must lie in"),
        (2, (0, 0, 3, 0), -2, "mask_id must lie in"),
    ]
    for which, where, value, message in cases:
        bad = [a.clone() for a in args]
        bad[which][where] = value
        with pytest.raises(RuntimeError, match=message):
            ops.block_sparse_forward(q, k, v, *bad, masks, 32, 32, 0.1)
    with pytest.raises(RuntimeError, match="block_q and block_k"):
        ops.block_sparse_forward(q, k, v, *args, masks, 0, 32, 0.1)


def test_decode_loops_check_channels_and_shapes():
    ops = _ops()
    q = torch.randn(1, 4, 16)
    labels = torch.randn(1, 2, 3, 40)
    for bad in (16, -1):
        channels = torch.tensor([[0, 1, 2], [3, 4, bad]])
        with pytest.raises(RuntimeError, match="channels must lie in"):
            ops.group_topk(q, labels, channels, 5)
    k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 8)
    with pytest.raises(RuntimeError, match="shapes"):
        ops.shared_rows_attention(q, k, v, torch.zeros(1, 2, 3, dtype=torch.long), 0.1)


# ---------------------------------------------------------------------- item 2: masks exclude exactly
@settings(max_examples=12, deadline=None)
@given(
    st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    st.sampled_from([100.0, 300.0]),
    st.booleans(),
    st.integers(0, 1000),
)
def test_masked_keys_never_win_with_large_scores(dtype, scale, causal, seed):
    """q, k x300 in fp16: a finite mask value (finfo.min) lost to real scores; -inf never does."""
    q, k, v = _qkv(1, 2, 1, 96, 96, 16, seed=seed, scale=scale)
    lay = spattn.pattern("window(size=16)").layout(q, k, causal=causal)
    want = reference_attention(q.double(), k.double(), v.double(), lay)
    half = q.to(dtype), k.to(dtype), v.to(dtype)
    for backend in ("reference", "blocksparse"):
        got = spattn.attention(*half, lay, backend=backend).double()
        # inputs rounded to the dtype move large scores by up to ~1 unit: compare with the fp64 result on
        # the rounded inputs, where a masked key winning would be off by the value scale (~1), not 1e-2
        ref = reference_attention(*(t.double() for t in half), lay)
        assert (got - ref).abs().max() < 3e-2, backend
    assert (reference_attention(q, k, v, lay).double() - want).abs().max() < 1e-2  # fp32 scores of ~1e4: ulp 1e-3


# ---------------------------------------------------------------------- item 2: NaN placement
def _poison(q, k, v, where, pos):
    q, k, v = q.clone(), k.clone(), v.clone()
    bi, h, i, c = pos
    {"q": q, "k": k, "v": v}[where][bi, h, i, c] = NAN
    return q, k, v


def _check_nan(out, want_nan, ref=None, atol=1e-5):
    assert torch.equal(torch.isnan(out), want_nan), (int(torch.isnan(out).any(-1).sum()), int(want_nan.any(-1).sum()))
    if ref is not None:
        torch.testing.assert_close(out.nan_to_num(), ref.nan_to_num(), atol=atol, rtol=atol)


_SHAPES = st.tuples(st.integers(1, 2), st.sampled_from([(2, 1), (2, 2), (3, 1)]), st.integers(40, 130))


@settings(max_examples=20, deadline=None)
@given(
    _SHAPES,
    st.sampled_from(["q", "k", "v"]),
    st.booleans(),
    st.sampled_from(
        [
            "window(size=12, block=16)",
            "bigbird(block=16, window=1, globals=1, random=1)",
            "strided(stride=16, block=16)",
        ]
    ),
    st.integers(0, 10**6),
)
def test_nan_reaches_exactly_the_rows_that_see_it_block_layouts(shape, where, causal, spec, seed):
    b, (hq, hkv), n = shape
    q, k, v = _qkv(b, hq, hkv, n, n, 8, seed=seed)
    g = torch.Generator().manual_seed(seed)
    heads = hq if where == "q" else hkv
    pos = tuple(int(torch.randint(0, m, (1,), generator=g)) for m in (b, heads, n, 8))
    lay = spattn.pattern(spec).layout(q, k, causal=causal)
    q, k, v = _poison(q, k, v, where, pos)
    want = nan_reach(lay.to_dense(), q, k, v, where, pos)
    ref = reference_attention(q, k, v, lay)
    _check_nan(ref, want)
    with torch.no_grad():
        compiled = blocksparse_attention(q, k, v, lay)  # compiled loop where built
        _check_nan(compiled, want, ref)
    q.requires_grad_(True)  # gradients wanted: the eager plan
    eager = blocksparse_attention(q, k, v, lay)
    _check_nan(eager.detach(), want, ref)


@pytest.mark.parametrize("where", ["k", "v"])
def test_nan_in_a_padded_key_reaches_no_row(where):
    q, k, v = _qkv(2, 2, 1, 70, 70, 8)
    kpm = torch.ones(2, 70, dtype=torch.bool)
    kpm[1, 60:] = False
    q, k, v = _poison(q, k, v, where, (1, 0, 65, 3))
    lay = spattn.pattern("window(size=16, block=16)").layout(q, k, causal=False)
    for fn in (reference_attention, blocksparse_attention):
        out = fn(q, k, v, lay, key_padding_mask=kpm)
        assert not bool(torch.isnan(out).any()), fn.__name__
    sel = TokenSelection(torch.arange(70).expand(1, 1, 70, 70).clone(), 70, 70)
    assert not bool(torch.isnan(tokensparse_attention(q, k, v, sel, key_padding_mask=kpm)).any())


@settings(max_examples=15, deadline=None)
@given(_SHAPES, st.sampled_from(["q", "k", "v"]), st.integers(0, 10**6))
def test_nan_placement_token_and_page_selections(shape, where, seed):
    b, (hq, hkv), n = shape
    q, k, v = _qkv(b, hq, hkv, n, n, 8, seed=seed)
    g = torch.Generator().manual_seed(seed)
    heads = hq if where == "q" else hkv
    pos = tuple(int(torch.randint(0, m, (1,), generator=g)) for m in (b, heads, n, 8))
    q, k, v = _poison(q, k, v, where, pos)
    # token selection: 6 random keys per query, some slots unused (-1)
    idx = torch.rand(1, hq, n, n, generator=g).argsort(-1)[..., :6]
    idx[..., 4:] = torch.where(torch.rand(1, hq, n, 2, generator=g) < 0.5, -1, idx[..., 4:])
    tokens = TokenSelection(idx, n, n)
    pages = PageSelection(torch.rand(1, hq, n, (n + 7) // 8, generator=g).argsort(-1)[..., :3], 8, n, n, causal=True)
    for sel, run in ((tokens, tokensparse_attention), (pages, pagesparse_attention)):
        want = nan_reach(sel.to_dense(), q, k, v, where, pos)
        ref = reference_attention(q, k, v, sel.to_layout(16))
        _check_nan(ref, want)
        with torch.no_grad():
            _check_nan(run(q, k, v, sel), want, ref)
    # decoding: one query per head, group-shared pages (the compiled shared-rows loop where built)
    qd = q[:, :, -1:]
    shared = PageSelection(pages.pages[:, :1, -1:].expand(1, hq, 1, -1).contiguous(), 8, 1, n, causal=True)
    want = nan_reach(shared.to_dense(), qd, k, v, where, (pos[0], pos[1], 0 if where == "q" else pos[2], pos[3]))
    if where == "q" and pos[2] != n - 1:
        want[:] = False
    with torch.no_grad():
        _check_nan(pagesparse_attention(qd, k, v, shared), want, reference_attention(qd, k, v, shared.to_layout(16)))


@settings(max_examples=10, deadline=None)
@given(st.sampled_from(["q", "k", "v"]), st.booleans(), st.integers(0, 10**6))
def test_nan_placement_routing_windows(where, causal, seed):
    b, hq, hkv, n, w, c = 1, 2, 1, 64, 16, 6
    q, k, v = _qkv(b, hq, hkv, n, n, 8, seed=seed)
    g = torch.Generator().manual_seed(seed)
    windows = torch.rand(b, hq, c, n, generator=g).argsort(-1)[..., :w].sort(-1).values
    sel = ClusterSelection(windows, windows, n, n, causal=causal)
    heads = hq if where == "q" else hkv
    pos = tuple(int(torch.randint(0, m, (1,), generator=g)) for m in (b, heads, n, 8))
    q, k, v = _poison(q, k, v, where, pos)
    want = nan_reach(sel.to_dense(), q, k, v, where, pos)
    ref = clustered_attention(q, k, v, sel, reference=True)
    _check_nan(ref, want)
    _check_nan(clustered_attention(q, k, v, sel), want, ref)


def test_nan_placement_flex_cpu_inference():
    from spattn.kernels.flex import flex_attention, flex_available

    if not flex_available("cpu"):
        pytest.skip("compiled FlexAttention unavailable on this CPU")
    q, k, v = _qkv(1, 2, 1, 128, 128, 16)
    lay = spattn.pattern("window(size=16, block=32)").layout(q, k, causal=True)
    for where, pos in (("q", (0, 1, 40, 2)), ("k", (0, 0, 70, 5)), ("v", (0, 0, 90, 1))):
        qn, kn, vn = _poison(q, k, v, where, pos)
        want = nan_reach(lay.to_dense(), qn, kn, vn, where, pos)
        with torch.no_grad():
            _check_nan(flex_attention(qn, kn, vn, lay), want, reference_attention(qn, kn, vn, lay), atol=1e-4)
