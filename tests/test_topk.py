"""topk / block_topk / block_mass: brute-force definitions, kernels vs reference on the selection, errors."""

from __future__ import annotations

import inspect


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spattn
from spattn.layout import Layout
from spattn.approx.reference import dense_drsformer
from spattn.patterns.reference import brute_block_mass, brute_block_topk, brute_topk, brute_topp
from spattn.patterns import topk as topk_module
from spattn.patterns.topk import selection_layout, topk_selections

from .helpers import assert_matches_reference


def _qkv(seed, batch, hq, hkv, nq, nk, dim, integer=False, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)

    def make(h, n):
        if integer:  # small integers: exact scores with many ties
            return torch.randint(-2, 3, (batch, h, n, dim), generator=gen).to(dtype)
        return torch.randn(batch, h, n, dim, generator=gen, dtype=dtype)

    return make(hq, nq), make(hkv, nk), make(hkv, nk)


@settings(max_examples=12, deadline=None)
@given(
    batch=st.integers(1, 2),
    hkv=st.integers(1, 2),
    group=st.sampled_from([1, 2]),
    nq=st.integers(1, 24),
    extra=st.sampled_from([0, 0, 5]),
    kk=st.integers(1, 9),
    causal=st.booleans(),
    ties=st.sampled_from(["keep", "first"]),
    integer=st.booleans(),
    padded=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_topk_matches_brute_force(batch, hkv, group, nq, extra, kk, causal, ties, integer, padded, seed):
    nk = nq + extra
    kk = min(kk, nk)
    q, k, _ = _qkv(seed, batch, hkv * group, hkv, nq, nk, 4, integer=integer)
    kpm = (torch.rand(batch, nk, generator=torch.Generator().manual_seed(seed)) < 0.8) if padded else None
    sel = topk_selections(q, k, [kk], causal=causal, key_padding_mask=kpm, ties=ties)[0]
    assert torch.equal(sel.to_dense(), brute_topk(q, k, kk, causal, ties, kpm))
    valid = sel.indices[sel.valid]
    assert valid.numel() == sel.to_dense().sum()  # no duplicate keys in a row


def test_topk_keeps_ties_like_the_official_code():
    q = torch.ones(1, 1, 1, 1)
    k = torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0, 0.0]).view(1, 1, 6, 1)
    sel = spattn.pattern("topk(k=2)").select(q, k)
    assert sorted(sel.indices[sel.valid].tolist()) == [0, 2, 3, 4]  # every key tied with the 2nd score
    first = spattn.pattern("topk(k=2, ties='first')").select(q, k)
    assert sorted(first.indices[first.valid].tolist()) == [0, 2]


def test_topk_causal_rows_with_few_keys_keep_all():
    q, k, _ = _qkv(0, 1, 2, 2, 10, 10, 4)
    dense = spattn.pattern("topk(k=4)").select(q, k, causal=True).to_dense()
    counts = dense.sum(-1)[0, 0]
    assert counts[:4].tolist() == [1, 2, 3, 4] and (counts[4:] == 4).all()
    assert not dense[0, 0].triu(1).any()


def test_topk_select_masks_padding_before_ranking():
    q, k, v = _qkv(4, 2, 2, 2, 12, 15, 4)
    kpm = torch.rand(2, 15, generator=torch.Generator().manual_seed(0)) < 0.6
    sel = spattn.pattern("topk(k=3)").select(q, k, key_padding_mask=kpm)
    assert torch.equal(sel.to_dense(), brute_topk(q, k, 3, False, "keep", kpm))
    assert not (sel.to_dense() & ~kpm[:, None, None, :]).any()


def test_attention_passes_padding_to_the_selector():
    """Through spattn.attention, padded keys never take one of a query's k slots."""
    q, k, v = _qkv(5, 2, 2, 2, 12, 15, 4)
    kpm = torch.rand(2, 15, generator=torch.Generator().manual_seed(1)) < 0.6
    out = spattn.attention(q, k, v, "topk(k=3)", key_padding_mask=kpm)
    chosen = Layout.from_dense(brute_topk(q, k, 3, False, "keep", kpm), 4)
    want = spattn.attention(q, k, v, chosen, key_padding_mask=kpm, backend="reference")
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_topk_chunking_is_invisible(monkeypatch):
    q, k, _ = _qkv(1, 2, 4, 2, 40, 47, 8)
    want = topk_selections(q, k, [3, 7], causal=True)
    monkeypatch.setattr(topk_module, "SCORE_BUDGET", 100)  # one query per chunk
    got = topk_selections(q, k, [3, 7], causal=True)
    for a, b in zip(got, want):
        assert torch.equal(a.to_dense(), b.to_dense())


@pytest.mark.parametrize("causal", [False, True])
def test_topk_layout_equals_selection(causal):
    q, k, _ = _qkv(2, 2, 4, 2, 45, 52, 8, integer=True)
    pat = spattn.pattern("topk(k=6, block=16)")
    sel = pat.select(q, k, causal=causal)
    layout = pat.layout(q, k, causal=causal)
    assert torch.equal(layout.to_dense(), sel.to_dense().expand(2, 4, 45, 52))
    assert torch.equal(selection_layout(sel, 7).to_dense(), sel.to_dense())


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(1, 2),
    hkv=st.integers(1, 2),
    group=st.sampled_from([1, 3]),
    nq=st.integers(1, 30),
    extra=st.sampled_from([0, 0, 6]),
    p=st.sampled_from([0.3, 0.8, 0.95, 1.0]),
    causal=st.booleans(),
    padded=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_topp_matches_brute_force(batch, hkv, group, nq, extra, p, causal, padded, seed):
    nk = nq + extra
    q, k, _ = _qkv(seed, batch, hkv * group, hkv, nq, nk, 4, dtype=torch.float64)
    q = q * 2  # sharper rows: nuclei of very different sizes
    kpm = (torch.rand(batch, nk, generator=torch.Generator().manual_seed(seed)) < 0.8) if padded else None
    sel = spattn.pattern(f"topp(p={p})").select(q, k, causal=causal, key_padding_mask=kpm)
    assert torch.equal(sel.to_dense(), brute_topp(q, k, p, causal, kpm))
    assert sel.indices[sel.valid].numel() == sel.to_dense().sum()  # no duplicate keys in a row


def test_topp_budget_adapts_to_the_row():
    """A peaked row keeps one key, a flat row keeps the share p of its keys; p = 1 keeps every allowed key."""
    k = torch.eye(8).view(1, 1, 8, 8)
    q = torch.stack([torch.eye(8)[2] * 50, torch.zeros(8)]).view(1, 1, 2, 8)
    counts = spattn.pattern("topp(p=0.5)").select(q, k).to_dense().sum(-1)[0, 0]
    assert counts.tolist() == [1, 4]
    full = spattn.pattern("topp(p=1.0)").select(q, k, causal=True).to_dense()
    assert torch.equal(full[0, 0], torch.ones(2, 8, dtype=torch.bool).tril(6))


def test_topp_chunking_and_scale(monkeypatch):
    q, k, _ = _qkv(3, 1, 4, 2, 40, 47, 8)
    want = spattn.pattern("topp(p=0.9, scale=0.2)").select(q, k, causal=True).to_dense()
    monkeypatch.setattr(topk_module, "SCORE_BUDGET", 100)
    assert torch.equal(spattn.pattern("topp(p=0.9, scale=0.2)").select(q, k, causal=True).to_dense(), want)
    assert torch.equal(want, brute_topp(q, k, 0.9, True, scale=0.2))


# -------------------------------------------------------------------------------- block patterns


_BLOCK_CASES = dict(
    batch=st.integers(1, 2),
    group=st.sampled_from([1, 2]),
    nq=st.integers(1, 40),
    extra=st.sampled_from([0, 0, 9, -5]),
    block=st.sampled_from([4, 7, 8]),
    causal=st.booleans(),
    seed=st.integers(0, 10_000),
)


@settings(max_examples=12, deadline=None)
@given(kk=st.integers(1, 4), **_BLOCK_CASES)
def test_block_topk_matches_brute_force(kk, batch, group, nq, extra, block, causal, seed):
    nk = max(1, nq + extra)
    kk = min(kk, -(-nk // block))
    q, k, _ = _qkv(seed, batch, 2 * group, 2, nq, nk, 4, dtype=torch.float64)
    layout = spattn.pattern(f"block_topk(k={kk}, block={block})").layout(q, k, causal=causal)
    assert torch.equal(layout.to_dense().expand(batch, 2 * group, nq, nk), brute_block_topk(q, k, kk, block, causal))


@settings(max_examples=12, deadline=None)
@given(tau=st.sampled_from([0.05, 0.5, 0.9, 1.0]), **_BLOCK_CASES)
def test_block_mass_matches_brute_force(tau, batch, group, nq, extra, block, causal, seed):
    nk = max(1, nq + extra)
    q, k, _ = _qkv(seed, batch, 2 * group, 2, nq, nk, 4, dtype=torch.float64)
    layout = spattn.pattern(f"block_mass(threshold={tau}, block={block})").layout(q, k, causal=causal)
    assert torch.equal(layout.to_dense().expand(batch, 2 * group, nq, nk), brute_block_mass(q, k, tau, block, causal))


def test_block_mass_threshold_one_keeps_every_allowed_block():
    q, k, _ = _qkv(3, 1, 2, 2, 30, 30, 4, dtype=torch.float64)
    layout = spattn.pattern("block_mass(threshold=1.0, block=8)").layout(q, k, causal=True)
    assert torch.equal(layout.to_dense()[0, 0], torch.ones(30, 30, dtype=torch.bool).tril())


# -------------------------------------------------------------------------------- through spattn.attention

SPECS = [
    "topk(k=8)",
    "topk(k=3, ties='first')",
    "topp(p=0.9)",
    "block_topk(k=2, block=16)",
    "block_mass(threshold=0.6, block=16)",
]


@settings(max_examples=6, deadline=None)
@given(
    batch=st.integers(1, 2),
    group=st.sampled_from([1, 2]),
    n=st.integers(33, 70),
    extra=st.sampled_from([0, 11]),
    causal=st.booleans(),
    padded=st.booleans(),
    seed=st.integers(0, 1000),
)
@pytest.mark.parametrize("spec", SPECS)
def test_attention_matches_reference_on_the_selection(spec, batch, group, n, extra, causal, padded, seed):
    q, k, v = _qkv(seed, batch, 2 * group, 2, n, n + extra, 8)
    kpm = (torch.rand(batch, n + extra, generator=torch.Generator().manual_seed(seed)) < 0.85) if padded else None
    pat = spattn.pattern(spec)
    takes_padding = "key_padding_mask" in inspect.signature(pat.select).parameters
    # spattn.attention hands the padding mask to selectors that take it
    selection = pat.select(q, k, causal=causal, **({"key_padding_mask": kpm} if takes_padding and padded else {}))
    layout = selection if isinstance(selection, Layout) else Layout.from_dense(selection.to_dense(), 16)

    def run(q_, k_, v_, _layout, **kw):
        return spattn.attention(q_, k_, v_, spec, causal=causal, **kw)

    assert_matches_reference(run, q, k, v, layout, kpm)


def test_topk_through_nn_attention_trains():
    layer = spattn.nn.Attention(dim=16, heads=2, attention="topk(k=4)", causal=True)
    x = torch.randn(2, 20, 16, requires_grad=True)
    layer(x).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


# -------------------------------------------------------------------------------- errors


def test_errors():
    q, k, _ = _qkv(0, 1, 2, 2, 10, 12, 4)
    with pytest.raises(ValueError, match="k must be >= 1"):
        spattn.pattern("topk(k=0)")
    with pytest.raises(TypeError, match="k must be an int"):
        spattn.pattern("topk(k=2.5)")
    with pytest.raises(ValueError, match="exceeds the number of keys Nk=12"):
        spattn.pattern("topk(k=13)").select(q, k)
    with pytest.raises(ValueError, match="ties must be one of"):
        spattn.pattern("topk(k=2, ties='random')")
    with pytest.raises(ValueError, match="block must be >= 1"):
        spattn.pattern("block_topk(k=2, block=0)")
    with pytest.raises(ValueError, match="k=4 exceeds the number of key blocks 3"):
        spattn.pattern("block_topk(k=4, block=4)").layout(q, k)
    for tau in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"threshold must lie in \(0.0, 1.0\]"):
            spattn.pattern(f"block_mass(threshold={tau})")
    with pytest.raises(TypeError, match="threshold must be a number"):
        spattn.pattern("block_mass(threshold='high')")
    for p in (0.0, 1.2):
        with pytest.raises(ValueError, match=r"topp: p must lie in \(0.0, 1.0\]"):
            spattn.pattern(f"topp(p={p})")
    with pytest.raises(ValueError, match="topp: scale must lie in"):
        spattn.pattern("topp(scale=-1.0)")
    with pytest.raises(ValueError, match="must agree in batch and head dim"):
        spattn.pattern("topk(k=2)").select(q, k[..., :3])


# -------------------------------------------------------------------------------- DRSformer multi-ratio top-k


@pytest.mark.parametrize("causal,padded", [(False, False), (False, True), (True, False)])
def test_drsformer_matches_dense_transcription(causal, padded):
    from spattn.approx.drsformer import DRSformerTopK

    q, k, v = _qkv(7, 2, 4, 2, 23, 23, 8)
    kpm = (torch.rand(2, 23, generator=torch.Generator().manual_seed(1)) < 0.8) if padded else None
    mod = DRSformerTopK(heads=4)
    with torch.no_grad():
        mod.weights.copy_(torch.tensor([0.3, -0.2, 0.5, 0.1]))
        mod.temperature.copy_(torch.tensor([1.0, 2.0, 0.5, 3.0]))
    inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    got = mod(*inputs, causal=causal, key_padding_mask=kpm)
    cot = torch.randn(got.shape, generator=torch.Generator().manual_seed(2))
    (got * cot).sum().backward()
    ref_inputs = [x.double().requires_grad_() for x in (q, k, v)]
    w, t = mod.weights.detach().double().requires_grad_(), mod.temperature.detach().double().requires_grad_()
    want = dense_drsformer(*ref_inputs, mod.ratios, w, t, causal, kpm)
    (want * cot.double()).sum().backward()
    assert (got.double() - want).abs().max() <= 1e-5
    for a, b in zip([*inputs, mod.weights, mod.temperature], [*ref_inputs, w, t]):
        assert (a.grad.double() - b.grad).abs().max() <= 1e-5


def test_drsformer_in_nn_attention():
    layer = spattn.nn.Attention(dim=16, heads=2, attention="drsformer_topk")
    assert layer.mechanism.ratios == (1 / 2, 2 / 3, 3 / 4, 4 / 5) and layer.mechanism.temperature.shape == (2,)
    assert layer.mechanism.keys_kept(48) == [24, 32, 36, 38]  # the paper's k for C = 48
    x = torch.randn(2, 12, 16)
    layer(x, key_padding_mask=torch.rand(2, 12) < 0.9).square().mean().backward()
    assert layer.mechanism.weights.grad is not None and torch.isfinite(layer.mechanism.weights.grad).all()
    assert spattn.nn.Attention(
        dim=8, heads=1, attention="drsformer_topk(ratios=(0.5, 1.0))"
    ).mechanism.weights.shape == (2,)


def test_drsformer_errors():
    from spattn.approx.drsformer import DRSformerTopK

    with pytest.raises(ValueError, match=r"every ratio must lie in \(0, 1\]"):
        DRSformerTopK(ratios=(0.5, 1.5))
    with pytest.raises(TypeError, match="non-empty tuple"):
        DRSformerTopK(ratios=())
    with pytest.raises(ValueError, match="heads must be a positive int"):
        DRSformerTopK(heads=0)
    q, k, v = _qkv(0, 1, 2, 2, 8, 8, 4)
    with pytest.raises(ValueError, match="built for heads=4"):
        DRSformerTopK(heads=4)(q, k, v)
