"""SeerAttention gate: pooling, gate, layout, attention on it, distillation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import spattn
from spattn.kernels.reference import reference_attention
from spattn.patterns.seer import SeerGate, block_pool, distill_seer_gate, seer_block_target
from spattn.patterns.reference import brute_seer_block_map, brute_seer_logits, token_blocks

from .helpers import random_qkv


def test_block_pool_equals_loops():
    x = torch.randn(2, 3, 21, 4, dtype=torch.float64)
    mean, hi, lo = block_pool(x, 8)
    for i, rows in enumerate(token_blocks(21, 8)):
        assert torch.allclose(mean[:, :, i], x[:, :, rows].mean(2))
        assert torch.equal(hi[:, :, i], x[:, :, rows].amax(2))
        assert torch.equal(lo[:, :, i], x[:, :, rows].amin(2))


@pytest.mark.parametrize("causal,nq,nk", [(False, 37, 37), (True, 37, 37), (True, 21, 45), (False, 13, 30)])
def test_gate_equals_bruteforce(causal, nq, nk):
    q, k, _ = random_qkv(2, 4, 2, nq, nk, 8, torch.float64)
    gate = SeerGate(block=8, hidden=16).double()
    got = gate.gate_logits(q, k, causal)
    want = brute_seer_logits(gate, q, k, causal)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = ~torch.isinf(want)
    assert (got[fin] - want[fin]).abs().max() < 1e-12
    probs = gate.gate(q, k, causal)
    assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:-1], dtype=torch.float64))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", [dict(topk=2), dict(threshold=0.05), dict()])
def test_layout_matches_bruteforce_selection(causal, mode):
    q, k, _ = random_qkv(2, 2, 1, 45, 45, 8, torch.float64, seed=2)
    gate = SeerGate(block=8, hidden=16, **mode).double()
    layout = gate.layout(q, k, causal)
    want = brute_seer_block_map(gate, q, k, causal)
    assert torch.equal(layout.block_map(), want)
    dense = want.repeat_interleave(8, 2).repeat_interleave(8, 3)[:, :, :45, :45]
    if causal:
        dense = dense & torch.ones(45, 45, dtype=torch.bool).tril()
    assert torch.equal(layout.to_dense(), dense)
    assert bool(layout.to_dense().any(-1).all()) or not causal  # causal rows never empty


def _run(fn, q, k, v):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(out.dtype)
    (out * g).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


@settings(max_examples=10, deadline=None)
@given(
    b=st.integers(1, 2),
    hkv=st.integers(1, 2),
    group=st.integers(1, 2),
    n=st.integers(5, 70),
    block=st.sampled_from([8, 16]),
    causal=st.booleans(),
    topk=st.sampled_from([None, 1, 3]),
    seed=st.integers(0, 99),
)
def test_attention_on_gate_matches_reference(b, hkv, group, n, block, causal, topk, seed):
    q, k, v = random_qkv(b, hkv * group, hkv, n, n, 8, torch.float32, seed)
    gate = SeerGate(block=block, topk=topk, hidden=16)
    layout = gate.layout(q, k, causal)
    got = _run(lambda a, c, e: spattn.attention(a, c, e, gate, causal=causal), q, k, v)
    want = _run(lambda a, c, e: reference_attention(a, c, e, layout), q.double(), k.double(), v.double())
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        assert not torch.isnan(x).any(), name
        assert (x.double() - y).abs().max() <= 1e-5, name


def test_state_dict_round_trip_into_lazy_gate():
    q, k, _ = random_qkv(1, 4, 2, 40, 40, 8)
    gate = SeerGate(block=8, topk=2)
    distill_seer_gate(gate, q, k, steps=3, lr=1e-2)
    fresh = SeerGate(block=8, topk=2)
    fresh.load_state_dict(copy.deepcopy(gate.state_dict()))
    assert torch.equal(fresh.q_weight, gate.q_weight) and torch.equal(fresh.k_weight, gate.k_weight)
    assert torch.equal(fresh.block_map(q, k, True), gate.block_map(q, k, True))
    layer = spattn.nn.Attention(32, 4, attention="seer(block=8, topk=2)", kv_heads=2, causal=True)
    assert tuple(layer.mechanism.k_weight.shape) == (2, 16, 128)  # created from the context parameters
    assert "mechanism.q_weight" in layer.state_dict()


def test_block_target_equals_dense_max_pool():
    q, k, _ = random_qkv(1, 2, 1, 30, 30, 8, torch.float64)
    for causal in (False, True):
        got = seer_block_target(q, k, 8, causal, chunk_blocks=1)
        logits = q @ k.repeat_interleave(2, 1).transpose(-1, -2) / math.sqrt(8)
        if causal:
            logits = logits.masked_fill(~torch.ones(30, 30, dtype=torch.bool).tril(), -math.inf)
        p = torch.softmax(logits, -1)
        want = torch.stack(
            [
                torch.stack([p[..., r, :][..., c].amax((-1, -2)) for c in token_blocks(30, 8)], -1)
                for r in token_blocks(30, 8)
            ],
            -2,
        )
        assert torch.allclose(got, want / want.sum(-1, keepdim=True), atol=1e-12)


def _topic_qk(b, h, n, d, block, gen, mix):
    """Tokens of a block share a topic; query topics are a fixed linear map of the key topics, so
    attention mass sits on the (scattered) key blocks whose topics match, which the gate can learn."""
    topics = torch.randn(b, h, n // block, d, generator=gen) * 1.5
    k = topics.repeat_interleave(block, 2) + 0.3 * torch.randn(b, h, n, d, generator=gen)
    q = (topics @ mix).repeat_interleave(block, 2) + 0.3 * torch.randn(b, h, n, d, generator=gen)
    return q, k


def _recall(layout, q, k, causal):
    """Mean over queries of the attention mass on the computed pairs."""
    p = torch.softmax(
        (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(
            causal & ~torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril(), -math.inf
        ),
        -1,
    )
    return float((p * layout.to_dense()).sum(-1).mean())


def test_distillation_lowers_kl_and_beats_random_selection():
    gen = torch.Generator().manual_seed(0)
    b, h, n, d, block = 2, 2, 128, 16, 8
    mix = torch.randn(d, d, generator=gen) / math.sqrt(d)
    train = [_topic_qk(b, h, n, d, block, gen, mix) for _ in range(4)]
    gate = SeerGate(block=block, topk=3, hidden=32)
    torch.manual_seed(0)
    losses = distill_seer_gate(gate, [t[0] for t in train], [t[1] for t in train], steps=60, lr=1e-2, causal=True)
    assert sum(losses[-4:]) < 0.5 * sum(losses[:4])
    q, k = _topic_qk(b, h, n, d, block, gen, mix)  # held-out
    layout = gate.layout(q, k, True)
    learned = _recall(layout, q, k, True)
    # random selection with the same number of blocks per row (diagonal kept too)
    bm = layout.block_map()
    nqb = bm.shape[2]
    valid = torch.ones(nqb, nqb, dtype=torch.bool).tril()
    rand_recalls = []
    for r in range(5):
        scores = torch.rand(bm.shape, generator=torch.Generator().manual_seed(r)).masked_fill(~valid, -1)
        scores = scores + 2 * torch.eye(nqb)  # keep the diagonal like the gate
        idx = scores.argsort(-1, descending=True)
        rank = idx.argsort(-1)
        rbm = (rank < bm.sum(-1, keepdim=True)) & valid
        rand_layout = spattn.Layout.from_block_map(
            rbm, q_len=n, kv_len=n, block_q=block, mask_mod=spattn.patterns.base.causal_mask_mod(n, n)
        )
        rand_recalls.append(_recall(rand_layout, q, k, True))
    assert learned > max(rand_recalls) + 0.1, (learned, rand_recalls)


def test_errors():
    with pytest.raises(ValueError, match="exactly one of topk and threshold"):
        SeerGate(topk=2, threshold=0.01)
    with pytest.raises(ValueError, match="threshold"):
        SeerGate(threshold=1.5)
    with pytest.raises(TypeError, match="topk"):
        SeerGate(topk=2.0)
    with pytest.raises(ValueError, match="block"):
        SeerGate(block=0)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        SeerGate(heads=3, kv_heads=2, head_dim=4)
    q, k, _ = random_qkv(1, 2, 2, 16, 16, 4)
    with pytest.raises(ValueError, match="the gate is for 4 query"):
        SeerGate(heads=4, head_dim=4).layout(q, k)
    with pytest.raises(ValueError, match="steps"):
        distill_seer_gate(SeerGate(), q, k, steps=0)
    with pytest.raises(TypeError, match="SeerGate"):
        distill_seer_gate("seer", q, k)
    with pytest.raises(ValueError, match="unknown parameter"):
        spattn.pattern("seer(top_k=3)")
    assert spattn.pattern("seer").effective_threshold == 2e-3
