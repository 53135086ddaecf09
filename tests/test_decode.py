"""Decode-time selectors (Quest, Double Sparsity, TidalDecode) against brute-force definitions."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import spattn
from spattn.kvcache import KVCache, LabelCache, LayerState, PageSummary, SelectorState
from spattn.patterns.decode import DoubleSparsity, Quest, TidalDecode, quest_page_bounds
from spattn.patterns.reference import (
    brute_budget_rows,
    brute_double_sparsity_group_scores,
    brute_double_sparsity_scores,
    brute_quest_rows,
    brute_scores,
    quest_evaluation_oracle,
    quest_kernel_oracle,
)
from spattn.selection import PageSelection, TokenSelection


def _qk(b, hq, hkv, nq, nk, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, nk, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, nk, d, generator=g, dtype=dtype)
    return q, k, v


def _tokens(sel) -> TokenSelection:
    return sel.to_tokens() if isinstance(sel, PageSelection) else sel


def _sets(sel):
    idx = _tokens(sel).indices
    return [
        [[set(x for x in row.tolist() if x >= 0) for row in idx[b, h]] for h in range(idx.shape[1])]
        for b in range(idx.shape[0])
    ]


def _row(got, sel, b, h, i):
    return got[b if sel.batch > 1 else 0][h if sel.heads > 1 else 0][i]


def _assert_quest_rows(sel, page_bound, b, hq, nq, nk, page, budget, causal):
    """Every row of ``sel`` holds the own page plus the best pages by ``page_bound(b, h, i) -> [P]``
    (all pages when the budget covers them), restricted to the keys the query may see."""
    got = _sets(sel)
    want = brute_quest_rows(page_bound, b, hq, nq, nk, page, budget, causal)
    for bi in range(b):
        for h in range(hq):
            for i in range(nq):
                assert _row(got, sel, bi, h, i) == want[bi][h][i]


shapes = st.tuples(
    st.integers(1, 2),
    st.sampled_from([(2, 1), (4, 2), (3, 3)]),
    st.integers(1, 3),
    st.integers(5, 70),
    st.sampled_from([4, 8]),
    st.booleans(),
    st.integers(0, 10_000),
)


@settings(max_examples=25, deadline=None)
@given(shapes, st.integers(1, 9), st.integers(1, 40))
def test_quest_bound_and_selection_brute_force(shape, page, budget):
    b, (hq, hkv), nq, nk, d, causal, seed = shape
    nq = min(nq, nk)
    q, k, v = _qk(b, hq, hkv, nq, nk, d, seed)
    pat = Quest(page=page, budget=budget, min_pages=1)
    summary = PageSummary(page).update(k)
    bound = quest_page_bounds(q, summary.kmax, summary.kmin)
    g = hq // hkv
    pages = math.ceil(nk / page)
    # bound >= the true max score of every page (brute force over tokens)
    for h in range(hq):
        scores = q[:, h] @ k[:, h // g].transpose(-1, -2)  # [B, Nq, Nk]
        for p in range(pages):
            true_max = scores[..., p * page : (p + 1) * page].amax(-1)
            assert (bound[:, h, :, p] >= true_max - 1e-9).all()
            # and equals sum_d max(q_d M_d, q_d m_d)
            m_hi, m_lo = summary.kmax[:, h // g, p], summary.kmin[:, h // g, p]
            want = torch.maximum(q[:, h] * m_hi[:, None], q[:, h] * m_lo[:, None]).sum(-1)
            torch.testing.assert_close(bound[:, h, :, p], want)
    sel = pat.select(q, k, causal=causal)
    _assert_quest_rows(sel, lambda bi, h, i: bound[bi, h, i], b, hq, nq, nk, page, budget, causal)


@settings(max_examples=25, deadline=None)
@given(shapes, st.integers(1, 9), st.integers(1, 40))
def test_quest_group_pages_brute_force(shape, page, budget):
    """group_pages: one page set per kv head, ranked by the max of its query heads' bounds."""
    b, (hq, hkv), nq, nk, d, causal, seed = shape
    nq = min(nq, nk)
    q, k, _ = _qk(b, hq, hkv, nq, nk, d, seed)
    g = hq // hkv
    bound = quest_page_bounds(q, PageSummary(page).update(k).bounds)
    sel = Quest(page=page, budget=budget, min_pages=1, group_pages=True).select(q, k, causal=causal)
    group_bound = lambda bi, h, i: bound[bi, (h // g) * g : (h // g + 1) * g, i].amax(0)  # noqa: E731
    _assert_quest_rows(sel, group_bound, b, hq, nq, nk, page, budget, causal)


@settings(max_examples=20, deadline=None)
@given(shapes, st.integers(1, 8), st.integers(1, 30))
def test_double_sparsity_selects_topk_of_approx_scores(shape, channels, budget):
    b, (hq, hkv), nq, nk, d, causal, seed = shape
    nq = min(nq, nk)
    channels = min(channels, d)
    q, k, v = _qk(b, hq, hkv, nq, nk, d, seed)
    qc, kc, _ = _qk(2, hq, hkv, 16, 16, d, seed + 1)
    ds = DoubleSparsity(channels=channels, budget=budget)
    ds.calibrate(qc, kc, layer=3)
    # importance is mean |q_t k_t| per head and channel (brute force)
    g = hq // hkv
    imp = torch.stack([(qc[:, h] * kc[:, h // g]).abs().mean(dim=(0, 1)) for h in range(hq)])
    torch.testing.assert_close(ds.importance(3), imp)
    ch = ds.channel_map(3)
    assert ch.shape == (hq, channels)
    for h in range(hq):
        assert set(ch[h].tolist()) == set(imp[h].topk(channels).indices.tolist())
    sel = ds.select(q, k, causal=causal, state=LayerState(None, 3))
    got = _sets(sel)
    want = brute_budget_rows(brute_double_sparsity_scores(q, k, ch), budget, causal)
    for bi in range(b):
        for h in range(hq):
            for i in range(nq):
                assert _row(got, sel, bi, h, i) == want[bi][h][i]


@settings(max_examples=20, deadline=None)
@given(shapes, st.integers(1, 30))
def test_tidal_stateless_is_exact_topk(shape, budget):
    b, (hq, hkv), nq, nk, d, causal, seed = shape
    nq = min(nq, nk)
    q, k, v = _qk(b, hq, hkv, nq, nk, d, seed)
    sel = TidalDecode(budget=budget).select(q, k, causal=causal)
    got = _sets(sel)
    want = brute_budget_rows(brute_scores(q, k), budget, causal)
    for bi in range(b):
        for h in range(hq):
            for i in range(nq):
                assert _row(got, sel, bi, h, i) == want[bi][h][i]


def test_tidal_layers_share_positions():
    q, k, _ = _qk(1, 4, 2, 1, 64, 8, 0)
    pat = TidalDecode(budget=10, select_layers=(2, 5))
    state = SelectorState()
    assert pat.plan(q, k, True, state=state, layer=0) is None  # dense before the first selection layer
    assert pat.plan(q, k, True, state=state, layer=2) is None  # selection layers attend densely...
    recorded = state.shared["tidal"][1]
    assert torch.equal(recorded.indices, TidalDecode(budget=10).select(q, k, causal=True).indices)
    q2, k2, _ = _qk(1, 4, 2, 1, 64, 8, 1)
    assert pat.plan(q2, k2, True, state=state, layer=3) is recorded  # ...and later layers reuse them
    pat.plan(q2, k2, True, state=state, layer=5)
    assert torch.equal(
        pat.plan(q, k, True, state=state, layer=6).indices, TidalDecode(budget=10).select(q2, k2, causal=True).indices
    )
    with pytest.raises(ValueError, match="no selection layer"):
        pat.plan(q, k, True, state=SelectorState(), layer=3)
    with pytest.raises(ValueError, match="recorded"):
        pat.plan(q[:, :, :, :], k[:, :, :32], True, state=state, layer=7)


@pytest.mark.parametrize(
    "spec",
    [
        "quest(page=4, budget=12)",
        "quest(page=4, budget=12, group_pages=True)",
        "double_sparsity(channels=4, budget=9)",
        "double_sparsity(channels=4, budget=9, group_tokens=True)",
        "tidal(budget=11)",
    ],
)
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_outputs_match_reference_on_selection(spec, dtype, atol):
    q, k, v = _qk(2, 6, 2, 3, 77, 16, 5, dtype)
    pat = spattn.pattern(spec)
    if isinstance(pat, DoubleSparsity):
        pat.calibrate(*_qk(1, 6, 2, 20, 20, 16, 6, dtype)[:2])
    sel = pat.select(q, k, causal=True)
    assert sel.density() < 0.5
    out = spattn.attention(q, k, v, sel)
    ref = spattn.attention(q.double(), k.double(), v.double(), sel, backend="reference")
    assert (out.double() - ref).abs().max() <= atol
    # the selection is honoured: the reference on the selection's mask is dense attention restricted to it
    mask = sel.to_dense().expand(2, 6, 3, 77)
    kk, vv = k.double().repeat_interleave(3, 1), v.double().repeat_interleave(3, 1)
    s = (q.double() @ kk.transpose(-1, -2)) / 4.0
    want = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ vv
    assert (out.double() - want).abs().max() <= atol


def test_plan_is_a_deprecated_alias_of_select():
    q, k, _ = _qk(1, 4, 2, 1, 64, 8, 0)
    pat, state = TidalDecode(budget=10, select_layers=(2,)), SelectorState()
    for layer in (0, 2, 3):
        sel = pat.select(q, k, causal=True, state=state.at(layer))
        with pytest.warns(DeprecationWarning, match="select"):
            old = pat.plan(q, k, True, state=state, layer=layer)
        if layer < 3:  # dense layers: select answers every visible key, plan None
            assert sel.every_visible_key and sel.density() == 1.0 and old is None
        else:
            assert torch.equal(old.indices, sel.indices)
    with pytest.raises(TypeError, match="LayerState"):
        pat.select(q, k, causal=True, state=3)


def test_budget_covering_all_keys_is_dense():
    q, k, v = _qk(1, 2, 1, 1, 30, 8, 0)
    for pat in (Quest(page=4, budget=64), TidalDecode(budget=1.0)):
        assert pat.plan(q, k, True) is None
        assert pat.select(q, k, causal=True).density() == 1.0
    assert Quest(page=4, budget=0.25).pages_kept(100) == 7


def test_incremental_summaries_equal_rebuilt():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 3, 53, 8, generator=g)
    ps, lc = PageSummary(8), LabelCache(torch.tensor([[0, 5], [1, 2], [7, 3], [4, 4], [6, 0], [2, 1]]))
    for n in (1, 7, 8, 9, 30, 31, 53):
        ps.update(keys[:, :, :n])
        lc.update(keys[:, :, :n])
        fresh = PageSummary(8).update(keys[:, :, :n])
        assert torch.equal(ps.kmax, fresh.kmax) and torch.equal(ps.kmin, fresh.kmin)
        assert torch.equal(lc.labels, LabelCache(lc.channels).update(keys[:, :, :n]).labels)
    ps.update(keys[:, :, :10])  # shorter: rebuilt
    assert ps.kmax.shape[2] == 2 and torch.equal(ps.kmax, PageSummary(8).update(keys[:, :, :10]).kmax)


def test_stateful_decoding_loop_matches_stateless():
    """A KVCache-driven loop with state gives the same selections as recomputing from scratch."""
    q_all, k_all, v_all = _qk(1, 4, 2, 40, 40, 8, 3, torch.float32)
    cache = KVCache()
    quest = Quest(page=4, budget=8)
    ds = DoubleSparsity(channels=3, budget=7)
    ds.calibrate(q_all, k_all, layer=0)
    for t in range(40):
        k, v = cache.update(0, k_all[:, :, t : t + 1], v_all[:, :, t : t + 1])
        q = q_all[:, :, t : t + 1]
        for pat in (quest, ds):
            a = _tokens(pat.select(q, k, causal=True, state=cache.state.at(0)))
            b = _tokens(pat.select(q, k, causal=True, state=LayerState(None, 0)))
            assert torch.equal(a.indices.expand_as(b.indices), b.indices.expand_as(a.indices))
    assert cache.length(0) == 40


@settings(max_examples=20, deadline=None)
@given(shapes, st.integers(1, 8), st.integers(1, 30))
def test_double_sparsity_group_tokens_brute_force(shape, channels, budget):
    """group_tokens: one token set per kv head, from the group's summed channel importance and the max
    of its heads' approximate scores (the attention on it: test_outputs_match_reference_on_selection)."""
    b, (hq, hkv), nq, nk, d, causal, seed = shape
    nq = min(nq, nk)
    channels = min(channels, d)
    q, k, v = _qk(b, hq, hkv, nq, nk, d, seed)
    qc, kc, _ = _qk(2, hq, hkv, 16, 16, d, seed + 1)
    ds = DoubleSparsity(channels=channels, budget=budget, group_tokens=True)
    ds.calibrate(qc, kc, layer=0)
    g = hq // hkv
    imp = ds.importance(0)
    group_channels = [imp[j * g : (j + 1) * g].sum(0).topk(channels).indices for j in range(hkv)]
    sel = ds.select(q, k, causal=causal, state=LayerState(None, 0))
    if budget < nk and g > 1:
        assert isinstance(sel, PageSelection) and sel.page == 1 and sel.shared_by == g
    got = _sets(sel)
    want = brute_budget_rows(brute_double_sparsity_group_scores(q, k, group_channels), budget, causal)
    for bi in range(b):
        for h in range(hq):
            for i in range(nq):
                assert _row(got, sel, bi, h, i) == want[bi][h][i]


def test_double_sparsity_state_round_trip(tmp_path):
    ds = DoubleSparsity(channels=2, budget=5)
    q, k, _ = _qk(1, 4, 2, 12, 12, 8, 0)
    ds.calibrate(q, k, layer=0)
    ds.calibrate(q * 2, k, layer=1)
    path = tmp_path / "ds.json"
    ds.save(path)
    again = spattn.pattern(f"double_sparsity(channels=2, budget=5, calibration={str(path)!r})")
    for layer in (0, 1):
        torch.testing.assert_close(again.importance(layer), ds.importance(layer))
        assert torch.equal(again.channel_map(layer), ds.channel_map(layer))
    qd = q[:, :, -1:]
    assert torch.equal(
        again.select(qd, k, True, state=LayerState(None, 1)).indices,
        ds.select(qd, k, True, state=LayerState(None, 1)).indices,
    )
    # layer keys survive as ints; accumulating continues
    again.calibrate(q, k, layer=0)
    assert again._counts[0] == 24


def test_errors():
    for bad in (dict(page=0), dict(budget=0), dict(budget=1.5), dict(budget=0.0), dict(min_pages=0)):
        with pytest.raises(ValueError):
            Quest(**bad)
    with pytest.raises(TypeError, match="budget"):
        Quest(budget="many")
    with pytest.raises(TypeError):
        Quest(page=2.0)
    with pytest.raises(ValueError):
        DoubleSparsity(channels=0)
    with pytest.raises(ValueError):
        DoubleSparsity(budget=-1)
    with pytest.raises(ValueError, match="does not exist"):
        DoubleSparsity(calibration="/nonexistent/ds.json")
    with pytest.raises(ValueError, match="label_dtype"):
        DoubleSparsity(label_dtype="int8")
    with pytest.raises(TypeError, match="group_tokens"):
        DoubleSparsity(group_tokens=1)
    with pytest.raises(TypeError, match="dtype"):
        LabelCache(torch.zeros(2, 3, dtype=torch.long), dtype=torch.int32)
    with pytest.raises(ValueError):
        TidalDecode(budget=0)
    with pytest.raises(ValueError, match="increasing"):
        TidalDecode(select_layers=(5, 2))
    with pytest.raises(TypeError):
        TidalDecode(select_layers=())
    q, k, _ = _qk(1, 4, 2, 1, 20, 8, 0)
    with pytest.raises(ValueError, match="not calibrated"):
        DoubleSparsity().select(q, k, True)
    ds = DoubleSparsity(channels=9, budget=3)
    ds.calibrate(q, k, layer=0)
    with pytest.raises(ValueError, match="head dim"):
        ds.select(q, k, True, state=LayerState(None, 0))
    with pytest.raises(ValueError, match="no calibration for layer"):
        DoubleSparsity(channels=2, budget=3).calibrate(q, k, layer=0) or None
        d2 = DoubleSparsity(channels=2, budget=3)
        d2.calibrate(q, k, layer=0)
        d2.calibrate(q, k, layer=1)
        d2.select(q, k, True, state=LayerState(None, 5))
    with pytest.raises(ValueError, match="multiple"):
        Quest().select(torch.randn(1, 3, 1, 8), torch.randn(1, 2, 20, 8))
    with pytest.raises(ValueError, match="Nq <= Nk"):
        Quest().select(torch.randn(1, 2, 30, 8), torch.randn(1, 2, 20, 8), causal=True)
    with pytest.raises(TypeError, match="SelectorState"):
        Quest().select(q, k, True, state={})
    with pytest.raises(ValueError, match="both"):
        TidalDecode().plan(q, k, True, state=SelectorState())
    with pytest.raises(ValueError):
        PageSummary(0)
    with pytest.raises(ValueError, match="cannot append"):
        c = KVCache()
        c.update(0, torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
        c.update(0, torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4))


def test_registered_with_layouts():
    names = {m.name for m in spattn.mechanisms()}
    assert {"quest", "double_sparsity", "tidal"} <= names
    q, k, _ = _qk(1, 2, 1, 1, 40, 8, 0, torch.float32)
    lay = Quest(page=4, budget=8).layout(q, k, causal=True)
    assert torch.equal(
        lay.to_dense(), Quest(page=4, budget=8).select(q, k, causal=True).to_dense().expand_as(lay.to_dense())
    )


# --------------------------------------------------------------- Quest: the two official references
@settings(max_examples=20, deadline=None)
@given(
    st.integers(1, 2),
    st.sampled_from([(2, 1), (2, 2)]),
    st.integers(9, 80),
    st.sampled_from([4, 8]),
    st.integers(2, 6),
    st.integers(0, 10_000),
)
def test_quest_rules_follow_their_official_references(b, heads, nk, page, pages_budget, seed):
    """``rule="kernel"`` = the CUDA path (own page forced), ``rule="evaluation"`` = the evaluation path
    (top pages only, at least 3), each checked against a reading of its official code (issue 15)."""
    hq, hkv = heads
    q, k, _ = _qk(b, hq, hkv, 1, nk, 8, seed)
    budget = pages_budget * page
    kernel = Quest(page=page, budget=budget, min_pages=1).select(q, k, causal=True).to_dense()
    evaluation = Quest(page=page, budget=budget, rule="evaluation").select(q, k, causal=True).to_dense()
    assert torch.equal(kernel.expand(b, hq, 1, nk), quest_kernel_oracle(q, k, page, budget))
    assert torch.equal(evaluation.expand(b, hq, 1, nk), quest_evaluation_oracle(q, k, page, budget))


def test_quest_evaluation_rule_does_not_force_the_own_page():
    q, k, _ = _qk(1, 1, 1, 1, 64, 4, seed=1)
    k[..., 56:, :] = -q[0, 0, 0] * 5  # the newest page scores lowest
    kernel = Quest(page=8, budget=16, min_pages=1).select(q, k).to_dense()[0, 0, 0]
    evaluation = Quest(page=8, budget=16, min_pages=1, rule="evaluation").select(q, k).to_dense()[0, 0, 0]
    assert kernel[56:].all() and not evaluation[56:].any()
    assert int(kernel.sum()) == int(evaluation.sum()) == 16
    with pytest.raises(ValueError, match="rule"):
        Quest(rule="paper")
