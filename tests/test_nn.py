"""spattn.nn.Attention: projections + any mechanism, GQA, key padding, caching, errors."""

from __future__ import annotations

import pytest
import torch

import spattn
from spattn.nn.reference import naive_attention_layer


@pytest.mark.parametrize("spec", [None, "window(size=9, block=16)", "bigbird(block=16, window=3, globals=1, random=1)"])
@pytest.mark.parametrize("causal", [False, True])
def test_layer_equals_manual_computation(spec, causal):
    torch.manual_seed(0)
    layer = spattn.nn.Attention(dim=32, heads=4, attention=spec, causal=causal, kv_heads=2)
    x = torch.randn(2, 75, 32, requires_grad=True)
    y = layer(x)
    want = naive_attention_layer(layer, x, causal)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=0)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx_want,) = torch.autograd.grad(want, x, g)
    torch.testing.assert_close(gx, gx_want, atol=1e-5, rtol=0)
    assert float(layer.aux_loss) == 0.0


def test_key_padding_and_layout_cache():
    torch.manual_seed(1)
    layer = spattn.nn.Attention(dim=16, heads=2, attention="window(size=5, block=8)")
    x = torch.randn(3, 40, 16)
    kpm = torch.ones(3, 40, dtype=torch.bool)
    kpm[1, 30:] = False
    y = layer(x, key_padding_mask=kpm)
    torch.testing.assert_close(y, naive_attention_layer(layer, x, False, kpm), atol=1e-5, rtol=0)
    layer(x)
    assert len(layer._layouts) == 1  # the static layout was reused
    layer(x[:, :33])
    assert len(layer._layouts) == 2


def test_state_dict_round_trip_and_repr():
    layer = spattn.nn.Attention(dim=16, heads=4, attention="window(size=3)", causal=True)
    clone = spattn.nn.Attention(dim=16, heads=4, attention="window(size=3)", causal=True)
    clone.load_state_dict(layer.state_dict())
    x = torch.randn(1, 20, 16)
    torch.testing.assert_close(layer(x), clone(x))
    assert "window(size=3" in repr(layer)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dim=0, heads=2), "dim must be a positive int"),
        (dict(dim=16, heads=3), "divisible by heads"),
        (dict(dim=16, heads=4, kv_heads=3), "kv_heads must be a positive divisor"),
        (dict(dim=16, heads=4, dropout=1.5), "dropout must lie in"),
        (dict(dim=16, heads=4, backend="cuda"), "backend must be one of"),
        (dict(dim=16, heads=4, attention="nope"), "unknown attention mechanism"),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        spattn.nn.Attention(**kwargs)


def test_bad_forward_input():
    layer = spattn.nn.Attention(dim=16, heads=4)
    with pytest.raises(ValueError, match=r"x must have shape \[B, N, 16\]"):
        layer(torch.randn(2, 10, 8))
