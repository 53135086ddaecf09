"""Every registered static pattern, run by the block-sparse kernel, matches the dense reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spattn
from spattn.kernels.blocksparse import blocksparse_attention

from .helpers import assert_matches_reference

# small-parameter instances of every static pattern (tiles of 16 so tests cover many tiles)
SPECS = {
    "dense": "dense(block=16)",
    "window": "window(size=13, block=16)",
    "dilated_window": "dilated_window(size=4, dilation=3, block=16)",
    "global_tokens": "global_tokens(count=5, block=16)",
    "bigbird": "bigbird(block=16, window=3, globals=1, random=2, seed=3)",
    "strided": "strided(stride=12, block=16)",
    "fixed": "fixed(block=16, summary=3)",
    "a_shape": "a_shape(sinks=4, local=20, block=16)",
    "neighborhood": "neighborhood(kernel=5, dilation=2, block=16)",
}
SHAPED = {  # patterns whose definition fixes the sequence length
    "axial": ("axial(rows=12, block=16)", 12 * 17),
    "neighborhood_2d": ("neighborhood(kernel=3, dilation=2, shape=(12, 15), block=16)", 180),
}


def test_every_static_pattern_has_a_kernel_test():
    static = {m.name for m in spattn.mechanisms() if m.kind == "static"}
    covered = set(SPECS) | {spec.split("(")[0] for spec, _ in SHAPED.values()}
    assert static <= covered, f"add test specs for {sorted(static - covered)}"


def _qkv(batch, hq, hkv, nq, nk, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, h, n, dim, generator=gen) for h, n in ((hq, nq), (hkv, nk), (hkv, nk)))


@settings(max_examples=6)
@given(
    batch=st.integers(1, 2),
    group=st.sampled_from([1, 2]),
    n=st.integers(20, 300),
    extra_keys=st.sampled_from([0, 0, 37]),
    causal=st.booleans(),
    padded=st.booleans(),
    seed=st.integers(0, 1000),
)
@pytest.mark.parametrize("name", sorted(SPECS))
def test_pattern_on_blocksparse_matches_reference(name, batch, group, n, extra_keys, causal, padded, seed):
    if name == "neighborhood" and (n < 10 or extra_keys):
        extra_keys = 0  # neighbourhoods are defined for self-attention over one sequence
    q, k, v = _qkv(batch, 2 * group, 2, n, n + extra_keys, 8, seed)
    layout = spattn.pattern(SPECS[name]).layout(q, k, causal=causal)
    kpm = (torch.rand(batch, n + extra_keys, generator=torch.Generator().manual_seed(seed)) < 0.9) if padded else None
    assert_matches_reference(blocksparse_attention, q, k, v, layout, kpm)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", sorted(SHAPED))
def test_shaped_pattern_on_blocksparse_matches_reference(name, causal):
    spec, n = SHAPED[name]
    q, k, v = _qkv(2, 4, 2, n, n, 8, seed=5)
    layout = spattn.pattern(spec).layout(q, k, causal=causal)
    assert_matches_reference(blocksparse_attention, q, k, v, layout)
