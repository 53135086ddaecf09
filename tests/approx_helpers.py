"""Shared helpers of the approximation tests: run a function with gradients and compare with a reference."""

from __future__ import annotations

import torch


def rand_qkv(b=2, hq=4, hkv=2, n=37, d=8, dv=None, seed=0, dtype=torch.float32, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, d, generator=gen, dtype=torch.float64) * scale
    k = torch.randn(b, hkv, n, d, generator=gen, dtype=torch.float64) * scale
    v = torch.randn(b, hkv, n, dv or d, generator=gen, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def padding_mask(b: int, n: int, lengths) -> torch.Tensor:
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]


def with_grads(fn, q, k, v, seed=1):
    """``fn(q, k, v)`` and the gradients of ``<out, g>`` for a fixed random cotangent ``g``."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    (out * g).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def assert_no_future_leak(fn, q, k, v, steps, atol=1e-6):
    """Causality of ``fn(q, k, v) -> [B, H, N, D]``: shifting every position after ``t`` of q, k and v
    leaves output rows ``<= t`` unchanged, for each ``t`` in ``steps``."""
    out = fn(q, k, v)
    for t in steps:
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, :, t + 1 :] += 3.0
        assert torch.allclose(fn(q2, k2, v2)[:, :, : t + 1], out[:, :, : t + 1], atol=atol)


def assert_close_rel(got, want, rtol, what=""):
    got, want = got.double(), want.double()
    assert not torch.isnan(got).any(), f"{what}: NaN"
    scale = want.abs().max().clamp_min(1e-30)
    err = ((got - want).abs().max() / scale).item()
    assert err <= rtol, f"{what}: max relative error {err:.3g} > {rtol:.1g}"


def assert_matches(fast, naive, q, k, v, rtol32=1e-5, rtol64=1e-10, grads=True):
    """``fast`` in fp32 and fp64 against ``naive`` in fp64 on the same inputs: forward and gradients."""
    q64, k64, v64 = (x.double() for x in (q, k, v))
    want = with_grads(naive, q64, k64, v64) if grads else (naive(q64, k64, v64),)
    for dtype, rtol in ((torch.float64, rtol64), (torch.float32, rtol32)):
        args = (x.to(dtype) for x in (q, k, v))
        got = with_grads(fast, *args) if grads else (fast(*args),)
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            if b is None:
                assert a is None, f"{name}: unexpected gradient"
                continue
            assert a.dtype == dtype, f"{name}: dtype {a.dtype} != {dtype}"
            assert_close_rel(a, b, rtol, f"{dtype} {name}")
