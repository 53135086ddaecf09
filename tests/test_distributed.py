"""Sequence-parallel attention on 2 and 4 gloo processes on loopback against single-process
``spattn.attention`` (fp32, 1e-5), the shard planning without processes, and fault handling.

Each launched group runs many cases, so process start-up is paid once per group; every process is
joined or killed by ``run_local`` (bounded time).
"""

import time

import pytest
import torch

import spattn
from spattn.distributed import record_comm, sequence_parallel_attention
from spattn.distributed.local import LocalRunError, run_local
from spattn.distributed.plan import plan_shards

TOL = 1e-5


def _attention_case(rank, world, sizes, pattern, causal, hq, hkv):
    """Max abs errors (out, dq, dk, dv) of this rank's shard against single-process attention."""
    torch.manual_seed(0)
    n, batch, d = sum(sizes), 2, 16
    q = torch.randn(batch, hq, n, d, requires_grad=True)
    k = torch.randn(batch, hkv, n, d, requires_grad=True)
    v = torch.randn(batch, hkv, n, d, requires_grad=True)
    dout = torch.randn(batch, hq, n, d)
    ref = spattn.attention(q, k, v, pattern, causal=causal)
    ref.backward(dout)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    ql, kl, vl = (t.detach()[:, :, lo:hi].clone().requires_grad_() for t in (q, k, v))
    with record_comm() as stats:
        out = sequence_parallel_attention(ql, kl, vl, pattern, causal=causal)
        out.backward(dout[:, :, lo:hi])
    errors = [
        float((a - b[:, :, lo:hi]).detach().abs().max())
        for a, b in ((out, ref), (ql.grad, q.grad), (kl.grad, k.grad), (vl.grad, v.grad))
    ]
    return errors, stats.bytes_sent, stats.bytes_received


def _attention_cases(rank, world, cases):
    return [_attention_case(rank, world, *case) for case in cases]


def _check(cases, results):
    for i, case in enumerate(cases):
        for rank, per_rank in enumerate(results):
            errors = per_rank[i][0]
            assert max(errors) <= TOL, f"{case} rank {rank}: max errors (out, dq, dk, dv) {errors}"


WINDOW = "window(size=6, block=8)"
BIGBIRD = "bigbird(block=8, window=3, globals=1, random=2)"
TOPK = "block_topk(k=3, block=8)"


@pytest.mark.slow
def test_two_ranks_match_single_process():
    sizes = [40, 37]  # N = 77: not divisible by the world size nor the block
    cases = [
        (sizes, None, False, 4, 4),
        (sizes, None, True, 4, 2),
        (sizes, WINDOW, False, 4, 2),
        (sizes, WINDOW, True, 4, 4),
        (sizes, BIGBIRD, False, 4, 1),
        (sizes, BIGBIRD, True, 2, 2),
        (sizes, TOPK, False, 4, 2),
        (sizes, TOPK, True, 4, 4),
        (sizes, "block_mass(threshold=0.5, block=8)", True, 2, 1),
    ]
    _check(cases, run_local(_attention_cases, 2, cases, timeout=300))


@pytest.mark.slow
def test_four_ranks_match_single_process():
    sizes = [30, 25, 27, 19]  # uneven, shard edges inside blocks
    cases = [
        (sizes, None, False, 4, 2),
        (sizes, None, True, 4, 2),
        (sizes, WINDOW, False, 4, 4),
        (sizes, WINDOW, True, 4, 2),
        (sizes, BIGBIRD, False, 4, 2),
        (sizes, TOPK, True, 4, 2),
    ]
    results = run_local(_attention_cases, 4, cases, timeout=400)
    _check(cases, results)
    # the window moves only the neighbours' boundary rows, far fewer bytes than the dense ring
    ring_bytes = max(r[0][1] for r in results)
    window_bytes = max(r[2][1] for r in results)
    assert window_bytes < ring_bytes


@pytest.mark.parametrize("pattern,causal", [(WINDOW, False), (WINDOW, True), (BIGBIRD, False), (TOPK, True)])
def test_plan_restricted_layouts_equal_the_global_rows(pattern, causal):
    """Per rank, the local Layout over the fetched keys computes exactly the global Layout's pairs."""
    torch.manual_seed(1)
    sizes = [30, 25, 27, 19]
    n = sum(sizes)
    q, k = torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)
    layout = spattn.pattern(pattern).layout(q, k, causal=causal)
    dense = layout.to_dense()
    fetched_total = 0
    for rank in range(len(sizes)):
        plan = plan_shards(layout, sizes, rank)
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        # the keys this rank receives, in order: every rank's send list for it
        received = []
        for p in range(len(sizes)):
            other = plan_shards(layout, sizes, p)
            offset = sum(other.send_splits[:rank])
            received.append(other.send_index[offset : offset + other.send_splits[rank]] + sum(sizes[:p]))
        received = torch.cat(received)
        assert received.numel() == plan.keys_fetched == plan.local_layout.kv_len
        local = plan.local_layout.to_dense()[..., plan.q_front : plan.q_front + sizes[rank], :]
        expected = dense[..., lo:hi, :]
        assert torch.equal(local, expected[..., received])
        assert not bool(expected[..., torch.isin(torch.arange(n), received, invert=True)].any())
        fetched_total += plan.keys_fetched
    assert fetched_total < len(sizes) * n


def test_needs_a_process_group():
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        sequence_parallel_attention(q, q, q)


def _dies(rank, world):
    import os

    if rank == 1:
        os._exit(3)
    q = torch.randn(1, 2, 16, 8)
    return sequence_parallel_attention(q, q, q, WINDOW)


def _error_of(call):
    try:
        call()
    except ValueError as exc:
        return str(exc)
    return "no error"


def _bad_calls(rank, world):
    uneven_heads = torch.randn(1, 2 + rank, 16, 8)  # ranks disagree on the head count
    q = torch.randn(1, 2, 16, 8)
    wrong_length = spattn.pattern(WINDOW).layout(torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8))  # N is 32
    return (
        _error_of(lambda: sequence_parallel_attention(uneven_heads, uneven_heads, uneven_heads, WINDOW)),
        _error_of(lambda: sequence_parallel_attention(q, q, q, "topk(k=4)")),
        _error_of(lambda: sequence_parallel_attention(q, q, q, wrong_length)),
    )


@pytest.mark.slow
def test_dead_rank_is_an_error_not_a_hang():
    start = time.monotonic()
    with pytest.raises(LocalRunError, match="exited with code 3"):
        run_local(_dies, 2, timeout=120, pg_timeout=10)
    assert time.monotonic() - start < 100


@pytest.mark.slow
def test_inconsistent_shards_wrong_layouts_and_unsupported_selectors_raise_on_every_rank():
    for shapes, selector, layout in run_local(_bad_calls, 2, timeout=120, pg_timeout=10):
        assert "inconsistent shapes" in shapes and "query heads" in shapes, shapes
        assert "not support" in selector and "'topk'" in selector, selector
        assert "whole sequence (N=32)" in layout, layout


def test_a_precomputed_selection_must_be_a_block_layout():
    """Shards are planned over key blocks: a precomputed Layout passes, per-token kinds are a TypeError."""
    from spattn.distributed import sequence

    q = torch.randn(1, 1, 16, 4)
    layout = spattn.pattern("window(size=3, block=4)").layout(q, q)
    assert sequence._resolve(layout) is layout
    tokens = spattn.pattern("topk(k=3)").select(q, q)
    with pytest.raises(TypeError, match="block Layout; got a TokenSelection"):
        sequence._resolve(tokens)
