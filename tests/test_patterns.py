"""Static patterns: every layout equals a brute-force construction of the paper's definition.

The expected masks are written directly from the definitions with NumPy broadcasting or plain
Python loops over all (i, j), independent of the patterns' block arithmetic
(:mod:`spattn.patterns.reference.static`). Query ``i`` of
``Nq`` sits at key position ``i' = i + Nk - Nq`` (aligned to the end of the keys).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spattn
from spattn.patterns import (
    AShape,
    Axial,
    BigBird,
    Dense,
    DilatedWindow,
    Fixed,
    GlobalTokens,
    Strided,
    Window,
)
from spattn.patterns.reference import (
    brute_a_shape,
    brute_axial,
    brute_bigbird,
    brute_dense,
    brute_dilated_window,
    brute_fixed,
    brute_global_tokens,
    brute_strided,
    brute_window,
    positions,
)

EXAMPLES = int(os.environ.get("SPATTN_EXAMPLES", "40"))  # raise for a deeper sweep
SETTINGS = settings(max_examples=EXAMPLES, deadline=None)


def qk(nq, nk, heads=1):
    return torch.zeros(1, heads, nq, 2), torch.zeros(1, heads, nk, 2)


def tiles(mask, block):
    """(any, all) per tile of a bool [..., Nq, Nk] mask; out-of-range pairs are ignored."""
    nq, nk = mask.shape[-2:]
    nqb, nkb = -(-nq // block), -(-nk // block)
    pad = [(0, 0)] * (mask.ndim - 2) + [(0, nqb * block - nq), (0, nkb * block - nk)]
    inside = np.pad(np.ones(mask.shape, bool), pad)
    m = np.pad(mask, pad)
    shape = mask.shape[:-2] + (nqb, block, nkb, block)
    m, inside = m.reshape(shape), inside.reshape(shape)
    return m.any(axis=(-3, -1)), (m | ~inside).all(axis=(-3, -1))


def check(layout, expected, block, *, exact_full=True, mask_mod_is_definition=True):
    """``expected``: bool [Nq, Nk] or [H', Nq, Nk]."""
    expected = np.asarray(expected, dtype=bool)
    if expected.ndim == 2:
        expected = expected[None]
    dense = layout.to_dense().numpy()
    assert dense.shape == (1,) + expected.shape
    dense = dense[0]
    if not np.array_equal(dense, expected):
        bad = np.argwhere(dense != expected)[:5]
        raise AssertionError(f"layout differs from the definition at (h, i, j) = {bad.tolist()}")
    # a tile longer than the sequence is clamped to it (same pairs, no block x block allocation)
    assert (layout.block_q, layout.block_k) == (min(block, layout.q_len), min(block, layout.kv_len))
    any_t, all_t = tiles(expected, block)
    block_map = layout.block_map()[0].numpy()
    full_map = layout.full_map()[0].numpy()
    # selected tiles are exactly the non-empty ones; full tiles really are full
    assert np.array_equal(block_map, any_t), "a selected tile is empty or a non-empty tile is missing"
    assert not (full_map & ~all_t).any(), "a tile marked full is not full"
    if exact_full:
        assert np.array_equal(full_map, all_t & any_t), "a full tile is not marked full"
    assert layout.density() == pytest.approx(expected.mean(), abs=1e-12)
    if layout.mask_mod is not None:
        # the predicate is traceable (vmap, as FlexAttention uses) and works on 0-d tensors
        if mask_mod_is_definition:
            from torch.nn.attention.flex_attention import create_mask

            got = create_mask(layout.mask_mod, 1, 1, layout.q_len, layout.kv_len, device="cpu")
            assert np.array_equal(got[0, 0].numpy(), expected[0])
        z = torch.tensor(0)
        for i, j in [(0, 0), (layout.q_len - 1, layout.kv_len - 1), (layout.q_len // 2, layout.kv_len // 3)]:
            out = layout.mask_mod(z, z, torch.tensor(i), torch.tensor(j))
            assert out.dtype == torch.bool and out.dim() == 0
            if mask_mod_is_definition:
                assert bool(out) == expected[0, i, j]


lengths = st.integers(1, 300)
blocks = st.sampled_from([4, 8, 13, 16])


# ------------------------------------------------------------------------------------- dense
@SETTINGS
@given(nq=lengths, nk=lengths, block=blocks, causal=st.booleans())
def test_dense(nq, nk, block, causal):
    expected = brute_dense(nq, nk, causal)
    check(Dense(block).layout(*qk(nq, nk), causal=causal), expected, block)


# ------------------------------------------------------------------------------------- window
@SETTINGS
@given(nq=lengths, nk=lengths, block=blocks, causal=st.booleans(), size=st.integers(0, 40))
def test_window(nq, nk, block, causal, size):
    expected = brute_window(nq, nk, size, causal)
    check(Window(size, block=block).layout(*qk(nq, nk), causal=causal), expected, block)


@SETTINGS
@given(nq=lengths, nk=lengths, block=blocks, causal=st.booleans(), size=st.integers(0, 8), dilation=st.integers(1, 6))
def test_dilated_window(nq, nk, block, causal, size, dilation):
    expected = brute_dilated_window(nq, nk, size, dilation, causal)
    layout = DilatedWindow(size, dilation, block=block).layout(*qk(nq, nk), causal=causal)
    check(layout, expected, block)


def test_dilated_window_one_is_window():
    q, k = qk(100, 100)
    a = DilatedWindow(5, 1, block=8).layout(q, k).to_dense()
    b = Window(5, block=8).layout(q, k).to_dense()
    assert torch.equal(a, b)


@SETTINGS
@given(nq=lengths, nk=lengths, block=blocks, causal=st.booleans(), count=st.integers(1, 40))
def test_global_tokens(nq, nk, block, causal, count):
    expected = brute_global_tokens(nq, nk, count, causal)
    check(GlobalTokens(count, block=block).layout(*qk(nq, nk), causal=causal), expected, block)


# ------------------------------------------------------------------------------------- Sparse Transformer
@SETTINGS
@given(nq=lengths, nk=lengths, block=blocks, causal=st.booleans(), stride=st.integers(1, 40))
def test_strided(nq, nk, block, causal, stride):
    expected = brute_strided(nq, nk, stride, causal)
    check(Strided(stride, block=block).layout(*qk(nq, nk), causal=causal), expected, block)


@SETTINGS
@given(nq=lengths, nk=lengths, l=st.sampled_from([4, 8, 12, 16]), causal=st.booleans(), data=st.data())
def test_fixed(nq, nk, l, causal, data):
    c = data.draw(st.integers(1, l), label="summary")
    p, j = positions(nq, nk)
    expected = brute_fixed(nq, nk, l, c, causal)
    layout = Fixed(block=l, summary=c).layout(*qk(nq, nk), causal=causal)
    # with summary columns the tiles hold only the same-block part: check density/dense equality
    if layout.has_columns:
        assert torch.equal(layout.to_dense()[0, 0], torch.from_numpy(expected))
        assert layout.density() == pytest.approx(expected.mean(), abs=1e-12)
        _, all_t = tiles(expected, l)
        assert not (layout.full_map()[0, 0].numpy() & ~all_t).any()
        same_block = (j // l == p // l) & ((j <= p) if causal else True)
        assert np.array_equal(layout.block_map()[0, 0].numpy(), tiles(same_block, l)[0])
    else:
        check(layout, expected, l)


def test_fixed_uses_columns_when_summary_small():
    q, k = qk(256, 256)
    layout = Fixed(block=16, summary=2).layout(q, k, causal=True)
    assert layout.has_columns
    assert layout.block_density() < 0.2
    assert not Fixed(block=16, summary=8).layout(q, k).has_columns


# ------------------------------------------------------------------------------------- axial, A-shape
@SETTINGS
@given(nq=lengths, block=blocks, causal=st.booleans(), rows=st.integers(1, 20), cols=st.integers(1, 20), data=st.data())
def test_axial(nq, block, causal, rows, cols, data):
    nk = rows * cols
    nq = data.draw(st.integers(1, nk), label="nq")
    expected = brute_axial(nq, nk, cols, causal)
    check(Axial(rows, block=block).layout(*qk(nq, nk), causal=causal), expected, block, exact_full=False)


@SETTINGS
@given(nq=lengths, nk=lengths, block=blocks, causal=st.booleans(), sinks=st.integers(0, 30), local=st.integers(1, 60))
def test_a_shape(nq, nk, block, causal, sinks, local):
    expected = brute_a_shape(nq, nk, sinks, local, causal)
    check(AShape(sinks, local, block=block).layout(*qk(nq, nk), causal=causal), expected, block)


# ------------------------------------------------------------------------------------- BigBird
def check_random_draw(p, rnd, nq, nk, causal):
    block, r = p.block, p.random
    nkb = -(-nk // block)
    assert rnd.shape == (rnd.shape[0], -(-nq // block), r)
    for qb in range(rnd.shape[1]):
        a = (min(qb * block + block - 1, nq - 1) + nk - nq) // block
        cand = [
            kb
            for kb in range(nkb)
            if not (abs(a - kb) <= p.window // 2 or kb < p.globals or a < p.globals) and (kb <= a or not causal)
        ]
        for h in range(rnd.shape[0]):
            drawn = [int(x) for x in rnd[h, qb] if x >= 0]
            assert all(x == -1 for x in rnd[h, qb, len(drawn) :].tolist()), "padding must come last"
            assert drawn == sorted(drawn)
            assert len(set(drawn)) == len(drawn), "random blocks must be distinct"
            assert len(drawn) == min(r, len(cand))
            assert set(drawn) <= set(cand), "random blocks overlap window/globals or the future"


@settings(max_examples=max(1, EXAMPLES * 3 // 4), deadline=None)
@given(
    nq=st.integers(1, 200),
    nk=st.integers(1, 200),
    block=st.sampled_from([4, 8, 16]),
    causal=st.booleans(),
    window=st.integers(0, 5),
    globals_=st.integers(0, 3),
    rnd=st.integers(0, 4),
    seed=st.integers(0, 2**40),
    heads=st.integers(1, 3),
)
def test_bigbird(nq, nk, block, causal, window, globals_, rnd, seed, heads):
    p = BigBird(block=block, window=window, globals=globals_, random=rnd, seed=seed)
    layout = p.layout(*qk(nq, nk, heads), causal=causal)
    draw = p.random_blocks(heads, nq, nk, causal).numpy()
    check_random_draw(p, draw, nq, nk, causal)
    expected = brute_bigbird(nq, nk, block, window, globals_, draw, causal)
    assert layout.heads == (heads if rnd else 1)
    check(layout, expected if rnd else expected[:1], block)


def test_bigbird_draw_is_deterministic_and_per_head():
    p = BigBird(block=16, window=3, globals=1, random=3, seed=7)
    a = p.random_blocks(4, 1000, 1000)
    assert torch.equal(a, p.random_blocks(4, 1000, 1000))
    assert torch.equal(a[:2], p.random_blocks(2, 1000, 1000)), "head h's draw must not depend on the head count"
    assert not torch.equal(a[0], a[1]), "heads draw independently"
    assert not torch.equal(a, BigBird(block=16, window=3, globals=1, random=3, seed=8).random_blocks(4, 1000, 1000))
    layout = p.layout(*qk(1000, 1000, heads=4))
    assert layout.heads == 4 and layout.batch == 1
    # the draw is uniform-ish: every non-window non-global block gets picked somewhere
    counts = torch.bincount(a[a >= 0].flatten(), minlength=63)
    assert (counts[1:] > 0).float().mean() > 0.9


def test_bigbird_spec_string():
    p = spattn.pattern("bigbird(block=64, window=3, globals=2, random=3, seed=0)")
    assert isinstance(p, BigBird)
    assert (p.block, p.window, p.globals, p.random, p.seed) == (64, 3, 2, 3, 0)
    layout = p.layout(*qk(1000, 1000, heads=2), causal=True)
    assert layout.heads == 2 and layout.block_q == 64
    assert 0 < layout.density() < 1


def test_bigbird_fewer_blocks_than_random():
    p = BigBird(block=8, window=1, globals=0, random=5, seed=1)
    draw = p.random_blocks(2, 24, 24)  # 3 blocks: 2 candidates each
    assert ((draw >= 0).sum(-1) == 2).all()


# ------------------------------------------------------------------------------------- generic
ALL = [
    Dense(block=16),
    Window(size=5, block=16),
    DilatedWindow(size=3, dilation=2, block=16),
    GlobalTokens(count=4, block=16),
    BigBird(block=16, window=3, globals=1, random=2, seed=3),
    Strided(stride=7, block=16),
    Fixed(block=16, summary=4),
    Axial(rows=8, block=16),
    AShape(sinks=4, local=20, block=16),
]


@pytest.mark.parametrize("p", ALL, ids=lambda p: p.name)
def test_spec_round_trip(p):
    again = spattn.pattern(repr(p))
    assert again == p and type(again) is type(p)
    assert spattn.pattern(p.name, **p.params()) == p
    assert spattn.pattern(p) is p


def test_registry_lists_patterns_with_papers():
    mechs = {m.name: m for m in spattn.mechanisms()}
    for name in [
        "dense",
        "window",
        "dilated_window",
        "global_tokens",
        "bigbird",
        "strided",
        "fixed",
        "axial",
        "a_shape",
        "neighborhood",
    ]:
        assert mechs[name].kind == "static"
        assert mechs[name].paper and mechs[name].description


@pytest.mark.parametrize("p", ALL, ids=lambda p: p.name)
def test_no_quadratic_construction(p):
    """A 65k-token layout must be cheap (an N x N bool tensor would be 4 GiB)."""
    if isinstance(p, Axial):
        p = Axial(rows=256, block=256)
    elif isinstance(p, Fixed):
        p = Fixed(block=256, summary=16)
    else:
        p = spattn.pattern(p.name, **{**p.params(), "block": 256})
    q = torch.empty(1, 2, 65536, 2).expand(1, 2, 65536, 2)
    layout = p.layout(q, q, causal=True)
    assert layout.num_q_blocks == 256


def test_layout_works_for_decoding_shapes():
    """Nq = 1 (one new token at the end of the cache)."""
    for p in ALL:
        layout = p.layout(*qk(1, 80), causal=True)
        dense = layout.to_dense()
        assert dense.shape[-2:] == (1, 80)
        if not isinstance(p, GlobalTokens):
            assert bool(dense[..., 0, -1].all()), f"{p}: the newest token must see itself"


BAD = [
    (lambda: spattn.pattern("nosuch(size=3)"), ValueError, r"nosuch.*valid names.*window"),
    (lambda: spattn.pattern("window(size=3, bogus=1)"), ValueError, r"unknown parameter.*bogus"),
    (lambda: spattn.pattern("window"), TypeError, r"size"),
    (lambda: Window(-1), ValueError, r"window: size must be >= 0"),
    (lambda: Window(2.5), TypeError, r"window: size must be an int"),
    (lambda: Window(True), TypeError, r"window: size"),
    (lambda: Window(3, block=0), ValueError, r"window: block"),
    (lambda: DilatedWindow(2, 0), ValueError, r"dilated_window: dilation"),
    (lambda: DilatedWindow(-2, 2), ValueError, r"dilated_window: size"),
    (lambda: GlobalTokens(0), ValueError, r"global_tokens: count"),
    (lambda: BigBird(window=-1), ValueError, r"bigbird: window"),
    (lambda: BigBird(random="3"), TypeError, r"bigbird: random"),
    (lambda: BigBird(seed=-1), ValueError, r"bigbird: seed"),
    (lambda: BigBird(globals=1.0), TypeError, r"bigbird: globals"),
    (lambda: BigBird(block=0), ValueError, r"bigbird: block"),
    (lambda: spattn.pattern("bigbird(windows=3)"), ValueError, r"windows.*valid: bigbird\(block=64"),
    (lambda: Strided(0), ValueError, r"strided: stride"),
    (lambda: Fixed(block=8, summary=9), ValueError, r"fixed: summary must be <= block"),
    (lambda: Fixed(summary=0), ValueError, r"fixed: summary"),
    (lambda: Axial(0), ValueError, r"axial: rows"),
    (lambda: Axial(3).layout(*qk(10, 10)), ValueError, r"axial.*divisible by rows=3"),
    (lambda: Axial(2).layout(*qk(12, 10)), ValueError, r"axial.*Nq"),
    (lambda: AShape(local=0), ValueError, r"a_shape: local"),
    (lambda: AShape(sinks=-1), ValueError, r"a_shape: sinks"),
    (lambda: AShape(sinks=None), TypeError, r"a_shape: sinks"),
    (lambda: Window(3).layout(torch.zeros(2, 3), torch.zeros(2, 3)), ValueError, r"q must have shape"),
]


@pytest.mark.parametrize("make, exc, match", BAD)
def test_bad_parameters(make, exc, match):
    with pytest.raises(exc, match=match):
        make()
