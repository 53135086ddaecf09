"""Sequence-parallel causal LM on 2 gloo ranks: the loss of a step and the summed parameter
gradients equal the unsharded model's (RoPE / learned positions offset per shard)."""

import pytest
import torch
import torch.nn.functional as F

from spattn.distributed.lm import SequenceParallelLM
from spattn.distributed.local import run_local
from spattn.models import CausalLM


def _lm_case(rank, world, attention, positions, sizes):
    torch.manual_seed(0)
    model = CausalLM(50, dim=32, depth=2, heads=4, kv_heads=2, max_len=96, attention=attention, positions=positions)
    n = sum(sizes)
    seq = torch.randint(0, 50, (2, n + 1))
    tokens, targets = seq[:, :-1], seq[:, 1:]
    ref = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    sp = SequenceParallelLM(model)
    loss = sp.loss(tokens[:, lo:hi], targets[:, lo:hi])
    model.zero_grad()
    loss.backward()
    sp.reduce_gradients()
    grad_err = max(float((p.grad - g).abs().max()) for p, g in zip(model.parameters(), ref_grads))
    return float(loss), float(ref), grad_err


def _lm_cases(rank, world, cases):
    return [_lm_case(rank, world, *case) for case in cases]


@pytest.mark.slow
def test_sequence_parallel_lm_step_equals_unsharded():
    cases = [
        ("window(size=8, block=8)", "rope", [40, 33]),
        (None, "rope", [37, 36]),
        ("bigbird(block=8, window=3, globals=1, random=1)", "learned", [30, 43]),
    ]
    for per_rank in zip(*run_local(_lm_cases, 2, cases, timeout=300)):
        for loss, ref, grad_err in per_rank:
            assert abs(loss - ref) <= 1e-5 * abs(ref), (loss, ref)
            assert grad_err <= 1e-5, grad_err


def test_rejects_models_that_mix_tokens_across_shards():
    model = CausalLM(20, dim=16, depth=1, heads=2, max_len=32, short_conv=3)
    with pytest.raises(ValueError, match="short_conv"):
        SequenceParallelLM(model)
    with pytest.raises(TypeError, match="CausalLM"):
        SequenceParallelLM(torch.nn.Linear(2, 2))
