"""Linear-attention family (linear, performer, lightning, gla, soft) against naive quadratic references."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spattn
from spattn.approx.featuremaps import favor_logits, orthogonal_gaussian
from spattn.approx.gla import GatedLinearAttention, LightningAttention
from spattn.approx.linear import LinearAttention, Performer
from spattn.approx.linear_core import _gated_scores, chunked_causal
from spattn.approx.soft import SOFT, newton_schulz_pinv
from spattn.approx.reference import naive_decayed, naive_gla, naive_lightning, naive_linear, naive_performer, naive_soft

from .approx_helpers import assert_close_rel, assert_matches, padding_mask, rand_qkv


# ------------------------------------------------------------------------------- fixtures (references: spattn.approx.reference)
def gla(d=8, seed=0, **kw):
    torch.manual_seed(seed)
    mod = GatedLinearAttention(head_dim=d, **kw)
    with torch.no_grad():  # gates spread over (0, 1) so the decays matter
        mod.gate_up.bias.uniform_(-4, 4)
    return mod


# ------------------------------------------------------------------------------- core scan
@pytest.mark.parametrize("gate", ["none", "head", "dim"])
@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_chunked_causal_matches_naive_and_state(gate, chunk):
    q, k, v = rand_qkv(b=2, hq=3, hkv=3, n=23, d=4, dv=5, seed=chunk)
    g = {
        "none": None,
        "head": -torch.rand(1, 3, 1, 1, dtype=torch.float64),
        "dim": -torch.rand(2, 3, 23, 4, dtype=torch.float64) * 2,
    }[gate]
    q, k, v = q.double(), k.double(), v.double()
    s0 = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    out, state = chunked_causal(q, k, v, g, chunk=chunk, state=s0)
    gg = torch.zeros(1, 1, 1, 1, dtype=torch.float64) if g is None else g
    want = naive_decayed(q, k, v, gg, causal=True)
    G = torch.cumsum(gg.expand(2, 3, 23, gg.shape[-1]), 2)
    want = want + (q * torch.exp(G)) @ s0  # the initial state decays like a token before the first
    assert_close_rel(out, want, 1e-12, "out")
    last = torch.exp(G[:, :, -1:] - G).expand(2, 3, 23, 4)
    want_state = torch.exp(G[:, :, -1]).expand(2, 3, 4).unsqueeze(-1) * s0 + (k * last).transpose(-1, -2) @ v
    assert_close_rel(state, want_state, 1e-12, "state")


def test_gated_scores_slabs():
    """Building the decay tensor slab by slab gives the same scores as all at once."""
    qc, kc = torch.randn(2, 2, 7, 5, 3, dtype=torch.float64), torch.randn(2, 2, 7, 5, 3, dtype=torch.float64)
    G = torch.cumsum(-torch.rand(2, 2, 7, 5, 3, dtype=torch.float64), 3)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    whole = _gated_scores(qc, kc, G, mask, budget=10**9)
    assert torch.equal(whole, _gated_scores(qc, kc, G, mask, budget=2 * 2 * 5 * 5 * 3 * 2))  # 2 chunks a slab
    want = torch.einsum("bhctd,bhcsd,bhctsd->bhcts", qc, kc, torch.exp(G.unsqueeze(-2) - G.unsqueeze(-3))) * mask
    assert_close_rel(whole, want, 1e-12, "scores")


def test_chunked_gates_mixed_safe_and_strong_chunks():
    """Mild chunks take the factored matmul, strongly decaying ones the exact form: both match naive."""
    q, k, v = rand_qkv(b=2, hq=2, hkv=2, n=48, d=4)
    g = -torch.rand(2, 2, 48, 4, dtype=torch.float64) * 0.1
    g[1, 0, 20:26, 2] = -25.0  # only the second chunk of 16 goes past the factored limit
    assert_matches(
        lambda a, b, c: chunked_causal(a, b, c, g.to(a.dtype), chunk=16)[0],
        lambda a, b, c: naive_decayed(a, b, c, g, causal=True),
        q,
        k,
        v,
    )


def test_chunked_gates_log_space_stable():
    """Strong decays (down to exp(-1000) over a chunk) neither overflow nor NaN, forward or backward."""
    q, k, v = rand_qkv(b=1, hq=2, hkv=2, n=40, d=4, dtype=torch.float32)
    g = -torch.rand(1, 2, 40, 4) * 60
    q.requires_grad_()
    out, _ = chunked_causal(q, k, v, g, chunk=16)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    want = naive_decayed(q.double().detach(), k.double(), v.double(), g.double(), causal=True)
    assert_close_rel(out, want, 1e-5, "strong gates")


# ------------------------------------------------------------------------------- linear (elu+1)
@pytest.mark.parametrize("causal", [False, True])
def test_linear_matches_naive(causal):
    q, k, v = rand_qkv()
    mech = LinearAttention(chunk=8)
    assert_matches(lambda a, b, c: mech(a, b, c, causal=causal), lambda a, b, c: naive_linear(a, b, c, causal), q, k, v)


@pytest.mark.parametrize("causal", [False, True])
def test_linear_key_padding(causal):
    q, k, v = rand_qkv(n=20)
    kpm = padding_mask(2, 20, [20, 11])
    mech = LinearAttention(chunk=8)
    out = mech(q, k, v, causal=causal, key_padding_mask=kpm)
    assert_close_rel(out, naive_linear(q.double(), k.double(), v.double(), causal, kpm), 1e-5, "padded")
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 11:] += 5.0
    v2[1, :, 11:] -= 3.0
    assert torch.equal(out, mech(q, k2, v2, causal=causal, key_padding_mask=kpm))
    none = mech(q, k, v, causal=causal, key_padding_mask=torch.zeros(2, 20, dtype=torch.bool))
    assert torch.equal(none, torch.zeros_like(none)), "no real key -> zeros"


@settings(max_examples=8, deadline=None)
@given(
    b=st.integers(1, 2),
    hkv=st.integers(1, 2),
    g=st.integers(1, 2),
    n=st.integers(1, 30),
    chunk=st.integers(1, 9),
    causal=st.booleans(),
)
def test_linear_property(b, hkv, g, n, chunk, causal):
    q, k, v = rand_qkv(b=b, hq=hkv * g, hkv=hkv, n=n, d=4, dtype=torch.float64)
    out = LinearAttention(chunk=chunk)(q, k, v, causal=causal)
    assert_close_rel(out, naive_linear(q, k, v, causal), 1e-10, "linear")


def _check_recurrent(mech, q, k, v, rtol=1e-5):
    """Token-by-token steps and prefill + steps equal the causal parallel forward."""
    want = mech(q, k, v, causal=True)
    state, outs = None, []
    for t in range(q.shape[2]):
        o, state = mech.step(q[:, :, t], k[:, :, t], v[:, :, t], state)
        outs.append(o)
    assert_close_rel(torch.stack(outs, 2), want, rtol, "steps")
    half = q.shape[2] // 2
    first, state = mech.prefill(q[:, :, :half], k[:, :, :half], v[:, :, :half])
    outs = [first]
    for t in range(half, q.shape[2]):
        o, state = mech.step(q[:, :, t], k[:, :, t], v[:, :, t], state)
        outs.append(o.unsqueeze(2))
    assert_close_rel(torch.cat(outs, 2), want, rtol, "prefill+steps")


def _check_causality(mech, q, k, v, i):
    out = mech(q, k, v, causal=True)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[:, :, i + 1 :] = torch.randn_like(x[:, :, i + 1 :]) * 3
    out2 = mech(q2, k2, v2, causal=True)
    assert_close_rel(out2[:, :, : i + 1], out[:, :, : i + 1], 1e-6, "causality")
    assert not torch.allclose(out2[:, :, i + 1 :], out[:, :, i + 1 :]), "later outputs should change"


def test_linear_recurrent_and_causal():
    q, k, v = rand_qkv(n=19)
    mech = LinearAttention(chunk=4)
    _check_recurrent(mech, q, k, v)
    _check_causality(mech, q, k, v, 9)


# ------------------------------------------------------------------------------- performer
@pytest.mark.parametrize("causal", [False, True])
def test_performer_matches_naive(causal):
    q, k, v = rand_qkv(n=29)
    mech = Performer(features=24, chunk=8, head_dim=8).eval()
    w = mech.projection.clone()
    assert_matches(
        lambda a, b, c: mech(a, b, c, causal=causal), lambda a, b, c: naive_performer(a, b, c, w, causal), q, k, v
    )


@pytest.mark.parametrize("causal", [False, True])
def test_performer_stabiliser_cancels(causal):
    """With eps=0 the stabilised features give exactly the unstabilised estimator."""
    q, k, v = rand_qkv(n=21, dtype=torch.float64)
    mech = Performer(features=16, chunk=8, eps=0.0, head_dim=8).eval()
    want = naive_performer(q, k, v, mech.projection.double(), causal, eps=0.0, stabilise=False)
    assert_close_rel(mech(q, k, v, causal=causal), want, 1e-10, "stabiliser")


def test_performer_key_padding_recurrent_causal():
    q, k, v = rand_qkv(n=18)
    mech = Performer(features=32, chunk=4, head_dim=8).eval()
    kpm = padding_mask(2, 18, [18, 7])
    out = mech(q, k, v, key_padding_mask=kpm)
    want = naive_performer(q.double(), k.double(), v.double(), mech.projection.double(), False, kpm)
    assert_close_rel(out, want, 1e-5, "padding")
    _check_recurrent(mech, q, k, v)
    _check_causality(mech, q, k, v, 8)


@pytest.mark.slow
def test_performer_features_unbiased_orthogonal():
    """Rows of W are orthogonal within a block, marginally Gaussian; E[phi(q).phi(k)] = exp(q.k / sqrt(d))."""
    gen = torch.Generator().manual_seed(0)
    w = orthogonal_gaussian(16, 8, generator=gen, dtype=torch.float64)
    dirs = w / w.norm(dim=1, keepdim=True)
    assert torch.allclose(dirs[:8] @ dirs[:8].T, torch.eye(8, dtype=torch.float64), atol=1e-12)
    q = torch.randn(3, 8, generator=gen, dtype=torch.float64) * 0.7
    k = torch.randn(3, 8, generator=gen, dtype=torch.float64) * 0.7
    est = []
    for _ in range(200):
        w = orthogonal_gaussian(16, 8, generator=gen, dtype=torch.float64)
        est.append((torch.exp(favor_logits(q, w)) * torch.exp(favor_logits(k, w))).sum(-1) / 16)
    est = torch.stack(est)
    exact = torch.exp((q * k).sum(-1) / math.sqrt(8))
    se = est.std(0) / math.sqrt(est.shape[0])
    assert ((est.mean(0) - exact).abs() < 4 * se).all(), (est.mean(0), exact, se)


@pytest.mark.slow
def test_performer_error_shrinks_with_features():
    """Mean error against exact softmax attention falls with the number of features (~ m^-1/2)."""
    q, k, v = rand_qkv(b=1, hq=2, hkv=2, n=48, d=16, dtype=torch.float64, scale=0.6, seed=3)
    exact = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) @ v
    errs = []
    for m in (8, 32, 128, 512):
        e = [
            (Performer(features=m, seed=s, head_dim=16, eps=0.0)(q, k, v) - exact).pow(2).mean().sqrt()
            for s in range(6)
        ]
        errs.append(torch.stack(e).mean().item())
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.3 * errs[0], errs  # m^-1/2 predicts 1/8


def test_performer_redraw():
    mech = Performer(features=8, redraw=3, head_dim=4, seed=5)
    q, k, v = rand_qkv(b=1, hq=1, hkv=1, n=5, d=4)
    w0 = mech.projection.clone()
    assert torch.equal(w0, Performer(features=8, redraw=3, head_dim=4, seed=5).projection), "seeded"
    mech.eval()
    for _ in range(5):
        mech(q, k, v)
    assert torch.equal(mech.projection, w0), "no redraw in eval mode"
    mech.train()
    for _ in range(3):
        mech(q, k, v)
    assert torch.equal(mech.projection, w0)
    mech(q, k, v)
    assert not torch.equal(mech.projection, w0), "redrawn on the 4th training call"
    assert int(mech.draws) == 2
    assert "projection" in mech.state_dict()
    never = Performer(features=8, redraw=0, head_dim=4).train()
    p = never.projection.clone()
    for _ in range(3):
        never(q, k, v)
    assert torch.equal(p, never.projection)


# ------------------------------------------------------------------------------- lightning, gla
@pytest.mark.parametrize("causal", [False, True])
def test_lightning_matches_naive(causal):
    q, k, v = rand_qkv(n=30)
    mech = LightningAttention(chunk=8, heads=4)
    assert_matches(
        lambda a, b, c: mech(a, b, c, causal=causal), lambda a, b, c: naive_lightning(a, b, c, causal), q, k, v
    )


@pytest.mark.parametrize("causal", [False, True])
def test_gla_matches_naive(causal):
    q, k, v = rand_qkv(n=30)
    mech = gla(chunk=8)
    mech64 = copy.deepcopy(mech).double()
    assert_matches(
        lambda a, b, c: (mech64 if a.dtype == torch.float64 else mech)(a, b, c, causal=causal),
        lambda a, b, c: naive_gla(mech, a, b, c, causal),
        q,
        k,
        v,
    )


def test_gla_gate_gradients_match_naive():
    q, k, v = rand_qkv(n=20)
    mech = gla(chunk=8)
    mech64 = copy.deepcopy(mech).double()
    g = torch.randn(2, 4, 20, 8, dtype=torch.float64)
    (mech(q, k, v, causal=True) * g.float()).sum().backward()
    (naive_gla(mech64, q.double(), k.double(), v.double(), True) * g).sum().backward()
    for name in ("gate_down.weight", "gate_up.weight", "gate_up.bias"):
        got, want = mech.get_parameter(name).grad, mech64.get_parameter(name).grad
        assert want.abs().max() > 0
        assert_close_rel(got, want, 1e-5, name)


@settings(max_examples=8, deadline=None)
@given(
    name=st.sampled_from(["lightning", "gla", "performer"]),
    b=st.integers(1, 2),
    hkv=st.integers(1, 2),
    g=st.integers(1, 2),
    n=st.integers(1, 26),
    chunk=st.integers(1, 9),
    causal=st.booleans(),
    pad=st.integers(0, 5),
)
def test_family_property(name, b, hkv, g, n, chunk, causal, pad):
    """fp64 against the naive references over shapes: GQA, lengths not a multiple of the chunk, padding."""
    q, k, v = rand_qkv(b=b, hq=hkv * g, hkv=hkv, n=n, d=4, dtype=torch.float64, seed=n)
    kpm = padding_mask(b, n, [n] + [max(0, n - pad)] * (b - 1))
    if name == "lightning":
        got = LightningAttention(chunk=chunk)(q, k, v, causal=causal, key_padding_mask=kpm)
        want = naive_lightning(q, k, v, causal, kpm=kpm)
    elif name == "gla":
        mech = gla(d=4, chunk=chunk).double()
        got = mech(q, k, v, causal=causal, key_padding_mask=kpm)
        want = naive_gla(mech, q, k, v, causal, kpm=kpm)
    else:
        mech = Performer(features=8, chunk=chunk, head_dim=4).eval()
        got = mech(q, k, v, causal=causal, key_padding_mask=kpm)
        # the naive reference divides 0 / 0 on a row without real keys; the contract there is zeros
        want = naive_performer(q, k, v, mech.projection.double(), causal, kpm).nan_to_num(nan=0.0)
    assert not torch.isnan(got).any()
    assert_close_rel(got, want, 1e-10, name)


@pytest.mark.parametrize("name", ["lightning", "gla"])
def test_decayed_padding_recurrent_causal(name):
    q, k, v = rand_qkv(n=21)
    mech = LightningAttention(chunk=4, heads=4) if name == "lightning" else gla(chunk=4)
    kpm = padding_mask(2, 21, [21, 12])
    naive = (
        (lambda *a, **kw: naive_lightning(*a, **kw))
        if name == "lightning"
        else (lambda *a, **kw: naive_gla(mech, *a, **kw))
    )
    for causal in (False, True):
        out = mech(q, k, v, causal=causal, key_padding_mask=kpm)
        assert_close_rel(out, naive(q.double(), k.double(), v.double(), causal, kpm=kpm), 1e-5, "padding")
    _check_recurrent(mech, q, k, v)
    _check_causality(mech, q, k, v, 10)


# ------------------------------------------------------------------------------- soft
def test_soft_matches_naive_and_padding():
    q, k, v = rand_qkv(n=26, scale=0.5)
    mech = SOFT(landmarks=6)
    assert_matches(lambda a, b, c: mech(a, b, c), lambda a, b, c: naive_soft(a, c, 6), q, k, v, rtol32=1e-4)
    kpm = padding_mask(2, 26, [26, 9])
    out = mech(q, k, v, key_padding_mask=kpm)
    assert_close_rel(out, naive_soft(q.double(), v.double(), 6, kpm=kpm), 1e-4, "padding")
    k2 = torch.randn_like(k)
    assert torch.equal(out, mech(q, k2, v, key_padding_mask=kpm)), "tied Q = K: k is unused"


def test_newton_schulz_pinv():
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    a = torch.exp(-0.5 * torch.cdist(x, x).pow(2))
    assert_close_rel(newton_schulz_pinv(a, 60), torch.linalg.pinv(a), 1e-6, "pinv")


def test_soft_all_landmarks_is_exact_kernel():
    """With every token its own landmark, the Nyström form is the exact kernel attention S V."""
    q, _, v = rand_qkv(b=1, hq=2, hkv=2, n=6, d=4, dtype=torch.float64, scale=2.0)
    x = q / 4**0.25
    exact = torch.exp(-0.5 * torch.cdist(x, x).pow(2)) @ v
    assert_close_rel(SOFT(landmarks=6, iters=60)(q, q, v), exact, 1e-6, "exact")


@pytest.mark.parametrize("name", ["linear", "performer", "lightning", "gla"])
def test_low_precision_keeps_fp32_state(name):
    """bf16 inputs: states and cumulative gates in fp32, output in bf16 within bf16 rounding of fp32."""
    q, k, v = rand_qkv(n=300, d=8)
    mech = {
        "linear": lambda: LinearAttention(),
        "performer": lambda: Performer(features=16, head_dim=8).eval(),
        "lightning": lambda: LightningAttention(),
        "gla": lambda: gla(),
    }[name]()
    want = mech(q, k, v, causal=True)
    got = mech(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert_close_rel(got, want, 0.05, "bf16")


# ------------------------------------------------------------------------------- errors and nn
def test_errors():
    q, k, v = rand_qkv()
    with pytest.raises(ValueError, match="causal"):
        SOFT()(q, k, v, causal=True)
    with pytest.raises(ValueError, match="multiple"):
        LinearAttention()(q[:, :3], k, v)
    with pytest.raises(ValueError, match="shape"):
        LinearAttention()(q[0], k, v)
    with pytest.raises(TypeError, match="key_padding_mask"):
        LinearAttention()(q, k, v, key_padding_mask=torch.ones(2, 37))
    with pytest.raises(ValueError, match="key_padding_mask"):
        LinearAttention()(q, k, v, key_padding_mask=torch.ones(2, 36, dtype=torch.bool))
    with pytest.raises(ValueError, match="chunk"):
        LinearAttention(chunk=0)
    with pytest.raises(ValueError, match="features"):
        Performer(features=0)
    with pytest.raises(ValueError, match="head_dim"):
        Performer(head_dim=4)(q, k, v)
    with pytest.raises(ValueError, match="head_dim"):
        GatedLinearAttention()
    with pytest.raises(ValueError, match="activation"):
        LightningAttention(activation="relu")
    with pytest.raises(ValueError, match="heads"):
        LightningAttention(heads=3)(q, k, v)
    with pytest.raises(ValueError, match="landmarks"):
        SOFT(landmarks=0)
    with pytest.raises(ValueError, match="no causal form"):
        spattn.nn.Attention(32, 4, attention="soft", causal=True)


SPECS = [
    "linear",
    "linear(chunk=16)",
    "performer",
    "performer(features=64)",
    "lightning",
    "lightning(chunk=32)",
    "gla",
    "gla(rank=8)",
    "soft",
    "soft(landmarks=8)",
]


@pytest.mark.parametrize("spec", SPECS)
def test_nn_attention_builds_every_spec(spec):
    causal_ok = not spec.startswith("soft")
    for causal in (False, True) if causal_ok else (False,):
        torch.manual_seed(0)
        layer = spattn.nn.Attention(32, 4, attention=spec, kv_heads=2, causal=causal)
        x = torch.randn(2, 40, 32, requires_grad=True)
        kpm = padding_mask(2, 40, [40, 25])
        y = layer(x, key_padding_mask=kpm)
        assert y.shape == x.shape and torch.isfinite(y).all()
        y.sum().backward()
        assert torch.isfinite(x.grad).all()
    assert spec.split("(")[0] in {m.name for m in spattn.mechanisms()}
