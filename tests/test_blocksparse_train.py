"""The compiled CPU training path for block Layouts (compiled forward with lse + the FlashAttention-2-style
backward of spattn/csrc/blocksparse_backward_cpu.cpp) against the float64 reference and the eager kernel."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spattn
from spattn import _compiled
from spattn.kernels import blocksparse_train
from spattn.kernels.blocksparse import blocksparse_attention
from spattn.kernels.reference import reference_attention
from spattn.layout import Layout

from .helpers import assert_matches_reference, run_with_grads
from . import test_blocksparse_cpu
from .test_blocksparse import _random_layout, _tensors, problems

spy = test_blocksparse_cpu.spy  # the fixture counting calls of the compiled ops
SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture]}


def _calls(spy, name="block_sparse_backward"):
    return spy.calls.get(name, 0)


@settings(max_examples=30, **SETTINGS)
@given(
    problems(),
    st.sampled_from(["dense_mask", "blocks", "columns"]),
    st.sampled_from([torch.float32, torch.float64]),
    st.booleans(),
    st.sampled_from([None, "tail", "random"]),
)
def test_random_layouts_match_reference(spy, problem, kind, dtype, transposed, padding):
    """out, lse, dq, dk, dv with out and lse cotangents: per-batch / per-head / shared random layouts,
    GQA, lengths off the block grid, Nq != Nk, partial tiles with a predicate that is not translation
    invariant, rows without any key (dense_mask), extra key columns, key padding (a padded tail per
    batch, or random keys)."""
    batch, hq, hkv, nq, nk, dim, bq, bk, per_batch, per_head, seed = problem
    q, k, v, gen = _tensors(batch, hq, hkv, nq, nk, dim, seed, dtype=dtype, transposed=transposed)
    layout = _random_layout(kind, batch if per_batch else 1, hq if per_head else 1, nq, nk, bq, bk, gen)
    kpm = None
    if padding == "random":
        kpm = torch.rand(batch, nk, generator=gen) < 0.8
    elif padding == "tail":
        kpm = torch.arange(nk) < torch.randint(1, nk + 1, (batch, 1), generator=gen)
    before = _calls(spy)
    assert_matches_reference(
        blocksparse_attention, q, k, v, layout, kpm, atol=1e-5 if dtype == torch.float32 else 1e-10
    )
    assert _calls(spy) == before + 1


@settings(max_examples=20, **SETTINGS)
@given(problems(), st.booleans())
def test_inference_forward_with_padding_and_columns(spy, problem, padded):
    """Without gradients, key padding and columns reach the compiled inference forward as partial tiles."""
    batch, hq, hkv, nq, nk, dim, bq, bk, per_batch, per_head, seed = problem
    q, k, v, gen = _tensors(batch, hq, hkv, nq, nk, dim, seed)
    layout = _random_layout("columns", batch if per_batch else 1, hq if per_head else 1, nq, nk, bq, bk, gen)
    kpm = torch.rand(batch, nk, generator=gen) < 0.8 if padded else None
    before = _calls(spy, "block_sparse_forward")
    with torch.no_grad():
        out, lse = blocksparse_attention(q, k, v, layout, key_padding_mask=kpm, return_lse=True)
    want, want_lse = reference_attention(
        q.double(), k.double(), v.double(), layout, key_padding_mask=kpm, return_lse=True
    )
    assert _calls(spy, "block_sparse_forward") == before + 1
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    assert (out.double() - want).abs().max().item() <= 1e-5


@settings(max_examples=12, **SETTINGS)
@given(problems(max_len=700), st.booleans(), st.sampled_from([torch.float32, torch.float64]))
def test_static_and_content_layouts_match_reference(spy, problem, causal, dtype):
    """Windows, BigBird (per-head random blocks, globals) and XAttention's content-based per-head
    selection, causal (shared translation-invariant masks, Nq != Nk aligned at the end) and not."""
    batch, hq, hkv, nq, nk, dim, bq, *_, seed = problem
    q, k, v, _ = _tensors(batch, hq, hkv, nq, nk, dim, seed, dtype=dtype)
    atol = 1e-5 if dtype == torch.float32 else 1e-10
    specs = [f"window(size={bq + 3}, block={bq})", f"bigbird(block={bq}, window=3, globals=1, random=2)"]
    before = _calls(spy)
    for spec in specs:
        layout = spattn.pattern(spec).layout(q, k, causal=causal)
        assert_matches_reference(blocksparse_attention, q, k, v, layout, atol=atol)
    if causal or nq == nk:
        layout = spattn.pattern(f"xattention(threshold=0.7, stride=4, block={max(bq, 16)})").select(q, k, causal=causal)
        assert_matches_reference(blocksparse_attention, q, k, v, layout, atol=atol)
    assert _calls(spy) >= before + len(specs)


@pytest.mark.parametrize("which", ["out", "lse"])
def test_gradient_of_one_output_only(spy, which):
    """Only out (lse unused) or only lse receives a cotangent: the other arrives as None."""
    q, k, v, gen = _tensors(2, 4, 2, 90, 70, 8, seed=3, dtype=torch.float64)
    layout = _random_layout("blocks", 1, 4, 90, 70, 16, 16, gen)

    def loss(fn, *args):
        out, lse = fn(*args, layout, return_lse=True)
        part = out if which == "out" else torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        return (part * torch.linspace(-1, 1, part.numel(), dtype=part.dtype).view(part.shape)).sum()

    grads = []
    for fn in (blocksparse_attention, reference_attention):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        grads.append(torch.autograd.grad(loss(fn, *leaves), leaves, allow_unused=True, materialize_grads=True))
    for a, b in zip(*grads):
        assert (a - b).abs().max().item() <= 1e-10
    assert _calls(spy) == 1


def test_gradcheck_fp64(spy):
    """torch.autograd.gradcheck of (out, lse) on small shapes: GQA, causal partial tiles, an empty row."""
    q, k, v, _ = _tensors(1, 2, 1, 21, 17, 4, seed=11, dtype=torch.float64)
    layout = spattn.pattern("window(size=5, block=4)").layout(q, k, causal=True)
    empty = Layout.from_dense(layout.to_dense() & (torch.arange(21).view(1, 1, -1, 1) != 6), 4, 4)

    for lay in (layout, empty):

        def fn(q_, k_, v_, lay=lay):
            out, lse = blocksparse_attention(q_, k_, v_, lay, return_lse=True)
            return out, torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)

        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        # the dq partial sums of the workers are added in scheduling order: equal up to rounding
        assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, nondet_tol=1e-12, fast_mode=True)
    assert _calls(spy) > 0


@pytest.mark.slow
def test_compiled_equals_eager_on_a_long_sequence(spy, monkeypatch):
    """1500 tokens, GQA, XAttention's causal per-head selection: runs of merged query blocks (several
    GEMMs per key block), the compiled and the eager kernel agree in value and gradients."""
    q, k, v, _ = _tensors(1, 6, 2, 1500, 1500, 32, seed=5)
    layout = spattn.pattern("xattention(threshold=0.95, stride=8, block=64)").select(q, k, causal=True)
    fast = run_with_grads(blocksparse_attention, q, k, v, layout)
    assert _calls(spy) == 1
    monkeypatch.setattr(blocksparse_train, "applies", lambda *args: False)
    eager = run_with_grads(blocksparse_attention, q, k, v, layout)
    assert _calls(spy) == 1
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), fast, eager):
        a, b = (torch.where(torch.isinf(x), torch.zeros_like(x), x) for x in (a, b))
        assert (a - b).abs().max().item() <= 2e-5, name


def test_transposed_tables_brute_force():
    """For every (batch, head, key block): exactly the query blocks that select it, ascending, with the
    mask id of that tile."""
    gen = torch.Generator().manual_seed(0)
    layout = _random_layout("blocks", 2, 3, 150, 170, 32, 16, gen)
    mask_id = torch.randint(-1, 5, layout.kv_indices.shape, generator=gen, dtype=torch.int32)
    q_ptr, q_blocks, q_mask = blocksparse_train.transposed_tables(layout, mask_id)
    assert q_ptr.shape == (2, 3, layout.num_kv_blocks + 1)
    for b in range(2):
        for h in range(3):
            for kb in range(layout.num_kv_blocks):
                want = [
                    (qb, int(mask_id[b, h, qb, s]))
                    for qb in range(layout.num_q_blocks)
                    for s in range(int(layout.kv_num_blocks[b, h, qb]))
                    if int(layout.kv_indices[b, h, qb, s]) == kb
                ]
                lo, hi = int(q_ptr[b, h, kb]), int(q_ptr[b, h, kb + 1])
                assert list(zip(q_blocks[lo:hi].tolist(), q_mask[lo:hi].tolist())) == want


@pytest.mark.parametrize("case", ["no_extension", "too_many_masks", "padding_too_many_masks"])
def test_fallbacks_to_the_eager_kernel(spy, monkeypatch, case):
    """What the compiled path does not take runs the eager kernel, still exact."""
    q, k, v, gen = _tensors(2, 4, 2, 100, 100, 16, seed=1)
    layout = _random_layout("columns", 1, 4, 100, 100, 16, 16, gen)
    kpm = torch.rand(2, 100, generator=gen) < 0.8 if case == "padding_too_many_masks" else None
    if case == "no_extension":
        monkeypatch.setitem(_compiled._state, "ops", None)
    else:
        monkeypatch.setattr(blocksparse_train.blocksparse_cpu, "MAX_MASK_ELEMS", 0)
    assert not blocksparse_train.applies(q, k, v, blocksparse_train.blocks_only(layout, kpm), None)
    assert_matches_reference(blocksparse_attention, q, k, v, layout, kpm)
    assert _calls(spy) == 0 and _calls(spy, "block_sparse_forward") == 0


def test_softcap_runs_the_eager_kernel(spy):
    """softcap (Gemma 2) is computed on explicit score tiles: the compiled loops do not apply."""
    q, k, v, gen = _tensors(1, 2, 1, 80, 80, 16, seed=6)
    layout = _random_layout("blocks", 1, 2, 80, 80, 16, 16, gen)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    blocksparse_attention(*leaves, layout, softcap=5.0).sum().backward()
    assert _calls(spy) == 0 and _calls(spy, "block_sparse_forward") == 0
    assert all(x.grad is not None for x in leaves)


def test_blocks_only_computes_the_same_pairs():
    """Columns become partial tiles, padded keys leave every tile (per batch); the pair sets are equal."""
    gen = torch.Generator().manual_seed(2)
    layout = _random_layout("columns", 1, 3, 150, 170, 32, 16, gen)
    kpm = torch.rand(2, 170, generator=gen) < 0.7
    kpm[1, 100:] = False
    flat = blocksparse_train.blocks_only(layout, kpm)
    assert not flat.has_columns and flat.batch == 2
    assert torch.equal(flat.to_dense(), layout.to_dense() & kpm[:, None, None, :])
    assert torch.equal(blocksparse_train.blocks_only(layout).to_dense(), layout.to_dense())
    assert blocksparse_train.blocks_only(layout) is blocksparse_train.blocks_only(layout)  # cached


def test_half_inputs_compute_in_float32(spy):
    """bfloat16 inputs: computed in float32 by the compiled path, gradients in bfloat16 close to the
    float32 result."""
    q, k, v, _ = _tensors(1, 2, 1, 130, 130, 16, seed=4)
    layout = spattn.pattern("window(size=20, block=16)").layout(q, k, causal=True)
    want = run_with_grads(blocksparse_attention, q, k, v, layout)
    got = run_with_grads(blocksparse_attention, q.bfloat16(), k.bfloat16(), v.bfloat16(), layout)
    assert _calls(spy) == 2
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    for a, b in zip(got, want):
        a, b = (torch.where(torch.isinf(x), torch.zeros_like(x), x).float() for x in (a, b))
        assert (a - b).abs().max().item() <= 0.05


def test_backward_rejects_malformed_tables(spy):
    q, k, v, _ = _tensors(1, 2, 1, 64, 64, 8, seed=0)
    layout = spattn.pattern("dense(block=16)").layout(q, k, causal=True)
    t = blocksparse_train._train_tables(layout)
    ops = spy.ops
    out, lse = ops.block_sparse_forward(
        q, k, v, layout.kv_num_blocks, layout.kv_indices, t.mask_id, t.masks, 16, 16, 1.0
    )
    dlse = torch.zeros_like(lse)

    def call(q_ptr=t.q_ptr, q_blocks=t.q_blocks, q_mask=t.q_mask_id, masks=t.masks, dtype=torch.float32):
        x = [y.to(dtype) for y in (q, k, v, out, out, lse, dlse)]
        return ops.block_sparse_backward(*x, q_ptr, q_blocks, q_mask, masks, 16, 16, 1.0)

    call()
    bad_blocks = t.q_blocks.clone()
    bad_blocks[0] = 4
    with pytest.raises(RuntimeError, match="q_blocks"):
        call(q_blocks=bad_blocks)
    bad_mask = t.q_mask_id.clone()
    bad_mask[0] = t.masks.shape[0]
    with pytest.raises(RuntimeError, match="q_mask_id"):
        call(q_mask=bad_mask)
    bad_ptr = t.q_ptr.clone()
    bad_ptr[0, 0, -1] = t.q_blocks.numel() + 1
    with pytest.raises(RuntimeError, match="q_ptr"):
        call(q_ptr=bad_ptr)
    with pytest.raises(RuntimeError, match="key blocks"):
        call(q_ptr=t.q_ptr[..., :-1].contiguous())
    with pytest.raises(RuntimeError, match="masks must be"):
        call(masks=t.masks[:, :8].contiguous())
    with pytest.raises(RuntimeError, match="float32 or float64"):
        call(dtype=torch.float16)
