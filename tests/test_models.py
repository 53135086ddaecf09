"""Models: block, positions, classifier / LM / two-tower on registered attentions; masks; clear errors."""

import pytest
import torch

from spattn.models import CausalLM, ModelConfig, SequenceClassifier, TwoTowerClassifier, build_model
from spattn.nn.block import TransformerBlock
from spattn.nn.positions import RotaryProjection, apply_rotary, rotary_tables

ATTENTIONS = ["dense", "window(size=3)", "bigbird(block=8)"]


def small(kind="classifier", **kw):
    base = dict(kind=kind, vocab_size=11, num_classes=3, dim=16, depth=2, heads=2, max_len=40)
    base.update(kw)
    return build_model(ModelConfig(**base))


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("positions", ["learned", "rope", "none"])
def test_shapes_and_backward(attention, positions):
    torch.manual_seed(0)
    t = torch.randint(0, 11, (2, 30))
    for kind, shape in (("classifier", (2, 3)), ("lm", (2, 30, 11))):
        m = small(kind, attention=attention, positions=positions)
        out = m(t)
        assert out.shape == shape
        out.sum().backward()
        assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    r = small("retrieval", attention=attention, positions=positions)
    assert r(t, None, t.flip(1), None).shape == (2, 3)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_padding_does_not_change_the_prediction(pool):
    """Appending padding tokens (any ids) leaves the logits of a non-causal classifier unchanged."""
    torch.manual_seed(0)
    m = small(pool=pool, attention="dense").eval()
    t = torch.randint(0, 11, (2, 20))
    padded = torch.cat([t, torch.randint(0, 11, (2, 9))], dim=1)
    mask = torch.zeros(2, 29, dtype=torch.bool)
    mask[:, :20] = True
    torch.testing.assert_close(m(padded, mask), m(t), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("short_conv", [0, 3])
def test_causal_lm_is_causal(short_conv):
    torch.manual_seed(0)
    m = small("lm", attention="window(size=4)", short_conv=short_conv).eval()
    t = torch.randint(0, 11, (1, 24))
    t2 = t.clone()
    t2[0, 15:] = (t2[0, 15:] + 1) % 11
    a, b = m(t), m(t2)
    torch.testing.assert_close(a[:, :15], b[:, :15])
    assert not torch.allclose(a[:, 15:], b[:, 15:])


def test_window_limits_receptive_field():
    """With a window of 1 and one layer, position 10 of a (non-causal) encoder ignores position 0."""
    torch.manual_seed(0)
    blk = TransformerBlock(16, 2, "window(size=1)").eval()
    x = torch.randn(1, 20, 16)
    y = x.clone()
    y[0, 0] = torch.randn(16)  # (a constant shift would vanish in the LayerNorm)
    torch.testing.assert_close(blk(x)[0, 10], blk(y)[0, 10])
    assert not torch.allclose(blk(x)[0, 1], blk(y)[0, 1])


def test_rope_is_relative():
    """RoPE: <R(t)q, R(s)k> depends on t - s only."""
    cos, sin = rotary_tables(32, 8)
    q, k = torch.randn(8), torch.randn(8)

    def rot(v, t):
        x = v.expand(1, 32, 1, 8)
        return apply_rotary(x, cos, sin)[0, t, 0]

    assert torch.allclose(rot(q, 5) @ rot(k, 2), rot(q, 13) @ rot(k, 10), atol=1e-5)
    assert torch.allclose(rot(q, 0), q)


def test_rope_projection_errors():
    with pytest.raises(ValueError, match="head_dim must be even"):
        RotaryProjection(torch.nn.Linear(6, 6), heads=2, max_len=8)
    with pytest.raises(ValueError, match="rope=True needs max_len"):
        TransformerBlock(16, 2, rope=True)


def test_block_without_mlp_and_aux_loss_sum():
    blk = TransformerBlock(16, 2, mlp_ratio=0)
    assert blk.mlp is None
    m = small("lm")
    m(torch.randint(0, 11, (1, 8)))
    assert m.aux_loss.shape == () and float(m.aux_loss) == 0.0


def test_aux_loss_is_summed_over_blocks():
    m = small("lm", depth=3)
    for blk in m.backbone.blocks:
        blk.use_sdpa = False
        blk.attn.forward_orig = blk.attn.forward
    vals = [0.5, 1.0, 2.0]
    for blk, v in zip(m.backbone.blocks, vals):

        def fwd(x, key_padding_mask=None, _a=blk.attn, _v=v):
            out = _a.forward_orig(x, key_padding_mask)
            _a.aux_loss = x.new_tensor(_v)
            return out

        blk.attn.forward = fwd
    m(torch.randint(0, 11, (1, 8)))
    assert float(m.aux_loss) == pytest.approx(3.5)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(attention="no_such"), "unknown attention mechanism 'no_such'"),
        (dict(attention="window(size=3"), "cannot parse"),
        (dict(kind="gan"), "kind must be one of"),
        (dict(positions="alibi"), "positions must be one of"),
        (dict(pool="max"), "pool must be one of"),
        (dict(num_classes=1), "num_classes must be an int >= 2"),
        (dict(dim=0), "dim must be a positive int"),
        (dict(mlp_ratio=-1.0), "mlp_ratio must be >= 0"),
        (dict(short_conv=-1), "short_conv must be an int >= 0"),
    ],
)
def test_bad_model_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        small(**kw)


def test_sequence_longer_than_positions():
    m = small(max_len=16)
    with pytest.raises(
        ValueError, match=r"sequence length 17 \(including 1 prepended token\(s\)\) exceeds the model's max_len=16"
    ):
        m(torch.randint(0, 11, (1, 16)))
    lm = small("lm", max_len=16, positions="rope")
    with pytest.raises(ValueError, match="exceeds the model's max_len=16"):
        lm(torch.randint(0, 11, (1, 17)))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        lm(torch.randint(0, 11, (1, 8)), torch.ones(1, 8))
    with pytest.raises(ValueError, match="tokens must be an int64 tensor"):
        lm(torch.randn(1, 8))


def test_from_dict_roundtrip_and_unknown_field():
    c = ModelConfig(kind="lm", attention="window(size=3)")
    assert ModelConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({"width": 3})
    assert isinstance(build_model(c.to_dict()), CausalLM)
    assert isinstance(small(), SequenceClassifier) and isinstance(small("retrieval"), TwoTowerClassifier)


@pytest.mark.parametrize("causal", [False, True])
def test_dense_sdpa_path_matches_the_spattn_kernel(causal):
    """The dense fast path (torch SDPA) equals the same block run through spattn.attention, with padding and GQA."""
    torch.manual_seed(0)
    blk = TransformerBlock(16, 4, "dense", kv_heads=2, causal=causal).eval()
    assert blk.use_sdpa
    x = torch.randn(2, 19, 16, dtype=torch.float64)
    blk = blk.double()
    mask = torch.ones(2, 19, dtype=torch.bool)
    mask[1, 11:] = False
    fast = blk(x, mask)
    blk.use_sdpa = False
    ref = blk(x, mask)
    torch.testing.assert_close(fast[mask], ref[mask], atol=1e-10, rtol=1e-10)


def test_short_conv_mixes_the_previous_tokens_only():
    """With attention limited to each token itself, position i depends on tokens i-K+1 .. i only."""
    torch.manual_seed(0)
    m = small("lm", attention="window(size=0)", short_conv=2, depth=1).eval()
    conv = next(mod for mod in m.modules() if isinstance(mod, torch.nn.Conv1d))
    assert conv.bias is None and not conv.weight.any()  # starts as the identity (x + 0)
    torch.nn.init.normal_(conv.weight)
    t = torch.randint(0, 11, (1, 12))
    base = m(t)
    for pos, changed in ((5, (5, 6)), (0, (0, 1))):
        t2 = t.clone()
        t2[0, pos] = (t2[0, pos] + 1) % 11
        diff = (m(t2) - base).abs().amax(-1)[0] > 0
        assert diff.nonzero().flatten().tolist() == list(changed)


def test_per_layer_attention_specs():
    """'spec; spec' gives each layer its own mechanism (e.g. a dense layer, then a content-based one)."""
    torch.manual_seed(0)
    m = small("lm", attention="window(size=4); topk(k=3)", depth=2)
    assert [b.attn.spec.split("(")[0] for b in m.backbone.blocks] == ["window", "topk"]
    assert m.backbone.attention_spec.startswith("window(size=4") and "; topk(k=3" in m.backbone.attention_spec
    t = torch.randint(0, 11, (2, 24))
    m(t).sum().backward()
    with pytest.raises(ValueError, match="needs 2 non-empty specs"):
        small("lm", attention="dense; dense; dense", depth=2)
    with pytest.raises(ValueError, match="bad attention"):
        small("lm", attention="dense; nosuch(k=1)", depth=2)
