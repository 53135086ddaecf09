"""Shared test helpers: compare a kernel with the dense reference, forward and gradients."""

from __future__ import annotations

import functools

import torch

from spattn.kernels.reference import reference_attention

#: the smallest MQAR training run of the CLI (``spattn train``); tests add sizes, steps and --out
TINY_MQAR_TRAIN = [
    "train",
    "mqar",
    "--attention",
    "window(size=8)",
    "--dim",
    "16",
    "--seq-len",
    "64",
    "--kv-pairs",
    "4",
    "--vocab",
    "64",
    "--batch-size",
    "8",
]


def random_qkv(b, hq, hkv, nq, nk, d, dtype=torch.float32, seed=0):
    """Seeded ``q [b, hq, nq, d]``, ``k, v [b, hkv, nk, d]`` (drawn in float64, then cast to ``dtype``)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, nk, d, generator=gen, dtype=torch.float64).to(dtype)
    return q, k, v


def finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isinf(x), torch.zeros_like(x), x)


def run_with_grads(fn, q, k, v, layout, kpm=None, seed=0, lse_grad=True):
    """Run ``fn`` and backprop a fixed random cotangent through out (and lse); return values and grads."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v, layout, key_padding_mask=kpm, return_lse=True)
    gen = torch.Generator().manual_seed(seed)
    # dk, dv sum over queries: scale the cotangents so every gradient entry is O(1) and an
    # absolute bound is also a relative one
    norm = q.shape[2] ** -0.5
    g_out = (torch.randn(out.shape, generator=gen, dtype=torch.float64) * norm).to(out.dtype)
    g_lse = (torch.randn(lse.shape, generator=gen, dtype=torch.float64) * norm * lse_grad).to(lse.dtype)
    loss = (out * g_out).sum() + (finite(lse) * g_lse).sum()
    loss.backward()
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def assert_matches_reference(fn, q, k, v, layout, kpm=None, atol=1e-5, lse_grad=True, softcap=None):
    """``fn`` in the inputs' dtype against the reference computed in float64 from the same inputs
    (both called with ``softcap=`` when it is given)."""
    reference = reference_attention
    if softcap is not None:
        fn, reference = functools.partial(fn, softcap=softcap), functools.partial(reference, softcap=softcap)
    got = run_with_grads(fn, q, k, v, layout, kpm, lse_grad=lse_grad)
    q64, k64, v64 = (x.double() for x in (q, k, v))
    want = run_with_grads(reference, q64, k64, v64, layout, kpm, lse_grad=lse_grad)
    names = ("out", "lse", "dq", "dk", "dv")
    for name, a, b in zip(names, got, want):
        assert not torch.isnan(a).any(), f"{name} has NaN"
        if name == "lse":
            assert torch.equal(torch.isinf(a), torch.isinf(b)), "lse -inf rows differ"
            a, b = finite(a), finite(b)
        err = (a.double() - b.double()).abs().max().item()
        assert err <= atol, f"{name}: max abs error {err:.3g} > {atol:.1g}"
    return got


class CountingOps:
    """Wraps the compiled ops (``spattn._compiled.ops()``) and counts the calls of each, so a test
    can check that a path really ran compiled. Install with
    ``monkeypatch.setitem(spattn._compiled._state, "ops", CountingOps(ops))``."""

    def __init__(self, ops):
        self.ops, self.calls = ops, {}

    def __getattr__(self, name):
        if name.startswith("_"):  # printing helpers (hypothesis reports), not ops
            raise AttributeError(name)

        def call(*args):
            self.calls[name] = self.calls.get(name, 0) + 1
            return getattr(self.ops, name)(*args)

        return call
