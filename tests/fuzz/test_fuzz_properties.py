"""Property fuzzing: random (mostly wrong) arguments to the public entry points.

Whatever is drawn, a call either succeeds with a well-formed result or raises ValueError / TypeError
(never IndexError, KeyError, AttributeError, ZeroDivisionError, RuntimeError from deep inside torch, ...).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings, strategies as st

import spattn
from spattn import Layout, PageSelection, TokenSelection
from spattn.kvcache import KVCache
from spattn.models import ModelConfig, build_model
from spattn.nn import Attention

from ._table import time_limit

CLEAR = (ValueError, TypeError)
SPECS = [
    None,
    "window(size=2, block=4)",
    "topk(k=2)",
    "bigbird(block=4, window=1, globals=1, random=1)",
    "block_topk(k=1, block=4)",
    "xattention(threshold=0.9, block=4, stride=2)",
    "quest(page=2, budget=3)",
]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.int64, torch.bool]
sizes = st.integers(0, 3)
shape4 = st.tuples(sizes, sizes, st.integers(0, 9), sizes)
any_shape = st.one_of(shape4, st.lists(sizes, min_size=0, max_size=5).map(tuple))


def tensor(shape, dtype):
    t = torch.randn(shape, dtype=torch.float64) if shape else torch.randn((), dtype=torch.float64)
    return t.to(dtype) if dtype != torch.bool else t > 0


@settings(max_examples=80, deadline=None)
@given(
    qs=any_shape,
    ks=any_shape,
    vs=any_shape,
    dtypes=st.tuples(*[st.sampled_from(DTYPES)] * 3),
    spec=st.sampled_from(SPECS),
    causal=st.booleans(),
    backend=st.sampled_from(["auto", "reference", "blocksparse"]),
)
def test_attention_random_shapes(qs, ks, vs, dtypes, spec, causal, backend):
    q, k, v = (tensor(s, d) for s, d in zip((qs, ks, vs), dtypes))
    with time_limit(10):
        try:
            out = spattn.attention(q, k, v, spec, causal=causal, backend=backend)
        except CLEAR:
            return
    assert out.shape == q.shape[:3] + v.shape[3:]
    assert not out.float().isnan().any()


small_ints = st.integers(-2, 5)


@settings(max_examples=80, deadline=None)
@given(
    nqb=st.integers(0, 3),
    slots=st.integers(0, 3),
    b=st.integers(1, 2),
    h=st.integers(1, 2),
    q_len=small_ints,
    kv_len=small_ints,
    block=small_ints,
    seed=st.integers(0, 9),
    full=st.booleans(),
)
def test_layout_random_tables(nqb, slots, b, h, q_len, kv_len, block, seed, full):
    g = torch.Generator().manual_seed(seed)
    num = torch.randint(-1, slots + 2, (b, h, nqb), generator=g)
    idx = torch.randint(-1, 4, (b, h, nqb, slots), generator=g)
    kwargs = dict(full=torch.rand(b, h, nqb, slots, generator=g) > 0.5) if full else {}
    try:
        lay = Layout(num, idx, q_len=q_len, kv_len=kv_len, block_q=block, **kwargs)
    except CLEAR:
        return
    dense = lay.to_dense()
    assert dense.shape == (b, h, q_len, kv_len)
    assert lay.pair_counts().sum() == dense.sum()


@settings(max_examples=60, deadline=None)
@given(
    shape=any_shape, q_len=small_ints, kv_len=small_ints, block=small_ints, cols=st.booleans(), seed=st.integers(0, 9)
)
def test_from_block_map_random(shape, q_len, kv_len, block, cols, seed):
    g = torch.Generator().manual_seed(seed)
    bm = torch.rand(shape, generator=g) > 0.5 if shape else torch.tensor(True)
    column_map = (torch.rand(shape[:3] + (max(kv_len, 0),), generator=g) > 0.7) if cols and len(shape) == 4 else None
    try:
        lay = Layout.from_block_map(bm, q_len=q_len, kv_len=kv_len, block_q=block, column_map=column_map)
    except CLEAR:
        return
    assert lay.to_dense().shape[2:] == (q_len, kv_len)


@settings(max_examples=60, deadline=None)
@given(
    shape=any_shape, q_len=small_ints, kv_len=small_ints, page=small_ints, seed=st.integers(0, 9), pages=st.booleans()
)
def test_selections_random(shape, q_len, kv_len, page, seed, pages):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-2, 6, shape, generator=g) if shape else torch.tensor(1)
    try:
        sel = PageSelection(idx, page, q_len, kv_len) if pages else TokenSelection(idx, q_len, kv_len)
    except CLEAR:
        return
    dense = sel.to_dense()
    assert dense.shape[2:] == (q_len, kv_len)
    assert int(sel.pair_counts().sum()) == int(dense.sum())


junk = st.one_of(
    st.integers(-3, 70), st.floats(-2, 3), st.just(float("nan")), st.booleans(), st.none(), st.text(max_size=3)
)


@settings(max_examples=60, deadline=None)
@given(dim=junk, heads=junk, kv_heads=junk, head_dim=junk, dropout=junk, max_len=junk)
def test_nn_attention_random_arguments(dim, heads, kv_heads, head_dim, dropout, max_len):
    try:
        layer = Attention(
            dim, heads, "window(size=2)", kv_heads=kv_heads, head_dim=head_dim, dropout=dropout, max_len=max_len
        )
    except CLEAR:
        return
    x = torch.randn(1, 5, dim)
    assert layer(x).shape == x.shape


FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}


@settings(max_examples=60, deadline=None)
@given(values=st.dictionaries(st.sampled_from(sorted(FIELDS - {"kind"})), junk, min_size=1, max_size=3))
def test_model_config_random_fields(values):
    cfg = dict(vocab_size=20, num_classes=3, dim=16, heads=2, depth=1, max_len=16)
    cfg.update(values)
    try:
        model = build_model(ModelConfig(**cfg))
    except CLEAR:
        return
    tokens = torch.randint(0, model_vocab(model), (1, 4))
    out = model(tokens)
    assert out.shape[0] == 1


def model_vocab(model):
    return model.backbone.vocab_size


@settings(max_examples=40, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.integers(0, 1), shape4, st.sampled_from([torch.float32, torch.float64])), min_size=1, max_size=4
    )
)
def test_kvcache_random_appends(steps):
    cache = KVCache()
    for layer, shape, dtype in steps:
        k = torch.randn(shape, dtype=dtype)
        try:
            keys, values = cache.update(layer, k, k)
        except CLEAR:
            continue
        assert keys.shape[2] == cache.length(layer)


@pytest.mark.parametrize("depth", [100, 10_000])
def test_deeply_nested_spec(depth):
    spec = "window(size=" + "(" * depth + "3" + ",)" * depth + ")"  # tuples nested depth deep
    with time_limit(10), pytest.raises((ValueError, TypeError)) as info:
        spattn.pattern(spec)
    assert "spec" in str(info.value) or "size" in str(info.value)
