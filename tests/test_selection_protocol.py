"""Every kind of selection meets one protocol, and one dispatch table decides which kernel runs it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spattn
from spattn import functional
from spattn.kernels.reference import reference_attention
from spattn.layout import Layout
from spattn.selection import ClusterSelection, PageSelection, Selection, TokenSelection

SPECS = [
    "window(size=9, block=16)",
    "bigbird(block=16, window=1, globals=1, random=1)",
    "dilated_window(size=3, dilation=2, block=16)",
    "vertical_slash(vertical=8, slash=8, last_q=16)",
    "topk(k=5)",
    "routing(clusters=3)",
    "biformer(regions=2, topk=1)",
    "xattention(threshold=0.8, stride=4, block=16)",
]


def _selections(b, hq, hkv, n, causal, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, 8, generator=gen)
    k = torch.randn(b, hkv, n, 8, generator=gen)
    for spec in SPECS:
        if spec.startswith("biformer"):
            continue  # needs a square grid of tokens: covered in test_biformer
        prefill_only = spec.startswith(("vertical_slash", "xattention"))  # defined for causal prefill
        yield spec, spattn.pattern(spec).select(q, k, causal=causal or prefill_only)
    num_pages = -(-n // 8)
    first = torch.randint(0, num_pages, (b, hq, n, 1), generator=gen)
    second = torch.where(torch.rand(b, hq, n, 1, generator=gen) < 0.5, (first + 1) % num_pages, -1)  # or unused
    yield "pages", PageSelection(torch.cat([first, second], -1), page=8, q_len=n, kv_len=n, causal=causal)


@settings(max_examples=12, deadline=None)
@given(
    b=st.integers(1, 2),
    hkv=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2]),
    n=st.integers(17, 70),
    causal=st.booleans(),
    seed=st.integers(0, 10**6),
)
def test_every_selection_meets_the_protocol(b, hkv, group, n, causal, seed):
    for spec, sel in _selections(b, hkv * group, hkv, n, causal, seed):
        assert isinstance(sel, Selection), spec
        assert functional.is_selection(sel), spec
        dense = sel.to_dense()
        assert dense.shape == (sel.batch, sel.heads, sel.q_len, sel.kv_len), spec
        assert torch.equal(sel.pair_counts(), dense.sum(-1)), spec
        assert sel.density() == pytest.approx(dense.double().mean().item(), abs=1e-12), spec
        assert torch.equal(sel.to_layout().to_dense().expand_as(dense), dense), spec
        assert isinstance(sel.kind, str) and sel.device == dense.device


def test_dispatch_names_the_backends_that_can_run_a_selection():
    q, k = torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    sel = spattn.pattern("topk(k=4)").select(q, k)
    assert functional.kernel_for(sel, "auto").name == "tokensparse"
    assert functional.kernel_for(sel, "reference").name == "reference"
    with pytest.raises(
        ValueError,
        match=r"backend='flex' cannot run token selection \(TokenSelection\); backends for it: auto, blocksparse, reference",
    ):
        functional.kernel_for(sel, "flex")
    lay = spattn.pattern("window(size=4, block=16)").layout(q, k)
    assert functional.kernel_for(lay, "blocksparse").name == "blocksparse"
    with pytest.raises(TypeError, match="Kernel"):
        functional.register_kernel(Layout, "auto", lambda *a, **kw: None)
    with pytest.raises(ValueError, match="backend must be one of"):
        functional.register_kernel(Layout, "fast", functional.Kernel("x", reference_attention))
    assert not functional.is_selection(torch.ones(3))


@dataclass(frozen=True)
class Stripes:
    """A new kind of selection defined outside the package: query i sees keys j with j % stride == i % stride."""

    stride: int
    q_len: int
    kv_len: int
    kind = "stripes"
    batch = 1
    heads = 1
    device = torch.device("cpu")

    def to_dense(self) -> torch.Tensor:
        i, j = torch.arange(self.q_len)[:, None], torch.arange(self.kv_len)[None, :]
        return ((i - j) % self.stride == 0)[None, None]

    def pair_counts(self) -> torch.Tensor:
        return self.to_dense().sum(-1)

    def density(self) -> float:
        return float(self.to_dense().double().mean())

    def to_layout(self, block=None) -> Layout:
        return Layout.from_dense(self.to_dense(), block or 16)


def test_a_new_kind_of_selection_is_one_registration(monkeypatch):
    monkeypatch.setattr(functional, "_KERNELS", dict(functional._KERNELS))
    calls = []

    def stripes_kernel(q, k, v, selection, **kwargs):
        calls.append(selection.stride)
        return spattn.attention(q, k, v, selection.to_layout(), backend="blocksparse", **kwargs)

    functional.register_kernel(Stripes, "auto", functional.Kernel("stripes", stripes_kernel))
    q, k, v = (torch.randn(2, 4, 50, 8, dtype=torch.float64) for _ in range(3))
    sel = Stripes(stride=3, q_len=50, kv_len=50)
    assert isinstance(sel, Selection)
    out = spattn.attention(q, k, v, sel)
    assert calls == [3]
    want = reference_attention(q, k, v, Layout.from_dense(sel.to_dense(), 16))
    assert (out - want).abs().max() <= 1e-10
    with pytest.raises(ValueError, match="stripes is for"):
        spattn.attention(q[:, :, :40], k, v, sel)


def test_cluster_selection_counts_each_pair_once():
    qi = torch.tensor([[[[0, 1, 2], [1, 2, 3]]]])  # query 1 and 2 sit in both windows
    sel = ClusterSelection(qi, qi, q_len=5, kv_len=5)
    assert sel.pair_counts().tolist() == [[[3, 4, 4, 3, 0]]]
    causal = ClusterSelection(qi, qi, q_len=5, kv_len=5, causal=True)
    assert torch.equal(causal.pair_counts(), causal.to_dense().sum(-1))
    tokens = TokenSelection(torch.tensor([[[[0, -1], [1, 0]]]]), q_len=2, kv_len=3)
    assert tokens.pair_counts().tolist() == [[[1, 2]]]


def test_every_pattern_select_takes_one_signature():
    """``select(q, k, causal=False, *, key_padding_mask=None, state=None)`` everywhere: callers pass the
    keywords without looking at the class (no ``inspect.signature`` in the dispatch path)."""
    import inspect

    from spattn import registry
    from spattn.patterns import Pattern

    classes = {
        m.factory for m in registry._REGISTRY.values() if isinstance(m.factory, type) and issubclass(m.factory, Pattern)
    }
    assert len(classes) >= 20
    for cls in classes:
        params = inspect.signature(cls.select).parameters
        assert list(params)[:4] == ["self", "q", "k", "causal"], cls.__name__
        for name in ("key_padding_mask", "state"):
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY and params[name].default is None, (
                cls.__name__,
                name,
            )
    assert "inspect" not in vars(functional)


def test_backend_for_keeps_selections_on_their_own_kernels():
    layout = Layout.from_block_map(torch.ones(1, 1, 2, 2, dtype=torch.bool), q_len=8, kv_len=8, block_q=4)
    tokens = TokenSelection(torch.zeros(1, 1, 8, 1, dtype=torch.long), q_len=8, kv_len=8)
    for backend in ("auto", "reference", "blocksparse", "flex"):
        assert functional.backend_for(layout, backend) == backend
        assert functional.backend_for(tokens, backend) == "auto"  # the token kernel whatever block kernel was asked


def _brute_window(q_len: int, kv_len: int, window: int) -> torch.Tensor:
    """The causal sliding window by its definition: aligned query i' = i + Nk - Nq sees j iff 0 <= i' - j < window."""
    d = torch.arange(q_len)[:, None] + (kv_len - q_len) - torch.arange(kv_len)[None, :]
    return (d >= 0) & (d < window)


@settings(max_examples=10, deadline=None)
@given(
    nq=st.integers(1, 45),
    extra=st.integers(0, 30),
    window=st.integers(1, 40),
    causal=st.booleans(),
    seed=st.integers(0, 10**6),
)
def test_within_window_keeps_exactly_the_pairs_in_the_window(nq, extra, window, causal, seed):
    nk = nq + extra
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 2, nq, 8, generator=gen), torch.randn(2, 1, nk, 8, generator=gen)
    band = _brute_window(nq, nk, window)
    layout = spattn.pattern("window(size=5, block=8)").select(q, k, causal=causal)
    tokens = spattn.pattern(f"topk(k={min(4, nk)})").select(q, k, causal=causal)
    pages = PageSelection(torch.arange(-(-nk // 8))[-2:].expand(2, 2, nq, -1).contiguous(), page=8, q_len=nq, kv_len=nk)
    for sel in (layout, tokens, pages):
        restricted = sel.within_window(window)
        assert functional.is_selection(restricted)
        assert torch.equal(restricted.to_dense().expand(sel.batch, sel.heads, nq, nk), sel.to_dense() & band)
    whole = Layout.causal_window(nq, nk, window, 8, 16)
    assert torch.equal(whole.to_dense()[0, 0], band)
    assert not hasattr(ClusterSelection, "within_window")  # routing windows average: no restriction
    with pytest.raises(ValueError, match="window must be >= 1"):
        tokens.within_window(0)
