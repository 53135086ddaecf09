"""Prefill selectors (XAttention, MInference vertical-slash / block-sparse, FlexPrefill).

Each selector is checked against a brute-force construction of its definition written with plain
loops / dense NumPy from the full attention matrix (never from the selector's own helpers; in
:mod:`spattn.patterns.reference.prefill`), the
kernels against the dense reference on the produced layouts, recovery of planted keys, and errors.
Query ``i`` of ``Nq`` sits at key position ``i' = i + Nk - Nq``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spattn
from spattn.kernels.blocksparse import blocksparse_attention
from spattn.patterns.flexprefill import FlexPrefill
from spattn.patterns.minference import MInferenceBlock, VerticalSlash
from spattn.patterns.reference import (
    brute_flexprefill_blocks,
    brute_minference_block,
    brute_vertical_slash,
    brute_vertical_slash_scores,
    brute_vertical_slash_tiles,
    causal_dense,
    expand_blocks,
    full_probs,
    official_find_blocks,
    official_slash_blocks,
    xattn_brute_scores,
    xattn_brute_select,
)
from spattn.patterns.xattention import XAttention

from .helpers import assert_matches_reference


def qkv(batch, hq, hkv, nq, nk, dim, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, nq, dim, generator=gen) * scale
    k = torch.randn(batch, hkv, nk, dim, generator=gen) * scale
    v = torch.randn(batch, hkv, nk, dim, generator=gen)
    return q, k, v


# ------------------------------------------------------------------------------------ XAttention
@settings(max_examples=8, deadline=None)
@given(
    nq=st.integers(17, 90),
    extra=st.sampled_from([0, 0, 13]),
    stride=st.sampled_from([2, 4]),
    causal=st.booleans(),
    group=st.sampled_from([1, 2]),
    seed=st.integers(0, 99),
)
def test_xattention_scores_and_selection_match_brute_force(nq, extra, stride, causal, group, seed):
    block, tau = 16, 0.8
    q, k, _ = qkv(2, 2 * group, 2, nq, nq + extra, 8, seed)
    pat = XAttention(threshold=tau, stride=stride, block=block)
    scores = pat.block_scores(q, k, causal=causal).double().numpy()
    want = xattn_brute_scores(q, k, stride, block, causal)
    np.testing.assert_allclose(scores, want, atol=1e-5)
    layout = pat.layout(q, k, causal=causal)
    sel = xattn_brute_select(want, nq, nq + extra, block, tau, causal)
    mask = expand_blocks(sel, nq, nq + extra, block, causal)
    assert np.array_equal(layout.to_dense().numpy(), mask)


@settings(max_examples=10, deadline=None)
@given(
    n=st.integers(20, 140),
    stride=st.sampled_from([2, 4]),
    causal=st.booleans(),
    tau=st.sampled_from([0.5, 0.8, 0.95]),
    group=st.sampled_from([1, 2]),
    seed=st.integers(0, 999),
)
def test_xattention_official_rule_matches_the_official_code(n, stride, causal, tau, group, seed):
    """``rule="official"`` reproduces find_blocks_chunked (issue 15), off the block grid too."""
    block = 16
    q, k, _ = qkv(2, 2 * group, 2, n, n, 8, seed, scale=1.5)
    pat = XAttention(threshold=tau, stride=stride, block=block, rule="official")
    scores = xattn_brute_scores(q, k, stride, block, causal)
    sel = official_find_blocks(
        pat.block_scores(q, k, causal=causal).double().numpy(), tau, causal, chunk_blocks=2048 // block
    )
    assert np.array_equal(pat.layout(q, k, causal=causal).to_dense().numpy(), expand_blocks(sel, n, n, block, causal))
    # the oracle on the brute-force scores agrees wherever no score ties within rounding
    sel_brute = official_find_blocks(scores, tau, causal, chunk_blocks=2048 // block)
    assert (sel_brute != sel).mean() < 0.02


def test_xattention_official_rule_keeps_one_more_block_and_the_sink():
    """First chunk, Nq == Nk: the official rule keeps one block more per row than the fewest-blocks
    rule (two when the uncounted sink is added on top of the extra one), and block 0 always."""
    q, k, _ = qkv(1, 2, 2, 256, 256, 8, seed=3, scale=2.0)
    fewest = XAttention(threshold=0.5, stride=4, block=16)
    official = XAttention(threshold=0.5, stride=4, block=16, rule="official")
    a = fewest.layout(q, k, causal=True).to_dense()
    b = official.layout(q, k, causal=True).to_dense()
    blocks = lambda d: d[..., ::16, ::16].reshape(2, 16, 16)
    ba, bb = blocks(a), blocks(b)
    assert bb[..., 0].all()
    extra = (bb.sum(-1) - ba.sum(-1))[:, 2:]
    assert (extra >= 0).all() and (extra <= 2).all() and extra.float().mean() >= 0.5
    with pytest.raises(ValueError, match="rule"):
        XAttention(rule="paper")


def test_official_chunk_size():
    from spattn.patterns.xattention import official_chunk_size

    assert [official_chunk_size(n) for n in (100, 2048, 5000, 16384, 16385, 32768, 65536, 131072)] == [
        2048,
        2048,
        8192,
        16384,
        8192,
        8192,
        4096,
        2048,
    ]


@pytest.mark.parametrize("nq,nk", [(145, 1), (90, 37), (64, 50)])
def test_xattention_more_queries_than_keys(nq, nk):
    """Causal with Nq > Nk: early query rows see no key (regression: a negative key count)."""
    q, k, v = qkv(1, 4, 2, nq, nk, 8, seed=3)
    pat = XAttention(threshold=0.8, stride=4, block=16)
    scores = pat.block_scores(q, k, causal=True).double().numpy()
    np.testing.assert_allclose(scores, xattn_brute_scores(q, k, 4, 16, True), atol=1e-5)
    layout = pat.layout(q, k, causal=True)
    assert_matches_reference(blocksparse_attention, q, k, v, layout)


def test_xattention_tau_one_and_small_tau():
    q, k, _ = qkv(1, 2, 2, 128, 128, 8, seed=1)
    full = XAttention(threshold=1.0, stride=4, block=16).layout(q, k, causal=True)
    assert full.density() == pytest.approx(spattn.pattern("dense(block=16)").layout(q, k, causal=True).density())
    tiny = XAttention(threshold=1e-6, stride=4, block=16).layout(q, k, causal=True)
    sinks_diag = expand_blocks((np.eye(8, dtype=bool) | (np.arange(8) == 0)[None, :]), 128, 128, 16, True)
    assert np.array_equal(tiny.to_dense()[0, 0].numpy(), sinks_diag)


# --------------------------------------------------------------------------- MInference patterns
@settings(max_examples=8, deadline=None)
@given(
    nq=st.integers(20, 120),
    extra=st.sampled_from([0, 0, 21]),
    group=st.sampled_from([1, 2]),
    nv=st.integers(1, 40),
    ns=st.integers(1, 70),
    seed=st.integers(0, 99),
)
def test_vertical_slash_matches_brute_force(nq, extra, group, nv, ns, seed):
    nk = nq + extra
    q, k, _ = qkv(2, 2 * group, 2, nq, nk, 8, seed, scale=1.5)
    pat = VerticalSlash(vertical=nv, slash=ns, last_q=16, sinks=3, local=5, block=16)
    vert, slash = brute_vertical_slash_scores(q, k, last_q=16)
    from spattn.patterns.minference import vertical_slash_scores

    got_v, got_s = vertical_slash_scores(q, k, last_q=16)
    np.testing.assert_allclose(got_v.numpy(), vert, atol=1e-5)
    np.testing.assert_allclose(got_s.numpy(), slash, atol=1e-5)
    want = np.zeros((2, 2 * group, nq, nk), dtype=bool)
    for b in range(2):
        for h in range(2 * group):
            # official budgets: at least 30 verticals and 50 slashes, at most Nk
            want[b, h] = brute_vertical_slash(vert[b, h], slash[b, h], nq, nk, max(nv, 30), max(ns, 50), 3, 5)
    layout = pat.layout(q, k, causal=True)
    assert np.array_equal(layout.to_dense().numpy(), want)


@settings(max_examples=6, deadline=None)
@given(
    nq=st.integers(70, 200),
    extra=st.sampled_from([0, 21]),
    group=st.sampled_from([1, 2]),
    nv=st.integers(1, 40),
    ns=st.integers(1, 60),
    seed=st.integers(0, 99),
)
def test_vertical_slash_whole_tiles_matches_brute_force(nq, extra, group, nv, ns, seed):
    """``whole_tiles``: verticals as before; every 16x16 tile crossed by a selected slash (a causal
    pair of the tile on that diagonal) is attended whole, causal inside; output equals the reference."""
    nk, block = nq + extra, 16
    q, k, v = qkv(2, 2 * group, 2, nq, nk, 8, seed, scale=1.5)
    vert, slash = brute_vertical_slash_scores(q, k, last_q=16)
    want = np.zeros((2, 2 * group, nq, nk), dtype=bool)
    for b in range(2):
        for h in range(2 * group):
            want[b, h] = brute_vertical_slash_tiles(
                vert[b, h], slash[b, h], nq, nk, max(nv, 30), max(ns, 50), 3, 5, block
            )
    pat = VerticalSlash(vertical=nv, slash=ns, last_q=16, sinks=3, local=5, block=block, whole_tiles=True)
    layout = pat.layout(q, k, causal=True)
    assert np.array_equal(layout.to_dense().numpy(), want)
    exact = VerticalSlash(vertical=nv, slash=ns, last_q=16, sinks=3, local=5, block=block).layout(q, k, causal=True)
    assert not (exact.to_dense() & ~layout.to_dense()).any()  # a superset of the exact lines
    got = spattn.attention(q, k, v, layout)
    ref = spattn.attention(q, k, v, layout, backend="reference")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@settings(max_examples=8, deadline=None)
@given(
    nq=st.integers(10, 120),
    extra=st.sampled_from([0, 0, 30]),
    causal=st.booleans(),
    topk=st.integers(1, 6),
    group=st.sampled_from([1, 2]),
    seed=st.integers(0, 99),
)
def test_minference_block_matches_brute_force(nq, extra, causal, topk, group, seed):
    block, nk = 16, nq + extra
    q, k, _ = qkv(2, 2 * group, 2, nq, nk, 8, seed)
    sel = brute_minference_block(q, k, topk, block, causal)
    layout = MInferenceBlock(k=topk, block=block).layout(q, k, causal=causal)
    assert np.array_equal(layout.to_dense().numpy(), expand_blocks(sel, nq, nk, block, causal))


# ------------------------------------------------------------------------------------ FlexPrefill
@pytest.mark.parametrize("align", ["end", "start"])
@pytest.mark.parametrize("tau", [0.0, 0.3, 10.0])
@pytest.mark.parametrize("nq,extra,group", [(150, 0, 1), (133, 0, 2), (100, 40, 1)])
def test_flexprefill_matches_brute_force(tau, nq, extra, group, align):
    block, gamma, nk = 16, 0.8, nq + extra
    q, k, _ = qkv(2, 2 * group, 2, nq, nk, 8, seed=nq + extra, scale=1.3)
    pat = FlexPrefill(gamma=gamma, tau=tau, block=block, slash_align=align)
    want, aware = brute_flexprefill_blocks(q, k, gamma, tau, block, align)
    est = pat.estimate(q, k)
    assert np.array_equal(est["query_aware"].numpy(), aware)
    if tau == 0.0:
        assert not aware.any()
    if tau == 10.0:
        assert aware.all()
    layout = pat.layout(q, k, causal=True)
    assert np.array_equal(layout.to_dense().numpy(), expand_blocks(want, nq, nk, block, True))


@settings(max_examples=10, deadline=None)
@given(nq=st.integers(40, 120), block=st.sampled_from([8, 16]), group=st.sampled_from([1, 2]), seed=st.integers(0, 999))
def test_flexprefill_slash_groups_follow_the_official_code_for_any_n(nq, block, group, seed):
    """Off the block grid the official grouping (from the end) differs from grouping from offset 0;
    the default follows the official code exactly (issue 15)."""
    q, k, _ = qkv(1, 2 * group, 2, nq, nq, 8, seed=seed, scale=1.5)
    pat = FlexPrefill(gamma=0.95, tau=0.0, block=block)
    est = pat.estimate(q, k)
    probs = full_probs(q, k)
    rows = min(block, nq)
    for h in range(2 * group):
        want = official_slash_blocks(probs[0, h, nq - rows :], block)
        np.testing.assert_allclose(est["slash_blocks"][0, h].double().numpy(), want, atol=1e-6)
    want_blocks, _ = brute_flexprefill_blocks(q, k, 0.95, 0.0, block)
    assert np.array_equal(
        pat.layout(q, k, causal=True).to_dense().numpy(), expand_blocks(want_blocks, nq, nq, block, True)
    )


def test_flexprefill_slash_align_differs_off_grid_only():
    q, k, _ = qkv(1, 2, 2, 128, 128, 8, seed=5, scale=1.5)
    end, start = FlexPrefill(tau=0.0, block=16), FlexPrefill(tau=0.0, block=16, slash_align="start")
    torch.testing.assert_close(end.estimate(q, k)["slash_blocks"], start.estimate(q, k)["slash_blocks"])
    q, k, _ = qkv(1, 2, 2, 133, 133, 8, seed=5, scale=1.5)
    assert not torch.allclose(end.estimate(q, k)["slash_blocks"], start.estimate(q, k)["slash_blocks"], atol=1e-3)
    with pytest.raises(ValueError, match="slash_align"):
        FlexPrefill(slash_align="middle")


def test_flexprefill_short_sequence_is_dense():
    q, k, _ = qkv(1, 2, 2, 50, 50, 8, seed=0)
    lay = FlexPrefill(block=32).layout(q, k, causal=True)
    assert np.array_equal(lay.to_dense()[0, 0].numpy(), causal_dense(50, 50))


def test_sqrt_js_divergence():
    from spattn.patterns.flexprefill import sqrt_js_divergence

    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    r = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    got = sqrt_js_divergence(p, r)
    assert got[0].item() == pytest.approx(0.0, abs=1e-12)
    assert got[1].item() == pytest.approx(math.sqrt(math.log(2)), abs=1e-12)


# ------------------------------------------------------------------------- kernels on the layouts
SPECS = {
    "xattention": "xattention(threshold=0.8, stride=4, block=16)",
    "vertical_slash": "vertical_slash(vertical=8, slash=12, last_q=16, sinks=2, local=4, block=16)",
    "minference_block": "minference_block(k=2, block=16)",
    "flexprefill": "flexprefill(gamma=0.8, tau=0.2, block=16)",
}


@settings(max_examples=3, deadline=None)
@given(
    batch=st.integers(1, 2),
    group=st.sampled_from([1, 2]),
    n=st.integers(20, 150),
    extra=st.sampled_from([0, 0, 19]),
    seed=st.integers(0, 999),
)
@pytest.mark.parametrize("name", sorted(SPECS))
def test_prefill_selector_kernels_match_reference(name, batch, group, n, extra, seed):
    q, k, v = qkv(batch, 2 * group, 2, n, n + extra, 8, seed)
    layout = spattn.pattern(SPECS[name]).layout(q, k, causal=True)
    assert layout.heads == 2 * group and layout.batch == batch
    assert_matches_reference(blocksparse_attention, q, k, v, layout)
    got = spattn.attention(q, k, v, SPECS[name], causal=True)
    want = spattn.attention(q, k, v, layout, backend="reference")
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", sorted(SPECS))
def test_more_queries_than_keys_gives_zeros_not_nan(name):
    q, k, v = qkv(1, 2, 1, 120, 70, 8, seed=3)
    layout = spattn.pattern(SPECS[name]).layout(q, k, causal=True)
    assert_matches_reference(blocksparse_attention, q, k, v, layout)
    out = spattn.attention(q, k, v, SPECS[name], causal=True)
    assert not torch.isnan(out).any() and out[:, :, :50].abs().max() == 0


def test_every_prefill_selector_is_registered_and_content_based():
    names = {m.name for m in spattn.mechanisms()}
    for name in SPECS:
        assert name in names
        assert spattn.pattern(name).content_based  # the bare name works with paper defaults


# ------------------------------------------------------------------------- planted strong keys
def planted(n=512, dim=16, heads=2, seed=0):
    """Queries share a direction u; 4 keys from each ``strong`` position carry it strongly, the rest are noise."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(dim, generator=gen)
    u = u / u.norm()
    q = torch.randn(1, heads, n, dim, generator=gen) * 0.3 + u * 3.0
    k = torch.randn(1, heads, n, dim, generator=gen) * 0.3
    strong = torch.tensor([40, 170, 300])
    for j in strong.tolist():  # a short run of strong keys, so that block means see it too
        k[:, :, j : j + 4] += u * 3.0
    return q, k, strong


def test_selectors_recover_planted_keys():
    q, k, strong = planted()
    n = q.shape[2]
    for pat in (
        VerticalSlash(vertical=40, slash=50, block=32),
        XAttention(threshold=0.9, stride=8, block=32),
        MInferenceBlock(k=4, block=32),
        FlexPrefill(gamma=0.9, tau=0.1, block=32),
    ):
        dense = pat.layout(q, k, causal=True).to_dense()
        for j in strong.tolist():
            late = torch.arange(n) >= j + 32  # queries after the key's block
            frac = dense[0, :, late, j].float().mean().item()
            assert frac >= 0.95, f"{pat.spec()} misses planted key {j}: {frac:.2f}"
        assert pat.layout(q, k, causal=True).density() < 0.6


# ---------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "spec,err",
    [
        ("xattention(threshold=0.0)", ValueError),
        ("xattention(threshold=1.5)", ValueError),
        ("xattention(stride=3, block=128)", ValueError),
        ("xattention(stride=0)", ValueError),
        ("xattention(threshold='a')", TypeError),
        ("vertical_slash(vertical=0)", ValueError),
        ("vertical_slash(last_q=0)", ValueError),
        ("vertical_slash(slash=2.5)", TypeError),
        ("minference_block(k=0)", ValueError),
        ("minference_block(block=0)", ValueError),
        ("flexprefill(gamma=0)", ValueError),
        ("flexprefill(gamma=1.1)", ValueError),
        ("flexprefill(tau=-1)", ValueError),
        ("flexprefill(min_budget=512, max_budget=128)", ValueError),
        ("flexprefill(block=0)", ValueError),
    ],
)
def test_bad_parameters(spec, err):
    with pytest.raises(err):
        spattn.pattern(spec)


@pytest.mark.parametrize("spec", ["vertical_slash", "flexprefill"])
def test_causal_only_selectors_reject_non_causal(spec):
    q, k, _ = qkv(1, 2, 2, 40, 40, 8, seed=0)
    with pytest.raises(ValueError, match="causal"):
        spattn.pattern(spec).layout(q, k, causal=False)


# ------------------------------------------------------------------ MInference per-head config
from spattn.patterns.prefill import (  # noqa: E402
    load_minference_config,
    minference_heads_layout,
    save_minference_config,
    search_minference_config,
)

MIXED = [
    {"pattern": "a_shape", "sinks": 3, "local": 10},
    {"pattern": "vertical_slash", "vertical": 35, "slash": 55},
    {"pattern": "block_sparse", "k": 2},
    {"pattern": "a_shape", "sinks": 0, "local": 40},
]


def test_minference_heads_follow_their_patterns():
    nq, extra = 150, 23
    q, k, v = qkv(2, 4, 2, nq, nq + extra, 8, seed=extra)
    got = minference_heads_layout(q, k, MIXED, block=16, last_q=16).to_dense()
    per_head = [
        spattn.pattern("a_shape(sinks=3, local=10, block=16)").layout(q, k, causal=True).to_dense()[:, 0],
        VerticalSlash(vertical=35, slash=55, last_q=16, block=16).layout(q, k, causal=True).to_dense()[:, 1],
        MInferenceBlock(k=2, block=16).layout(q, k, causal=True).to_dense()[:, 2],
        spattn.pattern("a_shape(sinks=0, local=40, block=16)").layout(q, k, causal=True).to_dense()[:, 0],
    ]
    for h, want in enumerate(per_head):
        assert torch.equal(got[:, h], want.expand_as(got[:, h])), f"head {h}"
    assert_matches_reference(blocksparse_attention, q, k, v, minference_heads_layout(q, k, MIXED, block=16, last_q=16))


def structured_heads(n=192, dim=16, seed=0):
    """Head 0: every query looks at a few far keys (vertical); head 1: strongly local; head 2/3 random."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, n, dim, generator=gen) * 0.5
    k = torch.randn(1, 4, n, dim, generator=gen) * 0.5
    u = torch.randn(dim, generator=gen)
    u = u / u.norm()
    q[:, 0] += u * 4
    k[:, 0, [5, n // 3, (2 * n) // 3]] += u * 4
    pos = torch.arange(n, dtype=torch.float32)
    basis = torch.stack([torch.cos(pos / 8), torch.sin(pos / 8)], -1) * 4  # rotary-like: nearby = similar
    q[:, 1, :, :2] += basis
    k[:, 1, :, :2] += basis
    return q, k


def test_search_picks_max_mass_pattern_within_budget(tmp_path):
    q, k = structured_heads()
    n, budget = q.shape[2], 0.35
    cands = [
        {"pattern": "a_shape", "sinks": 4, "local": 24},
        {"pattern": "vertical_slash", "vertical": 30, "slash": 50},
        {"pattern": "block_sparse", "k": 2},
        {"pattern": "a_shape", "sinks": 4, "local": 150},  # over budget
    ]
    cfg = search_minference_config(q, k, budget, candidates=cands, block=16, last_q=16)
    # brute force: dense probabilities times each candidate's dense mask
    probs = torch.from_numpy(full_probs(q, k))
    causal_pairs = n * (n + 1) / 2
    masks = [minference_heads_layout(q, k, [c] * 4, block=16, last_q=16).to_dense()[0] for c in cands]
    for h in range(4):
        best = None
        for c, mask in zip(cands, masks):
            mask = mask[h]
            mass = (probs[0, h] * mask).sum().item() / n
            density = mask.sum().item() / causal_pairs
            if density <= budget and (best is None or mass > best[0]):
                best = (mass, c, density)
        head = cfg["layers"][0][h]
        assert {kk: head[kk] for kk in best[1]} == best[1], f"head {h}: {head} vs {best}"
        assert head["mass"] == pytest.approx(best[0], abs=1e-9)
        assert head["density"] == pytest.approx(best[2], abs=1e-12)
    assert cfg["layers"][0][0]["pattern"] != "a_shape"  # far keys: a band cannot hold them
    # JSON round trip, then the registered pattern runs the per-head layout
    path = tmp_path / "cfg.json"
    save_minference_config(cfg, path)
    assert load_minference_config(path) == cfg
    pat = spattn.pattern(f"minference(config={str(path)!r})")
    got = pat.layout(q, k, causal=True).to_dense()
    want = minference_heads_layout(q, k, cfg["layers"][0], block=16, last_q=16).to_dense()
    assert torch.equal(got, want)
    v = torch.randn_like(k)
    out = spattn.attention(q, k, v, pat, causal=True)
    assert (out - spattn.attention(q, k, v, pat.layout(q, k, causal=True), backend="reference")).abs().max() <= 1e-5


def test_search_default_candidates_and_layers():
    q, k = structured_heads(n=64)
    cfg = search_minference_config([q, q[:, :2]], [k, k[:, :2]], 0.4, block=16, last_q=16)
    assert [len(layer) for layer in cfg["layers"]] == [4, 2]
    assert all(h["density"] <= 0.4 for layer in cfg["layers"] for h in layer)


def test_minference_config_errors(tmp_path):
    q, k = structured_heads(n=64)
    with pytest.raises(ValueError, match="budget"):
        search_minference_config(q, k, 0.0)
    with pytest.raises(ValueError, match="no candidate fits"):
        search_minference_config(q, k, 0.01, candidates=[{"pattern": "a_shape", "sinks": 4, "local": 60}], block=16)
    with pytest.raises(ValueError, match="pattern"):
        search_minference_config(q, k, 0.5, candidates=[{"pattern": "bogus"}])
    with pytest.raises(ValueError, match="does not exist"):
        spattn.pattern(f"minference(config={str(tmp_path / 'missing.json')!r})")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_minference_config(bad)
    good = {"format": "spattn-minference-config", "version": 1, "block": 16, "last_q": 16, "layers": [MIXED]}
    for mutate, match in (
        (lambda c: c.update(format="x"), "format"),
        (lambda c: c.update(version=9), "version"),
        (lambda c: c.update(block=0), "block"),
        (lambda c: c.update(layers=[]), "layers"),
        (lambda c: c["layers"][0].__setitem__(0, {"pattern": "a_shape", "sinks": -1, "local": 3}), "sinks"),
        (lambda c: c["layers"][0].__setitem__(1, {"pattern": "vertical_slash", "vertical": 3}), "slash"),
    ):
        cfg = json.loads(json.dumps(good))
        mutate(cfg)
        bad.write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=match):
            load_minference_config(bad)
    path = tmp_path / "ok.json"
    save_minference_config(good, path)
    with pytest.raises(ValueError, match="layer"):
        spattn.pattern(f"minference(config={str(path)!r}, layer=1)")
    q3, k3 = q[:, :3], k[:, :3]
    with pytest.raises(ValueError, match="heads"):
        spattn.pattern(f"minference(config={str(path)!r})").layout(q3, k3, causal=True)
