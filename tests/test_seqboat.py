"""SeqBoat / Sparse Modular Activation against naive per-token loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import spattn
from spattn.nn.ema import MultiHeadEMA
from spattn.nn.gau import RelativeBias, compress, extract, local_attention
from spattn.nn.reference import naive_local, naive_seqboat
from spattn.nn.seqboat import SeqBoat


# ------------------------------------------------------------------------------- compress / extract
@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 3), N=st.integers(1, 12), seed=st.integers(0, 1000))
def test_compress_extract_match_loop(B, N, seed):
    g = torch.Generator().manual_seed(seed)
    act = torch.rand(B, N, generator=g) < 0.5
    act[0] = act[0] if N > 3 else True
    x = torch.randn(B, N, 3, generator=g)
    slot = act.long() * act.long().cumsum(1)
    L = int(act.sum(1).max())
    # (b, i, c): the c-th active position of row b is position i
    kept = [(b, i, c) for b in range(B) for c, i in enumerate(i for i in range(N) if act[b, i])]
    got = compress(x, slot, L)
    want = torch.zeros(B, L, 3)
    for b, i, c in kept:
        want[b, c] = x[b, i]
    assert torch.equal(got, want)
    h = torch.randn(B, L, 2, generator=g)
    back = extract(h, slot)
    want_back = torch.zeros(B, N, 2)
    for b, i, c in kept:
        want_back[b, i] = h[b, c]
    assert torch.equal(back, want_back)


@pytest.mark.parametrize("fn", ["softmax", "relu2"])
@pytest.mark.parametrize("causal", [False, True])
def test_local_attention_matches_loop(fn, causal):
    g = torch.Generator().manual_seed(0)
    B, L, w = 2, 11, 3
    q, k = (torch.randn(B, L, 4, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, L, 5, generator=g, dtype=torch.float64)
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, 7:] = False
    pos = torch.sort(torch.randperm(40, generator=g)[: 2 * L].view(B, L), dim=1).values  # original positions
    bias = RelativeBias(16).double()
    with torch.no_grad():
        bias.table.copy_(torch.randn(31, generator=g, dtype=torch.float64))
    args = (valid, pos, bias, w, causal, fn)
    q_, k_, v_ = (t.clone().requires_grad_() for t in (q, k, v))
    got = local_attention(q_, k_, v_, *args[:2], args[2], w, causal, fn)
    want = naive_local(q, k, v, *args)
    assert (got - want).abs().max() < 1e-12
    got.sum().backward()
    assert not torch.isnan(q_.grad).any()


# -------------------------------------------------------------------------------------------- EMA
def test_ema_fft_matches_recurrence_and_bidirectional_sum():
    torch.manual_seed(0)
    ema = MultiHeadEMA(6, ndim=4).double()
    x = torch.randn(2, 13, 6, dtype=torch.float64)
    y_rec, _ = ema.recurrent(x)
    assert (ema(x) - y_rec).abs().max() < 1e-10
    bi = MultiHeadEMA(6, ndim=4, bidirectional=True).double()
    k = bi.kernel(13)
    want = torch.zeros_like(x)
    for t in range(13):
        for s in range(13):
            if s <= t:
                want[:, t] += k[:6, t - s] * x[:, s]
            if s >= t:
                want[:, t] += k[6:, s - t] * x[:, s]
    want += bi.omega * x
    assert (bi(x) - want).abs().max() < 1e-10


# ----------------------------------------------------------------------------------- whole layer
@pytest.mark.parametrize(
    "causal,fn,prenorm", [(False, "softmax", True), (True, "relu2", True), (True, "softmax", False)]
)
def test_layer_matches_token_loop(causal, fn, prenorm):
    torch.manual_seed(1)
    layer = SeqBoat(
        dim=8,
        window=2,
        zdim=4,
        hdim=6,
        ndim=3,
        attn_fn=fn,
        max_positions=8,
        prenorm=prenorm,
        causal=causal,
        init_temp_scale=0.05,
    ).double()
    with torch.no_grad():  # larger router weights so that about half of the tokens activate
        layer.hx_proj.weight[:2].normal_()
        layer.rel_bias.table.normal_()
    x = torch.randn(2, 11, 8, dtype=torch.float64, requires_grad=True)
    real = torch.ones(2, 11, dtype=torch.bool)
    real[1, 8:] = False
    got = layer(x, key_padding_mask=real)
    assert 0.1 < float(layer.activation_rate) < 0.9
    want = naive_seqboat(layer, x, real)
    assert (got - want).abs().max() < 1e-10
    g = torch.randn_like(got)
    ga = torch.autograd.grad((got * g).sum(), [x] + list(layer.parameters()), allow_unused=True)
    gb = torch.autograd.grad((want * g).sum(), [x] + list(layer.parameters()), allow_unused=True)
    for a, b in zip(ga, gb):
        if a is None or b is None:
            assert a is None or not a.any()
            continue
        assert (a - b).abs().max() < 1e-9


def test_router_gradient_only_through_gate():
    torch.manual_seed(0)
    layer = SeqBoat(dim=16, window=4, zdim=8, init_temp_scale=0.05)
    with torch.no_grad():
        layer.hx_proj.weight[:2].normal_()
    x = torch.randn(2, 20, 16)
    layer(x).square().sum().backward()
    assert layer.hx_proj.weight.grad[:2].abs().sum() > 0 and layer.log_temp.grad.abs() > 0
    layer.zero_grad(set_to_none=False)
    route = layer.route
    layer.route = lambda mx, real: tuple(t.detach() if i == 2 else t for i, t in enumerate(route(mx, real)))
    layer(x).square().sum().backward()  # gate detached: the router receives no gradient at all
    assert layer.hx_proj.weight.grad[:2].abs().sum() == 0 and layer.log_temp.grad == 0


@pytest.mark.parametrize("fn", ["softmax", "relu2"])
def test_causal_no_leakage(fn):
    torch.manual_seed(0)
    layer = SeqBoat(dim=16, window=3, zdim=8, attn_fn=fn, causal=True, init_temp_scale=0.05)
    with torch.no_grad():
        layer.hx_proj.weight[:2].normal_()
    x = torch.randn(2, 30, 16)
    out = layer(x)
    for t in (0, 9, 20):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :]) * 3
        assert torch.allclose(layer(x2)[:, : t + 1], out[:, : t + 1], atol=1e-5)


def test_activation_rate_attribute():
    torch.manual_seed(0)
    layer = SeqBoat(dim=16, window=4, zdim=8, init_temp_scale=0.05)
    with torch.no_grad():
        layer.hx_proj.weight[:2].normal_()
    x = torch.randn(3, 25, 16)
    real = torch.ones(3, 25, dtype=torch.bool)
    real[2, 10:] = False
    layer(x, key_padding_mask=real)
    assert layer.active.shape == (3, 25) and not (layer.active & ~real).any()
    assert math.isclose(float(layer.activation_rate), layer.active.sum().item() / real.sum().item(), rel_tol=1e-6)
    with torch.no_grad():  # router biased to "skip": nothing activates, rate 0, output still defined
        layer.hx_proj.bias[0] = 1e4
    y = layer(x)
    assert float(layer.activation_rate) == 0.0 and not torch.isnan(y).any()


@pytest.mark.slow
def test_training_sanity():
    """A 1-layer SeqBoat model learns a toy task (predict the previous token) in a few steps."""
    torch.manual_seed(0)
    V, D = 8, 16
    emb = torch.nn.Embedding(V, D)
    layer = spattn.nn.Attention(D, 1, attention="seqboat(window=8, zdim=8)", causal=True)
    head = torch.nn.Linear(D, V)
    params = list(emb.parameters()) + list(layer.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=2e-2)
    losses = []
    for _ in range(25):
        tok = torch.randint(0, V, (4, 24))
        logits = head(layer(emb(tok)))
        loss = F.cross_entropy(logits[:, 1:].reshape(-1, V), tok[:, :-1].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5


def test_nn_attention_bare_name_and_errors():
    for causal in (False, True):
        layer = spattn.nn.Attention(32, 4, attention="seqboat", causal=causal, max_len=64)
        y = layer(torch.randn(2, 40, 32))
        assert y.shape == (2, 40, 32)
        assert layer.mechanism.max_positions == 64 and layer.mechanism.causal == causal
    with pytest.raises(ValueError, match="dim"):
        SeqBoat()
    with pytest.raises(ValueError, match="window"):
        SeqBoat(dim=8, window=0)
    with pytest.raises(ValueError, match="attn_fn"):
        SeqBoat(dim=8, attn_fn="laplace")
    with pytest.raises(ValueError, match="init_temp_scale"):
        SeqBoat(dim=8, init_temp_scale=0)
    with pytest.raises(ValueError, match="x must"):
        SeqBoat(dim=8)(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="key_padding_mask"):
        SeqBoat(dim=8)(torch.randn(2, 5, 8), key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
