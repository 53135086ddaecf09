"""Content-based selectors ignore padded positions completely (issue 16).

For every content-based mechanism of the registry (``kind`` dynamic / hybrid, and the layers that
take a padding mask), the outputs of real tokens must be *bitwise* independent of the values at
padded positions: the same inputs are run twice with the padded positions of q / k / v (of ``x``
for modules) filled with two different random draws, one of them large, and the rows of real
tokens are compared with ``torch.equal``. In self-attention a padded key position is also a padded
query position, so padded queries must not influence real tokens either (pooled query blocks,
k-means centroid updates, antidiagonal scores, last-query estimates).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spattn
from spattn.patterns.decode import DoubleSparsity, Quest, TidalDecode
from spattn.kvcache import SelectorState

# pattern spec -> (causal modes, needs a square grid); vertical_slash raises its budgets to 30 / 50
# lines, so it needs longer sequences to select anything less than everything
PATTERNS = {
    "topk(k=3)": ((False, True), False),
    "topp(p=0.9)": ((False, True), False),
    "block_topk(k=2, block=4)": ((False, True), False),
    "block_mass(threshold=0.8, block=4)": ((False, True), False),
    "minference_block(k=2, block=4)": ((True,), False),
    "vertical_slash(vertical=3, slash=4, last_q=4, sinks=1, local=2, block=4)": ((True,), "long"),
    "vertical_slash(vertical=3, slash=4, last_q=4, sinks=1, local=2, block=4, whole_tiles=True)": ((True,), "long"),
    "xattention(threshold=0.8, stride=2, block=4)": ((False, True), False),
    "xattention(threshold=0.8, stride=2, block=4, rule='official')": ((False, True), False),
    "flexprefill(gamma=0.8, tau=0.0, block=4)": ((True,), False),
    "flexprefill(gamma=0.8, tau=10.0, block=4)": ((True,), False),
    "seer(block=4, topk=2)": ((False, True), False),
    "seer(block=4)": ((False, True), False),
    "routing(clusters=3)": ((False, True), False),
    "routing(clusters=3, causal_safe=True)": ((True,), False),
    "routing(clusters=3, share_qk=True)": ((False, True), False),
    "biformer(regions=2, topk=2)": ((False,), True),
    "biformer(regions=2, topk=1, per_head=True)": ((False,), True),
    "quest(page=4, budget=8, min_pages=1)": ((False, True), False),
    "quest(page=4, budget=8, min_pages=1, rule='evaluation')": ((False, True), False),
    "quest(page=4, budget=8, min_pages=1, group_pages=True)": ((False, True), False),
}

# mechanisms run through spattn.nn.Attention on x [B, N, dim]
MODULES = {
    "drsformer_topk": (False,),
    "scatterbrain(pattern='block_topk(k=2, block=4)')": (False, True),
    "scatterbrain": (False, True),
    "sla(k=2, block=4)": (False,),
    "sea": (False, True),
    "routing_transformer(clusters=3, window=4)": (False, True),
    "routing_transformer(clusters=3, window=4, causal_safe=True)": (True,),
    "seqboat": (False, True),
    "routing(clusters=3)": (False, True),
}


def _fill(x: torch.Tensor, pad: torch.Tensor, dim: int, gen: torch.Generator, scale: float) -> torch.Tensor:
    """``x`` with the padded positions (``pad [B, N]`` True = padding, along ``dim``) redrawn."""
    noise = torch.randn(x.shape, generator=gen, dtype=x.dtype) * scale
    shape = [1] * x.dim()
    shape[0], shape[dim] = pad.shape
    return torch.where(pad.view(shape), noise, x)


def _padding(draw_mask: list[bool], batch: int, n: int) -> torch.Tensor:
    """bool [B, N], True = real; at least one real token per row."""
    real = torch.tensor(draw_mask[: batch * n], dtype=torch.bool).view(batch, n)
    real[:, -1] |= ~real.any(1)
    return real


def _masks():
    return st.sampled_from(["right", "left", "random"])


def _make_real(kind: str, batch: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    real = torch.ones(batch, n, dtype=torch.bool)
    for b in range(batch):
        count = int(torch.randint(1, n, (1,), generator=gen))  # real tokens (1 .. n-1): always some padding
        if kind == "right":
            real[b, count:] = False
        elif kind == "left":
            real[b, : n - count] = False
        else:
            real[b] = torch.rand(n, generator=gen) < 0.6
            real[b, int(torch.randint(0, n, (1,), generator=gen))] = True
    return real


def _build(spec: str, hq: int, hkv: int, dim: int):
    pat = spattn.pattern(spec)
    if isinstance(pat, torch.nn.Module):
        torch.manual_seed(0)
        if pat.name == "seer":
            pat._create(hq, hkv, dim, torch.device("cpu"), torch.float32)
        pat.eval()
    return pat


@pytest.mark.parametrize("spec", list(PATTERNS))
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_pattern_outputs_ignore_padded_values(spec, data):
    causal_modes, square = PATTERNS[spec]
    causal = data.draw(st.sampled_from(causal_modes), label="causal")
    group = data.draw(st.sampled_from([1, 2]), label="group")
    if square == "long":
        n = data.draw(st.integers(90, 130), label="n")
    elif square:
        n = data.draw(st.sampled_from([16, 36]), label="n")
    else:
        n = data.draw(st.integers(6, 29), label="n")
    batch, hkv, dim = 2, 2, 8
    hq = hkv * group
    kind = data.draw(_masks(), label="padding")
    seed = data.draw(st.integers(0, 10_000), label="seed")
    real = _make_real(kind, batch, n, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(batch, hq, n, dim, generator=gen)
    k = torch.randn(batch, hkv, n, dim, generator=gen)
    v = torch.randn(batch, hkv, n, dim, generator=gen)
    pat = _build(spec, hq, hkv, dim)
    outs = []
    for scale in (1.0, 1e4):
        qq, kk, vv = (_fill(t, ~real, 2, gen, scale) for t in (q, k, v))
        outs.append(spattn.attention(qq, kk, vv, pat, causal=causal, key_padding_mask=real))
    rows = real[:, None, :, None].expand_as(outs[0])
    assert not torch.isnan(outs[0][rows]).any()
    assert torch.equal(outs[0][rows], outs[1][rows]), f"{spec}: real rows depend on padded values"


def _double_sparsity(hq: int, dim: int) -> DoubleSparsity:
    ds = DoubleSparsity(channels=3, budget=4)
    gen = torch.Generator().manual_seed(3)
    ds.calibrate(torch.randn(1, hq, 16, dim, generator=gen), torch.randn(1, hq, 16, dim, generator=gen))
    return ds


@pytest.mark.parametrize("which", ["double_sparsity", "double_sparsity_grouped", "tidal", "quest_state"])
@settings(max_examples=6, deadline=None)
@given(n=st.integers(6, 29), kind=_masks(), seed=st.integers(0, 10_000), group=st.sampled_from([1, 2]))
def test_decode_selectors_ignore_padded_values(which, n, kind, seed, group):
    """Decode selectors: one new query per sequence (and a few), keys padded anywhere."""
    batch, hkv, dim = 2, 2, 8
    hq = hkv * group
    real = _make_real(kind, batch, n, seed)
    real[:, -1] = True  # the newest token (the query's own) is real
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(batch, hq, 3, dim, generator=gen)
    k = torch.randn(batch, hkv, n, dim, generator=gen)
    v = torch.randn(batch, hkv, n, dim, generator=gen)
    outs = []
    for scale in (1.0, 1e4):
        kk, vv = (_fill(t, ~real, 2, gen, scale) for t in (k, v))
        if which.startswith("double_sparsity"):
            pat = _double_sparsity(hq, dim)
            pat.group_tokens = which.endswith("grouped")
            sel = pat.select(q, kk, causal=True, key_padding_mask=real)
        elif which == "tidal":
            pat, state = TidalDecode(budget=4, select_layers=(1,)), SelectorState()
            for layer in range(3):
                sel = pat.select(q, kk, causal=True, state=state.at(layer), key_padding_mask=real)
        else:
            pat, state = Quest(page=4, budget=8, min_pages=1), SelectorState()
            sel = pat.select(q, kk, causal=True, state=state.at(0), key_padding_mask=real)
        outs.append(spattn.attention(q, kk, vv, sel, key_padding_mask=real))
    assert torch.equal(outs[0], outs[1]), f"{which}: outputs depend on padded values"


@pytest.mark.parametrize("spec", list(MODULES))
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_module_outputs_and_state_ignore_padded_values(spec, data):
    causal = data.draw(st.sampled_from(MODULES[spec]), label="causal")
    n = data.draw(st.integers(6, 25), label="n")
    train = data.draw(st.booleans(), label="train")
    kind = data.draw(_masks(), label="padding")
    seed = data.draw(st.integers(0, 10_000), label="seed")
    batch, dim = 2, 16
    real = _make_real(kind, batch, n, seed)
    torch.manual_seed(0)
    layer = spattn.nn.Attention(dim, 2, attention=spec, causal=causal, max_len=32)
    layer.train(train)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, n, dim, generator=gen)
    outs, states = [], []
    for scale in (1.0, 1e4):
        run = copy.deepcopy(layer)
        xx = _fill(x, ~real, 1, gen, scale)
        torch.manual_seed(1)
        out = run(xx, key_padding_mask=real)
        out2 = run(x, key_padding_mask=real)  # learned state (k-means centroids) after the update
        outs.append((out[real], out2[real]))
        states.append({name: t.clone() for name, t in run.state_dict().items()})
    assert not torch.isnan(outs[0][0]).any()
    assert torch.equal(outs[0][0], outs[1][0]), f"{spec}: real rows depend on padded values"
    assert torch.equal(outs[0][1], outs[1][1]), f"{spec}: the state update depends on padded values"
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), f"{spec}: state {name} depends on padded values"


@pytest.mark.parametrize("kind", ["right", "left", "random"])
def test_minference_config_ignores_padded_values(tmp_path, kind):
    """``minference(config=...)``: per-head a-shape / vertical-slash / block-sparse patterns."""
    from spattn.patterns.prefill import save_minference_config

    heads = [
        {"pattern": "a_shape", "sinks": 2, "local": 8},
        {"pattern": "vertical_slash", "vertical": 3, "slash": 4},
        {"pattern": "block_sparse", "k": 2},
        {"pattern": "vertical_slash", "vertical": 40, "slash": 60},
    ]
    path = tmp_path / "config.json"
    save_minference_config(
        {"format": "spattn-minference-config", "version": 1, "block": 8, "last_q": 8, "layers": [heads]}, path
    )
    pat = spattn.pattern("minference", config=str(path))
    n, batch = 120, 2
    real = _make_real(kind, batch, n, seed=7)
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(batch, 4, n, 8, generator=gen) for _ in range(3))
    outs = []
    for scale in (1.0, 1e4):
        qq, kk, vv = (_fill(t, ~real, 2, gen, scale) for t in (q, k, v))
        outs.append(spattn.attention(qq, kk, vv, pat, causal=True, key_padding_mask=real))
    rows = real[:, None, :, None].expand_as(outs[0])
    assert torch.equal(outs[0][rows], outs[1][rows])


def test_every_content_based_mechanism_is_covered():
    """A new content-based mechanism must be added to this suite."""
    covered = {spattn.registry.parse_spec(s)[0] for s in list(PATTERNS) + list(MODULES)}
    covered |= {"double_sparsity", "tidal"}
    covered |= {"minference"}  # test_minference_config_ignores_padded_values
    wanted = {m.name for m in spattn.mechanisms() if m.kind in ("dynamic", "hybrid")}
    assert wanted <= covered, sorted(wanted - covered)


@pytest.mark.parametrize(
    "spec",
    [
        "block_topk(k=3, block=4)",
        "block_mass(threshold=0.99, block=4)",
        "minference_block(k=3, block=4)",
        "xattention(threshold=0.99, stride=2, block=4)",
        "xattention(threshold=0.99, stride=2, block=4, rule='official')",
        "seer(block=4, topk=3)",
    ],
)
@pytest.mark.parametrize("causal", [False, True])
def test_block_selectors_never_choose_a_block_of_padding(spec, causal):
    """Beyond bitwise independence: a key block holding only padding takes no slot of the budget."""
    n, batch = 40, 2
    real = torch.ones(batch, n, dtype=torch.bool)
    real[0, :12] = False  # left padding: key blocks 0-2
    real[1, 8:16] = False  # key blocks 2-3
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(batch, 2, n, 8, generator=gen), torch.randn(batch, 2, n, 8, generator=gen)
    pat = _build(spec, 2, 2, 8)
    tiles = pat.layout(q, k, causal=causal, key_padding_mask=real).to_dense()[..., ::4, ::4]  # [B, H, NQB, NKB]
    empty = ~real.view(batch, n // 4, 4).any(-1)  # [B, NKB]
    assert not (tiles & empty[:, None, None, :]).any()


def test_bad_padding_masks_are_rejected():
    q = k = torch.randn(2, 2, 12, 8)
    pat = spattn.pattern("block_topk(k=1, block=4)")
    with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor"):
        pat.layout(q, k, key_padding_mask=torch.ones(2, 12))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \[B, Nk\]"):
        spattn.pattern("xattention(stride=2, block=4)").layout(
            q, k, key_padding_mask=torch.ones(2, 11, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \[B, Nk\]"):
        Quest(page=4, budget=4, min_pages=1).select(
            q[:, :, :1], k, key_padding_mask=torch.ones(1, 12, dtype=torch.bool)
        )
