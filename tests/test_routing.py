"""Routing Transformer: k-means routing pattern, cluster-window kernel, RoutingAttention."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import given, settings, strategies as st

import spattn
from spattn.kernels.clustered import clustered_attention
from spattn.patterns.routing import Routing, layer_norm
from spattn.selection import ClusterSelection
from spattn.patterns.reference import brute_routing_causal_safe, brute_routing_scores, brute_routing_windows

from .helpers import random_qkv


# --------------------------------------------------------------------------------- selection


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("share_qk", [None, False, True])
def test_windows_equal_bruteforce_top_w(causal, share_qk):
    b, hq, hkv, n, d, c = 2, 4, 2, 23, 8, 3
    q, k, _ = random_qkv(b, hq, hkv, n, n, d)
    r = Routing(clusters=c, share_qk=share_qk, heads=hq, head_dim=d).eval()
    sel = r.select(q, k, causal=causal)
    w = -(-n // c)
    want_q = brute_routing_windows(brute_routing_scores(q, r.centroids, hq), w)
    assert sel.query_indices.tolist() == want_q
    if share_qk or (share_qk is None and causal):  # None: shared windows when causal (the paper's decoder)
        assert sel.key_indices.tolist() == want_q
    else:
        assert sel.key_indices.tolist() == brute_routing_windows(brute_routing_scores(k, r.centroids, hq), w)
    assert sel.causal == causal


def test_causal_safe_windows_equal_bruteforce():
    b, h, n, d, c, w = 2, 2, 29, 8, 3, 4
    q, k, _ = random_qkv(b, h, h, n, n, d, seed=3)
    r = Routing(clusters=c, window=w, causal_safe=True, heads=h, head_dim=d).eval()
    dense = r.select(q, k, causal=True).to_dense()
    scores = brute_routing_scores(q, r.centroids, h)
    want = brute_routing_causal_safe(scores, w)
    assert torch.equal(dense, want)


def test_padded_keys_are_chosen_last():
    q, k, _ = random_qkv(1, 1, 1, 16, 16, 8)
    kpm = torch.ones(1, 16, dtype=torch.bool)
    kpm[0, 10:] = False
    r = Routing(clusters=4, heads=1, head_dim=8).eval()
    sel = r.select(q, k, key_padding_mask=kpm)  # w = 4 <= 10 real keys per centroid
    assert int(sel.key_indices.max()) < 10


# --------------------------------------------------------------------------------- kernel


def _random_selection(b, h, c, wq, wk, nq, nk, causal, gen, repeats):
    def windows(w, n):
        idx = torch.rand(b, h, c, n, generator=gen).argsort(-1)[..., :w]
        if repeats:  # causal-safe windows repeat members; the kernel must treat windows as sets
            idx = torch.where(torch.rand(b, h, c, w, generator=gen) < 0.3, idx[..., :1], idx)
        return idx.sort(-1).values

    return ClusterSelection(windows(wq, nq), windows(wk, nk), nq, nk, causal=causal)


def _grads(fn, q, k, v, sel, kpm, seed=0):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, sel, key_padding_mask=kpm)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    if out.requires_grad:  # False when no query sees any key
        (out * g).sum().backward()
    zero = [torch.zeros_like(x) if x.grad is None else x.grad for x in (q, k, v)]
    return (out.detach(), *zero)


def _reference(q, k, v, sel, key_padding_mask=None):
    return clustered_attention(q, k, v, sel, key_padding_mask=key_padding_mask, reference=True)


@settings(max_examples=16, deadline=None)
@given(
    b=st.integers(1, 2),
    hkv=st.integers(1, 2),
    group=st.integers(1, 2),
    nq=st.integers(3, 21),
    extra=st.integers(0, 6),
    c=st.integers(1, 3),
    causal=st.booleans(),
    pad=st.booleans(),
    sel_heads=st.sampled_from(["all", "one"]),
    repeats=st.booleans(),
    shared=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_kernel_matches_naive_reference(b, hkv, group, nq, extra, c, causal, pad, sel_heads, repeats, shared, seed):
    nk = nq if shared else nq + extra
    hq = hkv * group
    gen = torch.Generator().manual_seed(seed)
    wq, wk = int(torch.randint(1, nq + 1, (1,), generator=gen)), int(torch.randint(1, nk + 1, (1,), generator=gen))
    sel = _random_selection(b, hq if sel_heads == "all" else 1, c, wq, wk, nq, nk, causal, gen, repeats)
    if shared:  # shared-QK windows (the kernel's lower-triangular fast path when causal)
        sel = ClusterSelection(sel.query_indices, sel.query_indices, nq, nk, causal=causal)
    kpm = (torch.rand(b, nk, generator=gen) > 0.3) if pad else None
    if pad:
        kpm[0] = False  # a batch entry with no real key: zeros, never NaN
    for dtype, atol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        q, k, v = random_qkv(b, hq, hkv, nq, nk, 8, dtype, seed)
        got = _grads(clustered_attention, q, k, v, sel, kpm)
        want = _grads(_reference, q.double(), k.double(), v.double(), sel, kpm)
        for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
            assert not torch.isnan(x).any(), name
            err = (x.double() - y).abs().max().item()
            assert err <= atol, f"{dtype} {name}: {err:.3g}"


def test_reference_is_the_mean_of_window_softmaxes():
    """Hand-built selection: query 1 in two windows gets the mean, query 3 in none gets zeros."""
    q, k, v = random_qkv(1, 1, 1, 4, 4, 4, torch.float64)
    qi = torch.tensor([[[[0, 1], [1, 2]]]])
    ki = torch.tensor([[[[0, 1], [2, 3]]]])
    out = clustered_attention(q, k, v, ClusterSelection(qi, ki, 4, 4), reference=True)
    fast = clustered_attention(q, k, v, ClusterSelection(qi, ki, 4, 4))

    def soft(i, keys):
        return torch.softmax(q[0, 0, i] @ k[0, 0, keys].T / 2.0, -1) @ v[0, 0, keys]

    assert torch.allclose(out[0, 0, 0], soft(0, [0, 1]))
    assert torch.allclose(out[0, 0, 1], (soft(1, [0, 1]) + soft(1, [2, 3])) / 2)
    assert torch.allclose(out[0, 0, 2], soft(2, [2, 3]))
    assert torch.equal(out[0, 0, 3], torch.zeros(4, dtype=torch.float64))
    assert torch.allclose(fast, out, atol=1e-12)


@pytest.mark.parametrize("pad", [False, True])  # without padding the kernel takes SDPA's unmasked/causal paths
@pytest.mark.parametrize(
    "causal,safe,share_qk", [(False, False, None), (True, False, None), (True, True, None), (True, False, False)]
)
def test_attention_on_routing_matches_reference(causal, safe, share_qk, pad):
    q, k, v = random_qkv(2, 4, 2, 37, 37, 8, torch.float64)
    r = Routing(clusters=4, causal_safe=safe, share_qk=share_qk, heads=4, head_dim=8).eval()
    kpm = (torch.rand(2, 37, generator=torch.Generator().manual_seed(1)) > 0.2) if pad else None
    got = spattn.attention(q, k, v, r, causal=causal, key_padding_mask=kpm)
    want = spattn.attention(q, k, v, r, causal=causal, key_padding_mask=kpm, backend="reference")
    assert (got - want).abs().max() <= 1e-10


def test_kernel_errors():
    q, k, v = random_qkv(1, 2, 1, 8, 8, 4)
    sel = ClusterSelection(torch.zeros(1, 2, 2, 3, dtype=torch.long), torch.zeros(1, 2, 2, 3, dtype=torch.long), 8, 8)
    with pytest.raises(ValueError, match="return_lse"):
        clustered_attention(q, k, v, sel, return_lse=True)
    with pytest.raises(ValueError, match="return_lse"):
        spattn.attention(q, k, v, Routing(clusters=2).eval(), return_lse=True)
    with pytest.raises(ValueError, match="selection is for"):
        clustered_attention(q[:, :, :6], k, v, sel)
    with pytest.raises(ValueError, match="heads"):
        clustered_attention(q.repeat(1, 2, 1, 1), k, v, sel)
    with pytest.raises(TypeError, match="ClusterSelection"):
        clustered_attention(q, k, v, "routing")
    with pytest.raises(TypeError, match="key_padding_mask"):
        clustered_attention(q, k, v, sel, key_padding_mask=torch.ones(1, 8))
    with pytest.raises(ValueError, match="routing windows"):
        spattn.attention(q, k, v, Routing(clusters=2).eval(), backend="blocksparse")


# --------------------------------------------------------------------------------- learning


def _clustered_data(centers, b, n, gen):
    labels = torch.randint(0, centers.shape[0], (b, n), generator=gen)
    x = centers[labels] + 0.3 * torch.randn(b, n, centers.shape[1], generator=gen)
    return x[:, None], labels


def test_centroids_recover_well_separated_clusters():
    c, d = 6, 16
    gen = torch.Generator().manual_seed(0)
    centers = layer_norm(torch.randn(c, d, generator=gen)) * 3
    r = Routing(clusters=c, decay=0.9, heads=1, head_dim=d).train()
    for _ in range(30):
        x, _ = _clustered_data(centers, 4, 64, gen)
        r.select(x, x)
    x, labels = _clustered_data(centers, 8, 64, gen)
    assign = (layer_norm(x) @ r.centroids[0].T).argmax(-1)[:, 0]
    purity = sum(torch.bincount(labels[assign == j], minlength=c).max().item() for j in range(c) if (assign == j).any())
    assert purity / labels.numel() >= 0.95


def test_ema_update_follows_online_kmeans_formula():
    h, c, d, lam = 2, 3, 4, 0.8
    r = Routing(clusters=c, decay=lam, init="random", heads=h, head_dim=d)
    q, k, _ = random_qkv(1, h, h, 9, 9, d)
    count0, sum0 = r.ema_count.clone(), r.ema_sum.clone()
    mu0 = r.centroids.clone()
    r.select(q, k)
    cnt, dw = torch.zeros(h, c), torch.zeros(h, c, d)
    for x in (layer_norm(q), layer_norm(k)):  # not shared: queries and keys both update the means
        for hi in range(h):
            for t in range(9):
                j = int((x[0, hi, t] @ mu0[hi].T).argmax())
                cnt[hi, j] += 1
                dw[hi, j] += x[0, hi, t]
    ema_count = lam * count0 + (1 - lam) * cnt
    ema_sum = lam * sum0 + (1 - lam) * dw
    n = ema_count.sum(-1, keepdim=True)
    want = ema_sum / ((ema_count + 1e-5) / (n + c * 1e-5) * n)[..., None]
    assert torch.allclose(r.centroids, want, atol=1e-6)
    assert torch.allclose(r.ema_count, ema_count)


def test_dead_centroid_is_moved_onto_the_farthest_vector():
    h, c, d, n, lam = 1, 2, 6, 11, 0.8
    g = torch.Generator().manual_seed(5)
    u = layer_norm(torch.randn(d, generator=g))
    q, k = (torch.randn(1, h, n, d, generator=g) + 4 * u for _ in range(2))  # every vector leans towards u
    r = Routing(clusters=c, decay=lam, init="random", revive=0.5, heads=h, head_dim=d)
    with torch.no_grad():
        r.centroids.copy_(torch.stack([u, -u])[None])  # centroid 1 is nearest to nothing: dead
        r.ema_sum.copy_(r.centroids)
    count0, sum0 = r.ema_count.clone(), r.ema_sum.clone()
    r.select(q, k)
    xs = torch.cat([layer_norm(q), layer_norm(k)], 2)[0, 0]  # [2n, D], all nearest to centroid 0
    ema_count = lam * count0 + (1 - lam) * torch.tensor([[2.0 * n, 0.0]])
    ema_sum0 = lam * sum0[0, 0] + (1 - lam) * xs.sum(0)
    total = ema_count.sum()
    mu0 = ema_sum0 / ((ema_count[0, 0] + 1e-5) / (total + c * 1e-5) * total)
    farthest = xs[int(((xs - mu0) ** 2).sum(-1).argmax())]
    torch.testing.assert_close(r.centroids[0, 0], mu0)
    torch.testing.assert_close(r.centroids[0, 1], farthest)
    torch.testing.assert_close(r.ema_count[0, 1], total / c)
    torch.testing.assert_close(r.ema_sum[0, 1], farthest * total / c)
    r2 = Routing(clusters=c, decay=lam, init="random", heads=h, head_dim=d)  # revive=0: stays dead
    with torch.no_grad():
        r2.centroids.copy_(torch.stack([u, -u])[None])
        r2.ema_sum.copy_(r2.centroids)
    r2.select(q, k)
    assert r2.ema_count[0, 1] < count0[0, 1]


def test_commitment_loss_has_grad_to_q_and_k_and_none_through_routing():
    q, k, v = random_qkv(1, 2, 2, 16, 16, 8)
    q.requires_grad_()
    k.requires_grad_()
    r = Routing(clusters=4, heads=2, head_dim=8).eval()
    r.select(q, k)
    loss = r.aux_loss
    assert loss.requires_grad and loss.item() > 0
    gq, gk = torch.autograd.grad(loss, (q, k))
    assert gq.abs().sum() > 0 and gk.abs().sum() > 0
    mu = r.centroids
    want = (
        1e-4
        * torch.cat(
            [
                (
                    (layer_norm(x) - mu[torch.arange(2)[:, None], (layer_norm(x) @ mu.transpose(1, 2)).argmax(-1)[0]])
                    ** 2
                )
                .mean(-1)
                .flatten()
                for x in (q, k)
            ]
        ).mean()
    )
    assert torch.allclose(loss, want, atol=1e-9)
    assert not r.centroids.requires_grad


def test_state_dict_round_trip_into_lazy_module():
    q, k, v = random_qkv(2, 2, 2, 24, 24, 8)
    r = Routing(clusters=3)
    for _ in range(3):
        r.select(q + torch.randn_like(q), k)
    r2 = Routing(clusters=3)
    r2.load_state_dict(copy.deepcopy(r.state_dict()))
    for name in ("centroids", "ema_count", "ema_sum", "initialized"):
        assert torch.equal(getattr(r, name), getattr(r2, name))
    r.eval(), r2.eval()
    assert torch.equal(spattn.attention(q, k, v, r), spattn.attention(q, k, v, r2))


def test_nn_attention_creates_centroids_at_construction():
    layer = spattn.nn.Attention(32, 4, attention="routing(clusters=4)", causal=True)
    assert tuple(layer.mechanism.centroids.shape) == (4, 4, 8)
    assert "mechanism.centroids" in layer.state_dict()
    x = torch.randn(2, 16, 32)
    layer(x).sum().backward()
    assert layer.aux_loss.requires_grad


@pytest.mark.parametrize("route_rotated", [False, True])
def test_rope_layer_routes_on_vectors_before_rotation(route_rotated):
    """With RoPE, routing clusters the unrotated q / k (a rotation by position would scramble the
    clusters) unless ``route_rotated``; attention always runs on the rotated ones."""
    from spattn.nn.block import TransformerBlock

    torch.manual_seed(0)
    spec = f"routing(clusters=3, share_qk=False, route_rotated={route_rotated})"
    block = TransformerBlock(32, 2, spec, causal=True, max_len=40, kv_heads=1, mlp_ratio=0, rope=True).eval()
    attn = block.attn
    x = torch.randn(2, 37, 32)
    got = attn(x)
    heads = lambda y, h: y.unflatten(-1, (h, -1)).transpose(1, 2)  # noqa: E731
    q_raw, k_raw = heads(attn.q_proj.proj(x), 2), heads(attn.k_proj.proj(x), 1)
    q, k = heads(attn.q_proj(x), 2), heads(attn.k_proj(x), 1)
    assert not torch.allclose(q, q_raw)  # the rotation is really there
    sel_raw, sel_rot = attn.mechanism.select(q_raw, k_raw, causal=True), attn.mechanism.select(q, k, causal=True)
    assert not torch.equal(sel_raw.query_indices, sel_rot.query_indices)
    sel = sel_rot if route_rotated else sel_raw
    v = heads(attn.v_proj(x), 1)
    want = attn.out_proj(spattn.attention(q, k, v, sel, backend="reference").transpose(1, 2).flatten(-2))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _train(model, opt, batches):
    for x in batches:
        opt.zero_grad()
        y = model(x)
        loss = y.pow(2).mean() + model.aux_loss
        loss.backward()
        opt.step()


def test_training_resumes_bit_identically():
    torch.manual_seed(0)
    model = spattn.nn.Attention(16, 2, attention="routing(clusters=3, decay=0.9)", causal=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 12, 16, generator=gen) for _ in range(6)]
    _train(model, opt, batches[:3])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, batches[3:])

    torch.manual_seed(123)  # a different init, overwritten by the checkpoint
    resumed = spattn.nn.Attention(16, 2, attention="routing(clusters=3, decay=0.9)", causal=True)
    opt2 = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    buf.seek(0)
    state = torch.load(buf)
    resumed.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    _train(resumed, opt2, batches[3:])
    a, b = model.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --------------------------------------------------------------------------------- causality


def test_causal_safe_never_looks_at_future_tokens():
    n, t = 40, 17
    q, k, v = random_qkv(2, 2, 1, n, n, 8, torch.float64)
    r = Routing(clusters=4, causal_safe=True, heads=2, head_dim=8).eval()
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    gen = torch.Generator().manual_seed(5)
    for x in (q2, k2, v2):
        x[:, :, t + 1 :] = torch.randn(x[:, :, t + 1 :].shape, generator=gen, dtype=x.dtype) * 3
    d1 = r.select(q, k, causal=True).to_dense()[..., : t + 1, :]
    d2 = r.select(q2, k2, causal=True).to_dense()[..., : t + 1, :]
    assert torch.equal(d1, d2)
    o1 = spattn.attention(q, k, v, r, causal=True)[:, :, : t + 1]
    o2 = spattn.attention(q2, k2, v2, r, causal=True)[:, :, : t + 1]
    assert torch.equal(o1, o2)
    assert not d1[..., t + 1 :].any()


def test_paper_causal_mode_selection_depends_on_future_tokens():
    """The documented leak of the paper's balanced routing, shown so the safe variant's test means something."""
    n, t = 40, 17
    q, k, _ = random_qkv(1, 1, 1, n, n, 8, torch.float64)
    r = Routing(clusters=4, heads=1, head_dim=8).eval()
    q2 = q.clone()
    q2[:, :, t + 1 :] = r.centroids[0, 0].double() * 10  # future tokens crowd centroid 0's window
    d1 = r.select(q, q, causal=True).to_dense()[..., : t + 1, :]
    d2 = r.select(q2, q2, causal=True).to_dense()[..., : t + 1, :]
    assert not torch.equal(d1, d2)


# --------------------------------------------------------------------------------- errors


def test_bad_parameters_raise_clear_errors():
    with pytest.raises(TypeError, match="clusters"):
        Routing(clusters=2.5)
    with pytest.raises(ValueError, match="clusters"):
        Routing(clusters=0)
    with pytest.raises(TypeError, match="window"):
        Routing(window="big")
    with pytest.raises(ValueError, match="decay"):
        Routing(decay=1.0)
    with pytest.raises(TypeError, match="causal_safe"):
        Routing(causal_safe=1)
    with pytest.raises(TypeError, match="share_qk"):
        Routing(share_qk="yes")
    with pytest.raises(ValueError, match="share_qk=False is not supported"):
        Routing(causal_safe=True, share_qk=False)
    with pytest.raises(ValueError, match="init"):
        Routing(init="kmeans++")
    with pytest.raises(ValueError, match="revive"):
        Routing(revive=1.5)
    with pytest.raises(TypeError, match="route_rotated"):
        Routing(route_rotated="no")
    with pytest.raises(ValueError, match="head_dim"):
        Routing(heads=2)
    q, k, v = random_qkv(1, 2, 2, 8, 8, 4)
    with pytest.raises(ValueError, match="clusters=16 must be <="):
        Routing(clusters=16).select(q, k)
    with pytest.raises(ValueError, match="window=9 exceeds"):
        Routing(clusters=2, window=9).select(q, k)
    with pytest.raises(ValueError, match="Nq == Nk"):
        Routing(clusters=2).select(q[:, :, :6], k, causal=True)
    with pytest.raises(ValueError, match="centroids are for 3 heads"):
        Routing(clusters=2, heads=3, head_dim=4).select(q, k)
    with pytest.raises(ValueError, match="unknown parameter"):
        spattn.pattern("routing(cluster=3)")
    assert spattn.pattern("routing").clusters == 8  # the bare name works


# --------------------------------------------------------------------------------- RoutingAttention


def test_routing_attention_equals_local_plus_routing_heads():
    from spattn.nn.routing import RoutingAttention

    torch.manual_seed(0)
    layer = RoutingAttention(32, 4, clusters=3, local_heads=2, window=5, causal=True).double().eval()
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    got = layer(x)
    q = layer.q_proj(x).view(2, 19, 4, 8).transpose(1, 2)  # share_qk: k = q
    v = layer.v_proj(x).view(2, 19, 4, 8).transpose(1, 2)
    local = spattn.attention(q[:, :2], q[:, :2], v[:, :2], "window(size=5)", causal=True, backend="reference")
    qr = layer_norm(q[:, 2:])
    sel = layer.routing.select(qr, qr, causal=True)
    routed = clustered_attention(qr, qr, v[:, 2:], sel, reference=True)
    want = layer.out_proj(torch.cat([local, routed], 1).transpose(1, 2).reshape(2, 19, 32))
    assert (got - want).abs().max() <= 1e-10


def test_routing_transformer_spec_in_nn_attention():
    layer = spattn.nn.Attention(32, 4, attention="routing_transformer(clusters=4, window=8)", causal=True)
    assert "mechanism.routing.centroids" in layer.state_dict()
    assert tuple(layer.mechanism.routing.centroids.shape) == (2, 4, 8)
    x = torch.randn(2, 24, 32, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    (y.sum() + layer.aux_loss).backward()
    assert layer.aux_loss.item() > 0 and x.grad is not None
    assert spattn.nn.Attention(32, 4, attention="routing_transformer", causal=False)(x).shape == x.shape


def test_causal_safe_routing_attention_is_causal_end_to_end():
    from spattn.nn.routing import RoutingAttention

    torch.manual_seed(0)
    layer = RoutingAttention(16, 4, clusters=3, window=4, causal=True, causal_safe=True).eval()
    x = torch.randn(1, 30, 16)
    x2 = x.clone()
    x2[:, 12:] = torch.randn(1, 18, 16) * 5
    assert torch.equal(layer(x)[:, :12], layer(x2)[:, :12])


def test_routing_attention_errors():
    from spattn.nn.routing import RoutingAttention

    with pytest.raises(ValueError, match="local_heads=5 exceeds"):
        RoutingAttention(16, 4, local_heads=5)
    with pytest.raises(ValueError, match="divisible"):
        RoutingAttention(15, 4)
    with pytest.raises(ValueError, match="x must have shape"):
        RoutingAttention(16, 4, clusters=2)(torch.randn(2, 8, 15))
    with pytest.raises(ValueError, match="clusters=8 must be <="):
        RoutingAttention(16, 4)(torch.randn(1, 6, 16))
