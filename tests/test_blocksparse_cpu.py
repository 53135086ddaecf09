"""The compiled CPU inference forward for block Layouts (spattn/csrc/blocksparse_cpu.cpp) against the
dense reference and the eager kernel, and the partial-tile mask tables it reads."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spattn
from spattn import _compiled
from spattn.kernels import blocksparse_cpu, blocksparse_train
from spattn.kernels.blocksparse import blocksparse_attention
from spattn.kernels.reference import reference_attention
from spattn.layout import Layout, translation_invariant

from .helpers import CountingOps, finite
from .test_blocksparse import _random_layout, _tensors, problems


@pytest.fixture
def spy(monkeypatch):
    ops = _compiled.ops()
    if ops is None:
        pytest.skip(f"compiled loops unavailable: {_compiled.build_error()}")
    if not ops.block_sparse_blas():
        pytest.skip("this torch build exports no BLAS: spattn runs its eager block-sparse kernel")
    counting = CountingOps(ops)
    monkeypatch.setitem(_compiled._state, "ops", counting)
    return counting


def _check(q, k, v, layout, atol):
    with torch.no_grad():
        out, lse = blocksparse_attention(q, k, v, layout, return_lse=True)
        want, want_lse = reference_attention(q.double(), k.double(), v.double(), layout, return_lse=True)
    assert out.dtype == q.dtype and not torch.isnan(out).any()
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse)), "rows without keys differ"
    assert (out.double() - want).abs().max().item() <= atol
    assert (finite(lse).double() - finite(want_lse)).abs().max().item() <= atol
    rows_without_keys = torch.isinf(want_lse)
    assert torch.equal(out[rows_without_keys], torch.zeros_like(out[rows_without_keys]))
    return out, lse


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    problems(),
    st.sampled_from(["dense_mask", "blocks"]),
    st.sampled_from([torch.float32, torch.float64]),
    st.booleans(),
)
@pytest.mark.slow
def test_random_layouts_match_reference(spy, problem, kind, dtype, transposed):
    """Per-batch / per-head / shared layouts, GQA, lengths off the block grid, partial tiles with a
    predicate that is not translation invariant, rows without any key."""
    batch, hq, hkv, nq, nk, dim, bq, bk, per_batch, per_head, seed = problem
    q, k, v, gen = _tensors(batch, hq, hkv, nq, nk, dim, seed, dtype=dtype, transposed=transposed)
    layout = _random_layout(kind, batch if per_batch else 1, hq if per_head else 1, nq, nk, bq, bk, gen)
    before = spy.calls.get("block_sparse_forward", 0)
    _check(q, k, v, layout, 1e-5 if dtype == torch.float32 else 1e-10)
    assert spy.calls.get("block_sparse_forward", 0) == before + 1


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problems(max_len=700), st.booleans(), st.sampled_from([torch.float32, torch.float64]))
@pytest.mark.slow
def test_causal_and_content_layouts_match_reference(spy, problem, causal, dtype):
    """Causal diagonals (shared translation-invariant masks, row slices of a partial tile), runs of
    consecutive whole blocks longer than one GEMM, XAttention's per-head selections."""
    batch, hq, hkv, nq, nk, dim, bq, *_, seed = problem
    q, k, v, _ = _tensors(batch, hq, hkv, nq, nk, dim, seed, dtype=dtype)
    atol = 1e-5 if dtype == torch.float32 else 1e-10
    for spec in (f"dense(block={bq})", f"xattention(threshold=0.7, stride=4, block={max(bq, 16)})"):
        layout = (
            spattn.pattern(spec).select(q, k, causal=causal)
            if "xatt" in spec
            else spattn.pattern(spec).layout(q, k, causal=causal)
        )
        _check(q, k, v, layout, atol)
    assert spy.calls.get("block_sparse_forward", 0) >= 2


def test_compiled_equals_eager_on_a_long_sequence(spy, monkeypatch):
    """Long runs of whole blocks (several GEMMs per query block) and causal tiles: the compiled
    forward and the eager one (taken when gradients are needed) agree."""
    q, k, v, _ = _tensors(1, 6, 2, 1500, 1500, 32, seed=5)
    layout = spattn.pattern("xattention(threshold=0.95, stride=8, block=64)").select(q, k, causal=True)
    with torch.no_grad():
        fast = blocksparse_attention(q, k, v, layout)
    assert spy.calls.get("block_sparse_forward") == 1
    monkeypatch.setattr(blocksparse_train, "applies", lambda *args: False)  # the training path off
    eager = blocksparse_attention(q.requires_grad_(), k, v, layout)
    assert spy.calls.get("block_sparse_forward") == 1  # gradients wanted: the eager kernel ran
    assert (fast - eager.detach()).abs().max().item() <= 1e-5


@pytest.mark.parametrize("int64_keys", [True, False], ids=["int64-keys", "tuple-rows"])
def test_partial_tile_masks_brute_force(int64_keys, monkeypatch):
    """Every partial tile's mask equals the predicate on that tile; translation-invariant predicates
    share one mask per (batch, head, block offset, cut by the sequence ends) -- exactly one, whether
    the tiles are grouped by one int64 key each or (for shapes whose keys would overflow) as tuples."""
    if not int64_keys:
        monkeypatch.setattr("spattn.layout._INT64_KEYS", 0)
    gen = torch.Generator().manual_seed(0)
    nq, nk, bq, bk = 150, 170, 32, 16
    block_map = torch.rand(2, 3, 5, 11, generator=gen) < 0.6
    full_map = block_map & (torch.rand(2, 3, 5, 11, generator=gen) < 0.3)

    @translation_invariant
    def band(b, h, q_idx, kv_idx):
        return (q_idx + 20 - kv_idx).abs() <= 9 + h + b

    def checker(b, h, q_idx, kv_idx):
        return (q_idx * 7 + kv_idx * 3 + h) % 5 != 0

    for mask_mod, shared in ((band, True), (checker, False)):
        layout = Layout.from_block_map(
            block_map, q_len=nq, kv_len=nk, block_q=bq, block_k=bk, full_map=full_map, mask_mod=mask_mod
        )
        mask_id, masks = blocksparse_cpu.partial_tile_masks(layout)
        partial = layout.valid_slots() & ~layout.full
        assert torch.equal(mask_id >= 0, partial)
        for b, h, qb, s in partial.nonzero().tolist():
            kb = int(layout.kv_indices[b, h, qb, s])
            rows, cols = min(bq, nq - qb * bq), min(bk, nk - kb * bk)
            q_idx = torch.arange(qb * bq, qb * bq + rows).view(-1, 1)
            kv_idx = torch.arange(kb * bk, kb * bk + cols).view(1, -1)
            want = mask_mod(torch.tensor(b), torch.tensor(h), q_idx, kv_idx)
            assert torch.equal(masks[mask_id[b, h, qb, s]][:rows, :cols], want)
        if shared:
            groups = {
                (b, h, int(layout.kv_indices[b, h, qb, s]) * bk - qb * bq, min(bq, nq - qb * bq))
                + (min(bk, nk - int(layout.kv_indices[b, h, qb, s]) * bk),)
                for b, h, qb, s in partial.nonzero().tolist()
            }
            assert masks.shape[0] == len(groups) < int(partial.sum())
        else:
            assert masks.shape[0] == int(partial.sum())
        assert blocksparse_cpu.partial_tile_masks(layout, max_elems=masks[:1].numel() - 1) is None


def test_too_many_partial_masks_fall_back_to_eager(spy, monkeypatch):
    q, k, v, gen = _tensors(1, 2, 1, 200, 200, 16, seed=2)
    layout = _random_layout("blocks", 1, 2, 200, 200, 16, 16, gen)
    monkeypatch.setattr(blocksparse_cpu, "MAX_MASK_ELEMS", 0)
    assert blocksparse_cpu.partial_tile_masks(layout, max_elems=0) is None
    with torch.no_grad():
        out = blocksparse_attention(q, k, v, layout)
    assert "block_sparse_forward" not in spy.calls
    want = reference_attention(q.double(), k.double(), v.double(), layout)
    assert (out.double() - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", ["grad", "half"])
def test_eager_kernel_keeps_what_the_loop_does_not_do(spy, monkeypatch, case):
    """(Key padding and columns reach the loop as partial tiles: tests/test_blocksparse_train.py.)"""
    q, k, v, gen = _tensors(2, 4, 2, 100, 100, 16, seed=1)
    layout = _random_layout("blocks", 1, 4, 100, 100, 16, 16, gen)
    if case == "grad":
        q.requires_grad_()
    if case == "half":
        q, k, v = (x.bfloat16() for x in (q, k, v))
    assert not blocksparse_cpu.applies(q, k, v, layout, None)
    monkeypatch.setattr(blocksparse_train, "applies", lambda *args: False)  # (tests/test_blocksparse_train.py)
    blocksparse_attention(q, k, v, layout)
    assert "block_sparse_forward" not in spy.calls


def test_loop_rejects_malformed_tables(spy):
    q, k, v, _ = _tensors(1, 2, 1, 64, 64, 8, seed=0)
    layout = spattn.pattern("dense(block=16)").layout(q, k, causal=True)
    mask_id, masks = blocksparse_cpu.partial_tile_masks(layout)
    ops = spy.ops
    with pytest.raises(RuntimeError, match="query blocks"):
        ops.block_sparse_forward(
            q,
            k,
            v,
            layout.kv_num_blocks[:, :, :2].contiguous(),
            layout.kv_indices[:, :, :2].contiguous(),
            mask_id[:, :, :2].contiguous(),
            masks,
            16,
            16,
            1.0,
        )
    with pytest.raises(RuntimeError, match="masks must be"):
        ops.block_sparse_forward(q, k, v, layout.kv_num_blocks, layout.kv_indices, mask_id, masks[:, :8], 16, 16, 1.0)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.block_sparse_forward(
            q.half(), k.half(), v.half(), layout.kv_num_blocks, layout.kv_indices, mask_id, masks, 16, 16, 1.0
        )
