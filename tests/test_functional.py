"""spattn.attention: dispatch, GQA, lse, and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch

import spattn
from spattn.kernels.reference import reference_attention
from spattn.layout import Layout


def qkv(b=2, hq=4, hkv=2, nq=96, nk=96, d=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, hq, nq, d, generator=gen).to(dtype),
        torch.randn(b, hkv, nk, d, generator=gen).to(dtype),
        torch.randn(b, hkv, nk, d, generator=gen).to(dtype),
    )


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["auto", "reference", "blocksparse"])
def test_dense_matches_reference_on_every_backend(causal, backend):
    q, k, v = qkv()
    layout = spattn.pattern("dense").layout(q, k, causal=causal)
    want = reference_attention(q.double(), k.double(), v.double(), layout)
    got = spattn.attention(q, k, v, causal=causal, backend=backend)
    assert (got.double() - want).abs().max() < 1e-5


def test_auto_dense_equals_sdpa_with_gqa():
    q, k, v = qkv()
    got = spattn.attention(q, k, v, causal=True)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(got, want)


def test_decoding_alignment_queries_at_the_end():
    q, k, v = qkv(nq=5, nk=40)
    out = spattn.attention(q, k, v, causal=True)
    # the last query sees every key: same as full attention for that row
    full = spattn.attention(q[:, :, -1:], k, v)
    torch.testing.assert_close(out[:, :, -1:], full, atol=1e-6, rtol=0)
    # the first query sees keys 0..35 only
    first = spattn.attention(q[:, :, :1], k[:, :, :36], v[:, :, :36])
    torch.testing.assert_close(out[:, :, :1], first, atol=1e-6, rtol=0)


def test_spec_string_pattern_object_and_layout_agree():
    q, k, v = qkv(nq=130, nk=130)
    a = spattn.attention(q, k, v, "window(size=20)", causal=True)
    p = spattn.pattern("window", size=20)
    b = spattn.attention(q, k, v, p, causal=True)
    c = spattn.attention(q, k, v, p.layout(q, k, causal=True))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a, c, atol=0, rtol=0)


def test_return_lse_matches_logsumexp():
    q, k, v = qkv(nq=50, nk=60)
    out, lse = spattn.attention(q, k, v, return_lse=True)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(2, 1)) / 4.0
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=0)
    assert out.shape == q.shape


def test_custom_scale():
    q, k, v = qkv()
    got = spattn.attention(q, k, v, "window(size=8)", scale=0.1)
    layout = spattn.pattern("window(size=8)").layout(q, k)
    want = reference_attention(q, k, v, layout, scale=0.1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_key_padding_mask_matches_reference():
    q, k, v = qkv(nk=70)
    kpm = torch.rand(2, 70, generator=torch.Generator().manual_seed(3)) < 0.7
    got = spattn.attention(q, k, v, "bigbird(block=16, window=3, globals=1, random=1)", key_padding_mask=kpm)
    layout = spattn.pattern("bigbird(block=16, window=3, globals=1, random=1)").layout(q, k)
    want = reference_attention(q, k, v, layout, key_padding_mask=kpm)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- bad input
GOOD = qkv(b=1, hq=2, hkv=1, nq=8, nk=8, d=4)


def _call(**overrides):
    q, k, v = GOOD
    args = dict(q=q, k=k, v=v)
    kwargs = {}
    for key, val in overrides.items():
        (args if key in ("q", "k", "v") else kwargs)[key] = val
    return spattn.attention(args["q"], args["k"], args["v"], **kwargs)


BAD = [
    (dict(q="not a tensor"), TypeError, "q must be a torch.Tensor"),
    (dict(k=[1, 2]), TypeError, "k must be a torch.Tensor"),
    (dict(v=None), TypeError, "v must be a torch.Tensor"),
    (dict(q=torch.randn(2, 8, 4)), ValueError, r"q must be 4-D \[B, Hq, Nq, D\]"),
    (dict(k=torch.randn(1, 1, 8)), ValueError, r"k must be 4-D"),
    (dict(q=torch.ones(1, 2, 8, 4, dtype=torch.long)), TypeError, "q must be float16, bfloat16, float32 or float64"),
    (dict(q=torch.randn(1, 2, 8, 4).double()), TypeError, "share one dtype"),
    (dict(q=torch.randn(1, 2, 0, 4)), ValueError, "empty dimension"),
    (dict(v=torch.randn(1, 1, 9, 4)), ValueError, "k and v must have the same shape"),
    (dict(q=torch.randn(2, 2, 8, 4)), ValueError, "same batch size"),
    (dict(q=torch.randn(1, 2, 8, 5)), ValueError, "same head dim"),
    (
        dict(q=torch.randn(1, 3, 8, 4), k=torch.randn(1, 2, 8, 4), v=torch.randn(1, 2, 8, 4)),
        ValueError,
        "multiple of key/value heads",
    ),
    (dict(causal="yes"), TypeError, "causal must be a bool"),
    (dict(return_lse=1), TypeError, "return_lse must be a bool"),
    (dict(scale=-1.0), ValueError, "scale must be a positive finite number"),
    (dict(scale=float("nan")), ValueError, "scale must be a positive finite number"),
    (dict(scale="0.5"), ValueError, "scale must be a positive finite number"),
    (dict(backend="triton"), ValueError, "backend must be one of auto, reference, blocksparse, flex"),
    (dict(key_padding_mask=torch.ones(1, 8)), TypeError, "key_padding_mask must be a bool tensor"),
    (
        dict(key_padding_mask=torch.ones(1, 9, dtype=torch.bool)),
        ValueError,
        r"key_padding_mask must have shape \[B, Nk\]",
    ),
    (dict(key_padding_mask=[True] * 8), TypeError, "key_padding_mask must be a bool tensor"),
    (
        dict(pattern="no_such_pattern"),
        ValueError,
        "unknown attention mechanism 'no_such_pattern'; valid names: .*window",
    ),
    (dict(pattern="window(size=4, bogus=1)"), ValueError, "unknown parameter.*bogus"),
    (dict(pattern="window(size=)"), ValueError, "cannot parse spec"),
    (dict(pattern="window(4)"), ValueError, "parameters must be given by keyword"),
    (dict(pattern="window(size=-1)"), ValueError, "size"),
    (dict(pattern=42), TypeError, "pattern must be a spec string or a Pattern"),
    (dict(pattern=Layout.from_dense(torch.ones(9, 8, dtype=torch.bool), 4)), ValueError, r"layout is for \(Nq, Nk\)"),
    (dict(pattern=Layout.from_dense(torch.ones(3, 1, 8, 8, dtype=torch.bool), 4)), ValueError, "layout batch size 3"),
    (dict(pattern=Layout.from_dense(torch.ones(1, 5, 8, 8, dtype=torch.bool), 4)), ValueError, "layout head count 5"),
    (
        dict(pattern=Layout.from_dense(torch.ones(8, 8, dtype=torch.bool), 4), causal=True),
        ValueError,
        "causality is part of the Layout",
    ),
    (dict(pattern="bigbird(block=0)"), ValueError, "block"),
]


@pytest.mark.parametrize("overrides, error, message", BAD, ids=[m for _, _, m in BAD])
def test_bad_input_fails_early_with_a_clear_message(overrides, error, message):
    with pytest.raises(error, match=message):
        _call(**overrides)


LAYOUT_BAD = [
    (
        lambda: Layout(
            torch.zeros(1, 1, 2, dtype=torch.long),
            torch.zeros(1, 1, 2, 1, dtype=torch.long),
            q_len=8,
            kv_len=8,
            block_q=0,
        ),
        ValueError,
        "block_q must be >= 1",
    ),
    (
        lambda: Layout(
            torch.zeros(1, 1, 3, dtype=torch.long),
            torch.zeros(1, 1, 3, 1, dtype=torch.long),
            q_len=8,
            kv_len=8,
            block_q=4,
        ),
        ValueError,
        "must have 2 query blocks",
    ),
    (
        lambda: Layout(
            torch.ones(1, 1, 2, dtype=torch.long), torch.full((1, 1, 2, 1), 5), q_len=8, kv_len=8, block_q=4
        ),
        ValueError,
        r"kv_indices must lie in \[0, 2\)",
    ),
    (
        lambda: Layout(
            torch.full((1, 1, 2), 3), torch.zeros(1, 1, 2, 2, dtype=torch.long), q_len=8, kv_len=8, block_q=4
        ),
        ValueError,
        r"kv_num_blocks must lie in \[0, 2\]",
    ),
    (
        lambda: Layout(
            torch.full((1, 1, 2), 2), torch.zeros(1, 1, 2, 2, dtype=torch.long), q_len=8, kv_len=8, block_q=4
        ),
        ValueError,
        "must not repeat",
    ),
    (
        lambda: Layout(torch.ones(1, 1, 2), torch.zeros(1, 1, 2, 1), q_len=8, kv_len=8, block_q=4),
        TypeError,
        "kv_num_blocks must be an integer tensor",
    ),
    (lambda: Layout.from_dense(torch.ones(8, 8), 4), TypeError, "mask must be a bool tensor"),
    (
        lambda: (
            Layout.from_dense(torch.ones(8, 8, dtype=torch.bool), 4)
            | Layout.from_dense(torch.ones(8, 8, dtype=torch.bool), 2)
        ),
        ValueError,
        "union: layouts differ",
    ),
    (
        lambda: Layout.from_dense(torch.ones(8, 8, dtype=torch.bool), 4) & "x",
        TypeError,
        "intersection expects a Layout",
    ),
]


@pytest.mark.parametrize("make, error, message", LAYOUT_BAD, ids=[m for _, _, m in LAYOUT_BAD])
def test_bad_layouts_fail_with_clear_messages(make, error, message):
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize("nq", [1, 5])
def test_dense_gqa_non_causal_fast_path_matches_reference(nq):
    """Non-causal dense GQA folds each kv head's query heads into one head of SDPA."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 6, nq, 16, generator=g),
        torch.randn(2, 2, 33, 16, generator=g),
        torch.randn(2, 2, 33, 16, generator=g),
    )
    out = spattn.attention(q, k, v)
    ref = spattn.attention(q.double(), k.double(), v.double(), backend="reference")
    assert (out.double() - ref).abs().max() <= 1e-5
