"""Neighborhood attention (NAT / DiNAT) against a brute-force reading of its definition.

Definition (NATTEN, reference/algorithms.md §10), per axis of length n, kernel k, dilation d:
position x is in dilation group g = x mod d at group coordinate x // d; the group has
ceil((n - g) / d) positions. Non-causal: the k group coordinates centred on x, the centre clamped
so the window never leaves the group (shifted at borders: always exactly k neighbours). Causal: the
k group coordinates ending at x, dropping negative ones. 2-D: product of the per-axis sets.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import spattn
from spattn.patterns import Neighborhood
from spattn.patterns.reference import nat_1d, nat_2d


def _load_shared_checks():
    """The brute-force checker lives in test_patterns.py (works whether or not tests/ is a package)."""
    name = "_spattn_test_patterns_shared"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("test_patterns.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


check, qk = _load_shared_checks().check, _load_shared_checks().qk

EXAMPLES = int(os.environ.get("SPATTN_EXAMPLES", "40"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None)


@SETTINGS
@given(
    k=st.integers(1, 9),
    d=st.integers(1, 5),
    block=st.sampled_from([4, 8, 13, 16]),
    causal=st.booleans(),
    data=st.data(),
)
def test_neighborhood_1d(k, d, block, causal, data):
    nk = data.draw(st.integers(k * d, max(k * d, 300)), label="nk")
    nq = data.draw(st.one_of(st.just(nk), st.integers(1, nk)), label="nq")
    expected = nat_1d(nq, nk, k, d, causal)
    layout = Neighborhood(kernel=k, dilation=d, block=block).layout(*qk(nq, nk), causal=causal)
    check(layout, expected, block)
    if not causal:
        assert (expected.sum(1) == k).all(), "every query has exactly kernel neighbours"


@SETTINGS
@given(
    k=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    d=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    block=st.sampled_from([4, 8, 13, 16]),
    causal=st.booleans(),
    scalar=st.booleans(),
    data=st.data(),
)
@pytest.mark.slow
def test_neighborhood_2d(k, d, block, causal, scalar, data):
    if scalar:  # the same kernel / dilation on both axes, given as an int
        k, d = (k[0], k[0]), (d[0], d[0])
    H = data.draw(st.integers(k[0] * d[0], max(k[0] * d[0], 20)), label="H")
    W = data.draw(st.integers(k[1] * d[1], max(k[1] * d[1], 20)), label="W")
    assume(H * W <= 400)
    nq = data.draw(st.one_of(st.just(H * W), st.integers(1, H * W)), label="nq")
    expected = nat_2d(nq, H, W, k, d, causal)
    p = Neighborhood(kernel=k[0] if scalar else k, dilation=d[0] if scalar else d, shape=(H, W), block=block)
    check(p.layout(*qk(nq, H * W), causal=causal), expected, block)
    if not causal:
        assert (expected.sum(1) == k[0] * k[1]).all()


def test_interior_is_a_symmetric_dilated_window():
    n, k, d = 200, 7, 3
    dense = Neighborhood(kernel=k, dilation=d, block=16).layout(*qk(n, n)).to_dense()[0, 0]
    for i in range(k // 2 * d, n - k // 2 * d):
        js = torch.nonzero(dense[i]).flatten().tolist()
        assert js == [i + d * t for t in range(-(k // 2), k // 2 + 1)]


def test_border_window_is_shifted_not_truncated():
    dense = Neighborhood(kernel=5, block=8).layout(*qk(20, 20)).to_dense()[0, 0]
    assert torch.nonzero(dense[0]).flatten().tolist() == [0, 1, 2, 3, 4]
    assert torch.nonzero(dense[19]).flatten().tolist() == [15, 16, 17, 18, 19]
    causal = Neighborhood(kernel=5, block=8).layout(*qk(20, 20), causal=True).to_dense()[0, 0]
    assert torch.nonzero(causal[1]).flatten().tolist() == [0, 1]
    assert torch.nonzero(causal[10]).flatten().tolist() == [6, 7, 8, 9, 10]


def test_spec_round_trip():
    for p in [
        Neighborhood(),
        Neighborhood(kernel=3, dilation=2, shape=(8, 8), block=16),
        Neighborhood(kernel=(3, 5), dilation=(2, 1), shape=(10, 12)),
    ]:
        assert spattn.pattern(repr(p)) == p
    assert spattn.pattern("neighborhood(kernel=3, shape=[4, 5])").shape == (4, 5)


def test_no_quadratic_construction():
    q = torch.empty(1, 1, 65536, 2)
    layout = Neighborhood(kernel=7, dilation=4, block=256).layout(q, q, causal=False)
    assert layout.num_q_blocks == 256
    assert layout.block_density() < 0.05


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: Neighborhood(kernel=0), ValueError, r"neighborhood: kernel must be >= 1"),
        (lambda: Neighborhood(kernel=2.0), TypeError, r"neighborhood: kernel"),
        (lambda: Neighborhood(dilation=0), ValueError, r"neighborhood: dilation"),
        (lambda: Neighborhood(dilation=(1, 2)), ValueError, r"neighborhood: dilation must be an int or 1 ints"),
        (lambda: Neighborhood(kernel=(3, 3, 3), shape=(4, 4)), ValueError, r"neighborhood: kernel.*2 ints"),
        (lambda: Neighborhood(shape=(3,)), ValueError, r"neighborhood: shape must be None"),
        (lambda: Neighborhood(shape=(0, 4)), ValueError, r"neighborhood: shape must be >= 1"),
        (lambda: Neighborhood(block=0), ValueError, r"neighborhood: block"),
        (lambda: Neighborhood(kernel=7).layout(*qk(6, 6)), ValueError, r"shorter than kernel\*dilation = 7\*1"),
        (lambda: Neighborhood(kernel=3, dilation=4).layout(*qk(11, 11)), ValueError, r"kernel\*dilation"),
        (lambda: Neighborhood(kernel=3, shape=(4, 5)).layout(*qk(21, 21)), ValueError, r"shape=\(4, 5\).*Nk = 21"),
        (lambda: Neighborhood(kernel=(3, 5), shape=(8, 4)).layout(*qk(32, 32)), ValueError, r"axis cols"),
        (lambda: Neighborhood(kernel=3).layout(*qk(12, 10)), ValueError, r"Nq \(12\) must be <= Nk \(10\)"),
        (lambda: spattn.pattern("neighborhood(kernal=3)"), ValueError, r"kernal.*valid: neighborhood\(kernel=7"),
    ],
)
def test_bad_parameters(make, exc, match):
    with pytest.raises(exc, match=match):
        make()
