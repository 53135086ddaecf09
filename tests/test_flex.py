"""FlexAttention backend against the dense reference (spattn.kernels.reference), and Layout.to_block_mask itself.

Compiling FlexAttention costs seconds per new (shape, dtype, block size, predicate) on CPU, so the
cases share a few shapes: B=2, Nq=100, Nk=120 (not multiples of the blocks), D=16.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from spattn import Layout
from spattn.kernels import flex as flex_mod
from spattn.kernels.flex import flex_attention, flex_available
from spattn.kernels.reference import float64_attention, reference_attention

B, H, NQ, NK, D = 2, 2, 100, 120, 16
ATOL = 1e-5

needs_flex = pytest.mark.skipif(
    not flex_available("cpu"),
    reason=f"compiled FlexAttention cannot run here: {flex_mod._unavailable_reason('cpu')}",
)


def qkv(hq=H, hkv=H, nq=NQ, nk=NK, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, hq, nq, D, generator=g),
        torch.randn(B, hkv, nk, D, generator=g),
        torch.randn(B, hkv, nk, D, generator=g),
    )


def random_mask(b, h, nq=NQ, nk=NK, p=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, nq, nk, generator=g) < p


def column_layout(heads=H, seed=2):
    g = torch.Generator().manual_seed(seed)
    block_map = torch.rand(1, heads, 7, 4, generator=g) < 0.4
    column_map = torch.rand(1, heads, 7, NK, generator=g) < 0.05
    return Layout.from_block_map(block_map, q_len=NQ, kv_len=NK, block_q=16, block_k=32, column_map=column_map)


def causal_layout(nq=NQ, nk=NK):
    from spattn.patterns import pattern

    q = torch.zeros(1, 1, nq, D)
    k = torch.zeros(1, 1, nk, D)
    return pattern("dense(block=16)").layout(q, k, causal=True)


# ----------------------------------------------------------------------------- to_block_mask
@pytest.mark.parametrize("kind", ["dense16x32", "dense32", "columns", "causal"])
def test_to_block_mask_structure(kind):
    from torch.nn.attention.flex_attention import create_mask

    layout = {
        "dense16x32": lambda: Layout.from_dense(random_mask(B, H, p=0.05), 16, 32),
        "dense32": lambda: Layout.from_dense(random_mask(1, 1, p=0.05), 32),
        "columns": column_layout,
        "causal": causal_layout,
    }[kind]()
    bm = layout.to_block_mask()
    assert bm.BLOCK_SIZE == (layout.block_q, layout.block_k)
    blocks = bm.to_dense().bool()[..., : layout.num_kv_blocks]
    expect = layout.block_map()
    cm = layout.column_map()
    if cm is not None:
        nkb, bk = layout.num_kv_blocks, layout.block_k
        padded = torch.nn.functional.pad(cm, (0, nkb * bk - layout.kv_len))
        expect = expect | padded.view(*cm.shape[:3], nkb, bk).any(-1)
    assert torch.equal(blocks, expect)

    # token level: full tiles entirely, partial tiles where mask_mod holds
    def tokens(num, idx):
        m = torch.zeros(*num.shape, layout.num_kv_blocks + 1, dtype=torch.bool)
        valid = torch.arange(idx.shape[-1]) < num[..., None]
        m.scatter_(-1, torch.where(valid, idx.long(), layout.num_kv_blocks), True)
        m = m[..., :-1].repeat_interleave(layout.block_q, 2).repeat_interleave(layout.block_k, 3)
        return m[..., : layout.q_len, : layout.kv_len]

    part = tokens(bm.kv_num_blocks, bm.kv_indices)
    full = tokens(bm.full_kv_num_blocks, bm.full_kv_indices) if bm.full_kv_num_blocks is not None else False
    pred = create_mask(bm.mask_mod, layout.batch, layout.heads, layout.q_len, layout.kv_len, device="cpu")
    assert torch.equal(full | (part & pred), layout.to_dense())


# ----------------------------------------------------------------------------- forward vs oracle
@needs_flex
@pytest.mark.slow
def test_random_layouts_per_head_and_shared():
    q, k, v = qkv()
    for mask, bq, bk in (
        (random_mask(B, H), 16, 32),
        (random_mask(B, H, p=0.1, seed=5), 16, 32),
        (random_mask(1, 1, seed=3), 32, 32),
    ):
        layout = Layout.from_dense(mask, bq, bk)
        with torch.no_grad():
            out = flex_attention(q, k, v, layout)
        assert out.shape == q.shape
        torch.testing.assert_close(out, reference_attention(q, k, v, layout), atol=ATOL, rtol=0)


@needs_flex
def test_columns_and_causal_nq_ne_nk_and_scale():
    q, k, v = qkv()
    layout = column_layout()
    assert layout.has_columns
    with torch.no_grad():
        out = flex_attention(q, k, v, layout)
    torch.testing.assert_close(out, reference_attention(q, k, v, layout), atol=ATOL, rtol=0)
    layout = causal_layout()
    with torch.no_grad():
        out = flex_attention(q, k, v, layout, scale=0.3)
    torch.testing.assert_close(out, reference_attention(q, k, v, layout, scale=0.3), atol=ATOL, rtol=0)


@needs_flex
def test_gqa():
    q, k, v = qkv(hq=4, hkv=2)
    layout = Layout.from_dense(random_mask(B, 4, seed=7), 16, 32)
    with torch.no_grad():
        out = flex_attention(q, k, v, layout)
    torch.testing.assert_close(out, reference_attention(q, k, v, layout), atol=ATOL, rtol=0)


@needs_flex
def test_key_padding_and_empty_rows_give_zeros():
    q, k, v = qkv()
    mask = random_mask(B, H, p=0.3, seed=11)
    mask[:, :, 5] = False  # a single empty row inside a partial tile
    mask[:, :, 32:48] = False  # a whole empty query block
    layout = Layout.from_dense(mask, 16, 32)
    kpm = torch.rand(B, NK, generator=torch.Generator().manual_seed(4)) < 0.7
    kpm[1] = False  # batch 1 has no real key at all
    with torch.no_grad():
        out = flex_attention(q, k, v, layout, key_padding_mask=kpm)
    assert not out.isnan().any()
    assert out[:, :, 5].abs().max() == 0 and out[:, :, 32:48].abs().max() == 0 and out[1].abs().max() == 0
    torch.testing.assert_close(out, reference_attention(q, k, v, layout, key_padding_mask=kpm), atol=ATOL, rtol=0)
    # padding inside tiles the layout marks full (a dense layout has only full tiles)
    dense = Layout.from_dense(torch.ones(NQ, NK, dtype=torch.bool), 16, 32)
    with torch.no_grad():
        out = flex_attention(q, k, v, dense, key_padding_mask=kpm)
    torch.testing.assert_close(out, reference_attention(q, k, v, dense, key_padding_mask=kpm), atol=ATOL, rtol=0)


@needs_flex
def test_bfloat16_within_twice_the_rounding_of_an_fp32_reference():
    q, k, v = (t.bfloat16() for t in qkv(seed=21))
    layout = Layout.from_dense(random_mask(B, H, seed=22), 16, 32)
    dense = layout.to_dense()
    truth = float64_attention(q.double(), k.double(), v.double(), dense)
    cast = float64_attention(q.float(), k.float(), v.float(), dense).bfloat16()
    with torch.no_grad():
        out = flex_attention(q, k, v, layout)
    assert out.dtype == torch.bfloat16
    err = (out.double() - truth).abs().max()
    assert err <= 2 * (cast.double() - truth).abs().max()


ALL_PATTERN_CASES = [
    (spec, causal)
    for spec in (
        "window(size=40)",
        "dilated_window(size=5, dilation=3)",
        "global_tokens(count=7)",
        "bigbird(block=32)",
        "strided(stride=17)",
        "fixed(block=32, summary=4)",
        "axial(rows=15)",
        "a_shape(sinks=8, local=50)",
        "neighborhood(kernel=9)",
        "dense",
    )
    for causal in (False, True)
]
# each (pattern, causal) compiles anew (10-30 s on 2 cores): three by default, all with SPATTN_SLOW_TESTS=1
DEFAULT_PATTERN_CASES = [("window(size=40)", True), ("bigbird(block=32)", False), ("fixed(block=32, summary=4)", False)]


@needs_flex
@pytest.mark.parametrize(
    "spec, causal", ALL_PATTERN_CASES if os.environ.get("SPATTN_SLOW_TESTS") else DEFAULT_PATTERN_CASES
)
def test_registered_patterns_with_gqa(spec, causal):
    from spattn.patterns import pattern

    g = torch.Generator().manual_seed(31)
    q = torch.randn(2, 4, 300, 32, generator=g)
    k, v = torch.randn(2, 2, 300, 32, generator=g), torch.randn(2, 2, 300, 32, generator=g)
    layout = pattern(spec).layout(q, k, causal=causal)
    with torch.no_grad():
        out = flex_attention(q, k, v, layout)
    torch.testing.assert_close(out, reference_attention(q, k, v, layout), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- fallbacks and errors
@needs_flex
def test_cpu_grad_falls_back_to_blocksparse_once():
    pytest.importorskip("spattn.kernels.blocksparse")
    q, k, v = qkv()
    layout = Layout.from_dense(random_mask(B, H, seed=13), 16, 32)
    flex_mod._WARNED.discard("grad")
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = flex_attention(qg, kg, vg, layout)
        out2 = flex_attention(qg, kg, vg, layout)
    msgs = [str(w.message) for w in caught if "blocksparse" in str(w.message)]
    assert len(msgs) == 1 and "backward on CPU" in msgs[0]
    torch.testing.assert_close(out, reference_attention(q, k, v, layout), atol=ATOL, rtol=0)
    torch.testing.assert_close(out2, out)
    out.sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()
    # with grad mode off, requires_grad inputs are fine for flex itself
    with torch.no_grad():
        torch.testing.assert_close(flex_attention(qg, kg, vg, layout), out.detach(), atol=ATOL, rtol=0)


@needs_flex
def test_return_lse_on_cpu_falls_back():
    pytest.importorskip("spattn.kernels.blocksparse")
    q, k, v = qkv()
    mask = random_mask(B, H, seed=17)
    mask[:, :, 3] = False
    layout = Layout.from_dense(mask, 16, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            out, lse = flex_attention(q, k, v, layout, return_lse=True)
    assert lse.shape == (B, H, NQ) and lse.dtype == torch.float32
    assert torch.isneginf(lse[:, :, 3]).all() and out[:, :, 3].abs().max() == 0
    torch.testing.assert_close(out, reference_attention(q, k, v, layout), atol=ATOL, rtol=0)


def test_float64_on_cpu_is_a_type_error(monkeypatch):
    monkeypatch.setattr(flex_mod, "_unavailable_reason", lambda device: None)
    q, k, v = (t.double() for t in qkv())
    layout = Layout.from_dense(random_mask(1, 1), 16, 32)
    with pytest.raises(TypeError, match="float32, bfloat16 and float16"):
        flex_attention(q, k, v, layout)


def test_unavailable_platform_raises(monkeypatch):
    monkeypatch.setattr(flex_mod, "_unavailable_reason", lambda device: "no AVX2 on this CPU")
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match="no AVX2"):
        flex_attention(q, k, v, Layout.from_dense(random_mask(1, 1), 16, 32))


def test_bad_inputs():
    q, k, v = qkv()
    layout = Layout.from_dense(random_mask(1, 1), 16, 32)
    with pytest.raises(ValueError, match="q_len, kv_len"):
        flex_attention(q[:, :, :50], k, v, layout)
    with pytest.raises(ValueError, match="multiple"):
        flex_attention(torch.randn(B, 3, NQ, D), k, v, layout)
    with pytest.raises(TypeError, match="key_padding_mask"):
        flex_attention(q, k, v, layout, key_padding_mask=torch.ones(B, NK))
    with pytest.raises(ValueError, match="key_padding_mask"):
        flex_attention(q, k, v, layout, key_padding_mask=torch.ones(B, NK - 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="layout"):
        flex_attention(q, k, v, "window(size=3)")
    with pytest.raises(TypeError, match="one dtype"):
        flex_attention(q, k.half(), v, layout)


def test_flex_available_reports_devices():
    assert flex_available("meta") is False
    assert isinstance(flex_available("cpu"), bool)
    if not torch.cuda.is_available():
        assert flex_available("cuda") is False


def test_block_mask_built_once_per_layout():
    layout = Layout.from_dense(random_mask(B, H), 16, 32)
    first = flex_mod._layout_block_mask(layout, torch.device("cpu"))
    assert flex_mod._layout_block_mask(layout, torch.device("cpu")) is first
