"""Fuzz: bad inputs to spattn.attention, spattn.pattern, Layout constructors and the selections."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import spattn
from spattn import ClusterSelection, Layout, PageSelection, TokenSelection, attention
from spattn.registry import parse_spec

from ._table import Bad, check, check_message, params, time_limit


def qkv(b=1, hq=2, hkv=2, nq=8, nk=8, d=4, dtype=torch.float32):
    return (
        torch.randn(b, hq, nq, d, dtype=dtype),
        torch.randn(b, hkv, nk, d, dtype=dtype),
        torch.randn(b, hkv, nk, d, dtype=dtype),
    )


Q, K, V = qkv()
L = torch.long


def att(*args, **kw):
    return lambda: attention(*args, **kw)


def layout(**kw):
    base = dict(
        kv_num_blocks=torch.ones(1, 1, 2, dtype=L),
        kv_indices=torch.zeros(1, 1, 2, 1, dtype=L),
        q_len=8,
        kv_len=8,
        block_q=4,
    )
    base.update(kw)
    num, idx = base.pop("kv_num_blocks"), base.pop("kv_indices")
    return lambda: Layout(num, idx, **base)


def from_block_map(block_map=None, **kw):
    bm = torch.ones(1, 1, 2, 2, dtype=torch.bool) if block_map is None else block_map
    base = dict(q_len=8, kv_len=8, block_q=4)
    base.update(kw)
    return lambda: Layout.from_block_map(bm, **base)


def from_dense(mask=None, *args, **kw):
    m = torch.ones(8, 8, dtype=torch.bool) if mask is None else mask
    return lambda: Layout.from_dense(m, *args, **kw)


VE, TE = ValueError, TypeError
EITHER = (ValueError, TypeError)

ATTENTION = [
    Bad("q-list", att([[1.0]], K, V), TE, "q"),
    Bad("k-none", att(Q, None, V), TE, "k must be a torch.Tensor"),
    Bad("v-ndarray", att(Q, K, np.zeros((1, 2, 8, 4))), TE, "v must be a torch.Tensor"),
    Bad("q-3d", att(Q[0], K, V), VE, "q must be 4-D"),
    Bad("k-5d", att(Q, K[None], V), VE, "k must be 4-D"),
    Bad("q-int", att(Q.long(), K, V), TE, "q must be float"),
    Bad("q-bool", att(Q > 0, K, V), TE, "q must be float"),
    Bad("v-complex", att(Q, K, torch.complex(V, V)), TE, "v must be float"),
    Bad("q-empty", att(Q[:, :, :0], K, V), VE, "q must not have an empty dimension"),
    Bad("k-empty-d", att(Q, K[..., :0], V), VE, "k must not have an empty dimension"),
    Bad("dtype-mix", att(Q.double(), K, V), TE, "share one dtype"),
    Bad("kv-shape", att(Q, K, V[:, :, :4]), VE, "k and v must have the same shape"),
    Bad("batch", att(Q, *qkv(b=2)[1:]), VE, "batch size"),
    Bad("head-dim", att(Q, *qkv(d=8)[1:]), VE, "head dim"),
    Bad("gqa", att(torch.randn(1, 3, 8, 4), K, V), VE, "multiple of key/value heads"),
    Bad("causal-int", att(Q, K, V, causal=1), TE, "causal"),
    Bad("causal-str", att(Q, K, V, causal="yes"), TE, "causal"),
    Bad("return-lse-int", att(Q, K, V, return_lse=0), TE, "return_lse"),
    Bad("scale-zero", att(Q, K, V, scale=0.0), VE, "scale"),
    Bad("scale-neg", att(Q, K, V, scale=-1), VE, "scale"),
    Bad("scale-nan", att(Q, K, V, scale=float("nan")), VE, "scale"),
    Bad("scale-inf", att(Q, K, V, scale=float("inf")), VE, "scale"),
    Bad("scale-bool", att(Q, K, V, scale=True), VE, "scale"),
    Bad("scale-str", att(Q, K, V, scale="0.5"), VE, "scale"),
    Bad("scale-tensor2", att(Q, K, V, scale=torch.ones(2)), VE, "scale"),
    Bad("scale-np-nan", att(Q, K, V, scale=np.float32("nan")), VE, "scale"),
    Bad("scale-np-neg", att(Q, K, V, scale=np.float64(-0.5)), VE, "scale"),
    Bad("scale-np-bool", att(Q, K, V, scale=np.bool_(True)), VE, "scale"),
    Bad("backend-unknown", att(Q, K, V, backend="cuda"), VE, "backend"),
    Bad("backend-none", att(Q, K, V, backend=None), VE, "backend"),
    Bad("backend-flex-tokens", att(Q, K, V, "topk(k=2)", backend="flex"), VE, "backend='flex'"),
    Bad("kpm-float", att(Q, K, V, key_padding_mask=torch.ones(1, 8)), TE, "key_padding_mask"),
    Bad("kpm-list", att(Q, K, V, key_padding_mask=[[True] * 8]), TE, "key_padding_mask"),
    Bad("kpm-shape", att(Q, K, V, key_padding_mask=torch.ones(1, 7, dtype=torch.bool)), VE, "key_padding_mask"),
    Bad("kpm-3d", att(Q, K, V, key_padding_mask=torch.ones(1, 1, 8, dtype=torch.bool)), VE, "key_padding_mask"),
    Bad("pattern-int", att(Q, K, V, 5), TE, "pattern"),
    Bad("pattern-unknown", att(Q, K, V, "windw(size=2)"), VE, "unknown attention mechanism 'windw'"),
    Bad("pattern-syntax", att(Q, K, V, "window(size=)"), VE, "cannot parse spec"),
    Bad("pattern-empty", att(Q, K, V, ""), VE, "spec"),
    Bad("pattern-kwarg", att(Q, K, V, "window(width=3)"), VE, "width"),
    Bad("pattern-bad-value", att(Q, K, V, "window(size=-3)"), VE, "size"),
    Bad("pattern-approx", att(Q, K, V, "performer"), EITHER, "performer"),
    Bad(
        "layout-causal",
        att(Q, K, V, spattn.pattern("window(size=2, block=4)").layout(Q, K), causal=True),
        VE,
        "causal=True cannot be combined",
    ),
    Bad(
        "layout-len",
        att(Q, K, V, spattn.pattern("window(size=2, block=4)").layout(*qkv(nq=12, nk=12)[:2])),
        VE,
        "layout is for (Nq, Nk)",
    ),
    Bad("layout-heads", att(Q, K, V, spattn.pattern("topk(k=2)").layout(*qkv(hq=4, hkv=4)[:2])), VE, "head count"),
    Bad("tokensel-len", att(Q, K, V, TokenSelection(torch.zeros(1, 1, 4, 1, dtype=L), 4, 8)), VE, "selection is for"),
    Bad("pagesel-batch", att(Q, K, V, PageSelection(torch.zeros(3, 1, 8, 1, dtype=L), 4, 8, 8)), VE, "batch size"),
    Bad(
        "cluster-causal",
        att(
            Q,
            K,
            V,
            ClusterSelection(torch.zeros(1, 1, 1, 2, dtype=L), torch.zeros(1, 1, 1, 2, dtype=L), 8, 8),
            causal=True,
        ),
        VE,
        "causal=True",
    ),
    Bad(
        "cluster-backend",
        att(
            Q,
            K,
            V,
            ClusterSelection(torch.zeros(1, 1, 1, 2, dtype=L), torch.zeros(1, 1, 1, 2, dtype=L), 8, 8),
            backend="blocksparse",
        ),
        VE,
        "backend",
    ),
    Bad("quest-causal-long-q", att(*qkv(nq=12, nk=8), "quest(page=2, budget=4)", causal=True), VE, "Nq"),
]

PATTERN = [
    Bad("pattern-none", lambda: spattn.pattern(None), TE, "spec"),
    Bad("pattern-int", lambda: spattn.pattern(3), TE, "spec"),
    Bad("pattern-bytes", lambda: spattn.pattern(b"window(size=3)"), TE, "spec"),
    Bad("pattern-blank", lambda: spattn.pattern("   "), VE, "non-empty"),
    Bad("pattern-unknown", lambda: spattn.pattern("nope"), VE, "unknown attention mechanism 'nope'"),
    Bad("pattern-positional", lambda: spattn.pattern("window(3)"), VE, "by keyword"),
    Bad("pattern-starstar", lambda: spattn.pattern("window(**{'size': 3})"), VE, "'**'"),
    Bad(
        "pattern-call-value", lambda: spattn.pattern("window(size=__import__('os').getpid())"), VE, "cannot parse value"
    ),
    Bad("pattern-attr", lambda: spattn.pattern("os.path(size=3)"), VE, "cannot parse spec"),
    Bad("pattern-lambda", lambda: spattn.pattern("window(size=lambda: 3)"), VE, "cannot parse value"),
    Bad("pattern-unclosed", lambda: spattn.pattern("window(size=3"), VE, "cannot parse spec"),
    Bad("pattern-two-exprs", lambda: spattn.pattern("window(size=3); dense"), VE, "cannot parse spec"),
    Bad("pattern-subscript", lambda: spattn.pattern("window[3]"), VE, "cannot parse spec"),
    Bad("pattern-nul", lambda: spattn.pattern("window(size=3)\x00"), VE, "spec"),
    Bad("pattern-kw-override", lambda: spattn.pattern("window", size="big"), TE, "size"),
    Bad("pattern-unknown-kw", lambda: spattn.pattern("window", size=3, width=3), VE, "width"),
    Bad("pattern-deep", lambda: spattn.pattern("window(size=" + "(" * 5000 + "3" + ")" * 5000 + ")"), VE, "spec"),
    Bad("pattern-dup-kw", lambda: spattn.pattern("window(size=1, size=200)"), VE, "size"),
    Bad("pattern-layer-mech", lambda: spattn.pattern("seqboat"), EITHER, "seqboat"),
    Bad("pattern-select-q", lambda: spattn.pattern("window(size=2)").layout("q", K), TE, "q"),
    Bad("pattern-select-k3d", lambda: spattn.pattern("window(size=2)").layout(Q, K[0]), VE, "k"),
    Bad("quest-select-causal-str", lambda: spattn.pattern("quest").select(Q, K, causal="no"), TE, "causal"),
]

LAYOUT = [
    Bad("q_len-float", layout(q_len=8.0), TE, "q_len"),
    Bad("kv_len-zero", layout(kv_len=0), VE, "kv_len"),
    Bad("block_q-bool", layout(block_q=True), TE, "block_q"),
    Bad("block_k-neg", layout(block_k=-4), VE, "block_k"),
    Bad("block_q-np-float", layout(block_q=np.float32(4)), TE, "block_q"),
    Bad("mask_mod-str", layout(mask_mod="causal"), TE, "mask_mod"),
    Bad("num-float", layout(kv_num_blocks=torch.ones(1, 1, 2)), TE, "kv_num_blocks"),
    Bad("num-list", layout(kv_num_blocks=[[[1, 1]]]), TE, "kv_num_blocks"),
    Bad("num-2d", layout(kv_num_blocks=torch.ones(1, 2, dtype=L)), VE, "kv_num_blocks"),
    Bad("num-nqb", layout(kv_num_blocks=torch.ones(1, 1, 3, dtype=L)), VE, "kv_num_blocks"),
    Bad("num-neg", layout(kv_num_blocks=-torch.ones(1, 1, 2, dtype=L)), VE, "kv_num_blocks"),
    Bad("num-over", layout(kv_num_blocks=torch.full((1, 1, 2), 5, dtype=L)), VE, "kv_num_blocks"),
    Bad("idx-bool", layout(kv_indices=torch.zeros(1, 1, 2, 1, dtype=torch.bool)), TE, "kv_indices"),
    Bad("idx-3d", layout(kv_indices=torch.zeros(1, 1, 2, dtype=L)), VE, "kv_indices"),
    Bad("idx-shape", layout(kv_indices=torch.zeros(1, 2, 2, 1, dtype=L)), VE, "kv_indices"),
    Bad("idx-range", layout(kv_indices=torch.full((1, 1, 2, 1), 2, dtype=L)), VE, "kv_indices"),
    Bad("idx-neg", layout(kv_indices=torch.full((1, 1, 2, 1), -1, dtype=L)), VE, "kv_indices"),
    Bad(
        "idx-repeat",
        layout(kv_num_blocks=torch.full((1, 1, 2), 2, dtype=L), kv_indices=torch.zeros(1, 1, 2, 2, dtype=L)),
        VE,
        "repeat",
    ),
    Bad("full-float", layout(full=torch.ones(1, 1, 2, 1)), EITHER, "full"),
    Bad("full-shape", layout(full=torch.ones(1, 1, 2, 2, dtype=torch.bool)), VE, "full"),
    Bad("cols-alone", layout(col_num=torch.ones(1, 1, 2, dtype=L)), VE, "col_num and col_indices"),
    Bad(
        "cols-range",
        layout(col_num=torch.ones(1, 1, 2, dtype=L), col_indices=torch.full((1, 1, 2, 1), 8, dtype=L)),
        VE,
        "col_indices",
    ),
    Bad(
        "cols-num-over",
        layout(col_num=torch.full((1, 1, 2), 2, dtype=L), col_indices=torch.full((1, 1, 2, 1), 5, dtype=L)),
        VE,
        "col_num",
    ),
    Bad(
        "cols-float",
        layout(col_num=torch.ones(1, 1, 2, dtype=L), col_indices=torch.full((1, 1, 2, 1), 5.0)),
        TE,
        "col_indices",
    ),
    Bad(
        "cols-shape",
        layout(col_num=torch.ones(1, 2, 2, dtype=L), col_indices=torch.full((1, 2, 2, 1), 5, dtype=L)),
        VE,
        "col_num",
    ),
    # from_block_map
    Bad("bm-float", from_block_map(torch.ones(1, 1, 2, 2)), EITHER, "block_map"),
    Bad("bm-list", from_block_map([[True]]), EITHER, "block_map"),
    Bad("bm-3d", from_block_map(torch.ones(1, 2, 2, dtype=torch.bool)), VE, "block_map"),
    Bad("bm-width", from_block_map(torch.ones(1, 1, 2, 3, dtype=torch.bool)), VE, "block_map"),
    Bad("bm-rows", from_block_map(torch.ones(1, 1, 3, 2, dtype=torch.bool)), VE, "block_map"),
    Bad("bm-empty", from_block_map(torch.ones(1, 1, 2, 0, dtype=torch.bool)), VE, "block_map"),
    Bad("bm-block0", from_block_map(block_q=0), VE, "block_q"),
    Bad("bm-qlen-str", from_block_map(q_len="8"), TE, "q_len"),
    Bad("bm-full-shape", from_block_map(full_map=torch.ones(1, 1, 2, 1, dtype=torch.bool)), VE, "full_map"),
    Bad("bm-full-float", from_block_map(full_map=torch.ones(1, 1, 2, 2)), VE, "full_map"),
    Bad("bm-full-list", from_block_map(full_map=[[True]]), EITHER, "full_map"),
    Bad("bm-col-width", from_block_map(column_map=torch.zeros(1, 1, 2, 5, dtype=torch.bool)), VE, "column_map"),
    Bad("bm-col-float", from_block_map(column_map=torch.zeros(1, 1, 2, 8)), EITHER, "column_map"),
    Bad("bm-col-3d", from_block_map(column_map=torch.zeros(2, 8, dtype=torch.bool)), VE, "column_map"),
    Bad("bm-col-rows", from_block_map(column_map=torch.zeros(1, 1, 3, 8, dtype=torch.bool)), VE, "column_map"),
    Bad("bm-col-list", from_block_map(column_map=[[True]]), EITHER, "column_map"),
    Bad("bm-mask-mod", from_block_map(mask_mod=3), TE, "mask_mod"),
    # from_dense
    Bad("dense-block0", from_dense(None, 0), VE, "block_q"),
    Bad("dense-blockk0", from_dense(None, 4, 0), VE, "block_k"),
    Bad("dense-block-neg", from_dense(None, -2), VE, "block_q"),
    Bad("dense-block-float", from_dense(None, 2.5), TE, "block_q"),
    Bad("dense-block-str", from_dense(None, "4"), TE, "block_q"),
    Bad("dense-block-bool", from_dense(None, True), TE, "block_q"),
    Bad("dense-block-none", from_dense(None, None), TE, "block_q"),
    Bad("dense-float", from_dense(torch.ones(8, 8), 4), TE, "mask"),
    Bad("dense-list", from_dense([[True]], 4), TE, "mask"),
    Bad("dense-1d", from_dense(torch.ones(8, dtype=torch.bool), 4), VE, "mask"),
    Bad("dense-3d", from_dense(torch.ones(1, 8, 8, dtype=torch.bool), 4), VE, "mask"),
    Bad("dense-empty", from_dense(torch.ones(0, 8, dtype=torch.bool), 4), VE, "mask"),
    # methods
    Bad("head-index", lambda: Layout.from_dense(torch.ones(1, 2, 8, 8, dtype=torch.bool), 4).head(5), VE, "index"),
    Bad(
        "head-index-str", lambda: Layout.from_dense(torch.ones(1, 2, 8, 8, dtype=torch.bool), 4).head("0"), VE, "index"
    ),
    Bad("union-type", lambda: spattn.pattern("window(size=2)").layout(Q, K) | 3, TE, "Layout"),
    Bad(
        "union-len",
        lambda: (
            spattn.pattern("window(size=2, block=4)").layout(Q, K)
            | spattn.pattern("window(size=2, block=4)").layout(*qkv(nq=12, nk=12)[:2])
        ),
        VE,
        "q_len",
    ),
]

TOK = torch.arange(2).expand(1, 1, 8, 2).clone()
SELECTIONS = [
    Bad("tok-float", lambda: TokenSelection(TOK.float(), 8, 8), TE, "indices"),
    Bad("tok-int32", lambda: TokenSelection(TOK.int(), 8, 8), TE, "indices"),
    Bad("tok-list", lambda: TokenSelection([[0]], 8, 8), TE, "indices"),
    Bad("tok-3d", lambda: TokenSelection(TOK[0], 8, 8), VE, "indices"),
    Bad("tok-qlen", lambda: TokenSelection(TOK, 9, 8), VE, "q_len"),
    Bad("tok-range", lambda: TokenSelection(TOK + 8, 8, 8), VE, "indices"),
    Bad("tok-neg", lambda: TokenSelection(TOK - 2, 8, 8), VE, "indices"),
    Bad("tok-qlen-str", lambda: TokenSelection(TOK, "8", 8), TE, "q_len"),
    Bad("tok-kvlen-float", lambda: TokenSelection(TOK, 8, 8.0), TE, "kv_len"),
    Bad("tok-kvlen-zero", lambda: TokenSelection(TOK, 8, 0), VE, "kv_len"),
    Bad("tok-dup", lambda: TokenSelection(torch.tensor([[[[1, 1]]]]), 1, 8), VE, "repeat"),
    Bad("page-float", lambda: PageSelection(TOK.float(), 4, 8, 8), TE, "pages"),
    Bad("page-page0", lambda: PageSelection(TOK, 0, 8, 8), VE, "page"),
    Bad("page-page-str", lambda: PageSelection(TOK, "4", 8, 8), VE, "page"),
    Bad("page-range", lambda: PageSelection(TOK + 2, 4, 8, 8), VE, "pages"),
    Bad("page-qlen", lambda: PageSelection(TOK, 4, 7, 8), VE, "q_len"),
    Bad("page-kvlen-neg", lambda: PageSelection(TOK, 4, 8, -8), VE, "kv_len"),
    Bad("page-shared0", lambda: PageSelection(TOK, 4, 8, 8, shared_by=0), VE, "shared_by"),
    Bad("page-shared3", lambda: PageSelection(torch.zeros(1, 2, 8, 1, dtype=L), 4, 8, 8, shared_by=3), VE, "shared_by"),
    Bad(
        "page-shared-differ",
        lambda: PageSelection(torch.tensor([[[[0]], [[1]]]]), 4, 1, 8, shared_by=2),
        VE,
        "shared_by",
    ),
    Bad("page-causal-int", lambda: PageSelection(TOK, 4, 8, 8, causal=1), TE, "causal"),
    Bad("page-dup", lambda: PageSelection(torch.tensor([[[[1, 1]]]]), 4, 1, 8), VE, "repeat"),
    Bad("cl-float", lambda: ClusterSelection(TOK.float(), TOK, 8, 8), TE, "query_indices"),
    Bad("cl-key-3d", lambda: ClusterSelection(TOK, TOK[0], 8, 8), VE, "key_indices"),
    Bad("cl-shape", lambda: ClusterSelection(TOK, torch.zeros(1, 2, 8, 2, dtype=L), 8, 8), VE, "agree"),
    Bad("cl-range", lambda: ClusterSelection(TOK + 8, TOK, 8, 8), VE, "query_indices"),
    Bad("cl-key-neg", lambda: ClusterSelection(TOK, TOK - 1, 8, 8), VE, "key_indices"),
    Bad("cl-qlen-str", lambda: ClusterSelection(TOK, TOK, "8", 8), TE, "q_len"),
    Bad("cl-causal-str", lambda: ClusterSelection(TOK, TOK, 8, 8, causal="yes"), TE, "causal"),
    Bad("tok-to-layout-block0", lambda: TokenSelection(TOK, 8, 8).to_layout(0), VE, "block"),
]


@pytest.mark.parametrize("row", params(ATTENTION))
def test_attention_rejects(row):
    check(row)


@pytest.mark.parametrize("row", params(PATTERN))
def test_pattern_rejects(row):
    check(row)


@pytest.mark.parametrize("row", params(LAYOUT))
def test_layout_rejects(row):
    check(row)


@pytest.mark.parametrize("row", params(SELECTIONS))
def test_selection_rejects(row):
    check(row)


# ------------------------------------------------------------------ accepted edge cases stay exact


@pytest.mark.parametrize("scale", [np.float32(0.25), np.float64(0.25), torch.tensor(0.25).item(), 1, np.int64(2)])
def test_numpy_scalars_are_scales(scale):
    ref = attention(Q, K, V, scale=float(scale), backend="reference")
    torch.testing.assert_close(attention(Q, K, V, scale=scale), ref)


def test_block_larger_than_sequence_is_exact_and_small():
    q, k, v = qkv(nq=10, nk=10)
    mask = torch.rand(10, 10) > 0.5
    with time_limit(5):
        lay = Layout.from_dense(mask, 100_000)
    assert torch.equal(lay.to_dense()[0, 0], mask)
    big = spattn.pattern("window(size=3, block=100000)").layout(q, k)
    small = spattn.pattern("window(size=3, block=4)").layout(q, k)
    assert torch.equal(big.to_dense(), small.to_dense())
    torch.testing.assert_close(attention(q, k, v, big), attention(q, k, v, small))


# ------------------------------------------------------------------ property tests


@settings(max_examples=40, deadline=None)
@given(
    st.one_of(
        st.floats(max_value=0.0),
        st.just(float("nan")),
        st.just(float("inf")),
        st.booleans(),
        st.text(max_size=3),
        st.none().map(lambda _: [0.5]),
    )
)
def test_bad_scales_named(scale):
    with pytest.raises(ValueError) as info:
        attention(Q, K, V, scale=scale)
    check_message(info.value, "scale")


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_spec_text_never_crashes(text):
    """Arbitrary text either parses or raises a ValueError/TypeError that quotes the spec."""
    with time_limit(5):
        try:
            parse_spec(text)
        except (ValueError, TypeError) as err:
            assert "spec" in str(err)


@settings(max_examples=40, deadline=None)
@given(block_q=st.integers(-3, 40), block_k=st.integers(-3, 40), n=st.integers(1, 24), m=st.integers(1, 24))
def test_from_dense_any_block(block_q, block_k, n, m):
    mask = torch.rand(n, m) > 0.5
    if block_q < 1 or block_k < 1:
        with pytest.raises(ValueError) as info:
            Layout.from_dense(mask, block_q, block_k)
        check_message(info.value, "block_q" if block_q < 1 else "block_k")
    else:
        assert torch.equal(Layout.from_dense(mask, block_q, block_k).to_dense()[0, 0], mask)


@settings(max_examples=40, deadline=None)
@given(width=st.integers(1, 20), rows=st.integers(1, 4))
def test_from_block_map_shape_checked(width, rows):
    bm = torch.ones(1, 1, rows, width, dtype=torch.bool)
    if (rows, width) == (2, 2):
        assert Layout.from_block_map(bm, q_len=8, kv_len=8, block_q=4).density() == 1.0
        return
    with pytest.raises(ValueError) as info:
        Layout.from_block_map(bm, q_len=8, kv_len=8, block_q=4)
    check_message(info.value, "block")


def test_table_size():
    assert len(ATTENTION) + len(PATTERN) + len(LAYOUT) + len(SELECTIONS) >= 150
