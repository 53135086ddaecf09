"""sparsify() is faithful to each architecture's own attention (issue 15).

Tiny random-init models of eleven architectures (no downloads): Llama, Mistral (sliding window),
Qwen2 (sliding window on some layers), Qwen3, Gemma 2 (softcap, alternating sliding/full), Gemma 3
(mixed sliding/full), GPT-OSS (learned sinks, sliding/full), Phi-3 (sliding window), GPT-NeoX, OPT,
GPT-2. Prompts shorter and longer than the window (16 tokens); the model's own eager attention is
the reference.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install 'spattn[hf]')")
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import spattn  # noqa: E402
from spattn.integrations import hf  # noqa: E402
from spattn.kernels.reference import reference_attention  # noqa: E402
from spattn.layout import Layout  # noqa: E402

W = 16  # sliding window of every windowed tiny model
SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SIZES),
    "mistral": lambda: transformers.MistralConfig(sliding_window=W, **SIZES),
    "qwen2": lambda: transformers.Qwen2Config(use_sliding_window=True, sliding_window=W, max_window_layers=1, **SIZES),
    "qwen3": lambda: transformers.Qwen3Config(head_dim=16, **SIZES),
    "gemma2": lambda: transformers.Gemma2Config(head_dim=16, sliding_window=W, attn_logit_softcapping=2.0, **SIZES),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        head_dim=16, sliding_window=W, layer_types=["sliding_attention", "full_attention"], **SIZES
    ),
    "gpt_oss": lambda: transformers.GptOssConfig(
        head_dim=16, sliding_window=W, num_local_experts=4, num_experts_per_tok=2, **SIZES
    ),
    "phi3": lambda: transformers.Phi3Config(sliding_window=W, pad_token_id=0, **SIZES),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128
    ),
    "opt": lambda: transformers.OPTConfig(
        hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128, word_embed_proj_dim=64
    ),
    "gpt2": lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128),
}
#: layers with a sliding window (layer index -> window) per architecture
SLIDING = {"mistral": [0, 1], "qwen2": [1], "gemma2": [0], "gemma3": [0], "gpt_oss": [0], "phi3": [0, 1]}


def _model(name: str, attn: str = "eager"):
    torch.manual_seed(0)
    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # tiny vocabularies: bos/eos ids outside them are irrelevant here
    try:
        model = AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation=attn).eval()
    finally:
        hf_logging.set_verbosity(old)
    with torch.no_grad():
        for module in model.modules():
            if name == "gemma2" and hasattr(module, "q_proj"):
                module.q_proj.weight.mul_(25.0)  # large scores: the softcap of 2 changes the result
                module.k_proj.weight.mul_(25.0)
            if isinstance(getattr(module, "sinks", None), torch.Tensor):
                module.sinks.normal_(0.0, 2.0)  # sinks of the size that matters (the issue: 3.0)
    return model


@pytest.fixture(scope="module")
def models():
    return {name: _model(name) for name in CONFIGS}


def _ids(n: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def _padding(batch: int, n: int) -> torch.Tensor:
    mask = torch.ones(batch, n, dtype=torch.long)
    mask[0, :3] = 0  # left padding in the first row
    return mask


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [
            (m.config, m.config._attn_implementation_internal)
            for m in model.modules()
            if isinstance(m, transformers.PreTrainedModel)
        ],
    )


def _assert_restored(model, snapshot):
    state, impls = snapshot
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert all(config._attn_implementation_internal == impl for config, impl in impls)


# ------------------------------------------------------------------------ the reproduction
@torch.no_grad()
def test_mistral_window_64_with_65_tokens():
    """Issue 15: any call past the window raised 'custom attention mask', even prefill='dense'."""
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(sliding_window=64, **SIZES)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    ids = _ids(65, batch=1)
    want = model(ids).logits
    with hf.sparsify(model, prefill="dense") as handle:
        got = model(ids).logits
    assert (got - want).abs().max() <= 1e-5
    assert handle.density("prefill") == 1.0  # the baseline is the layer's own windowed attention


@pytest.mark.parametrize(
    "nq, nk, window", [(65, 65, 64), (1, 80, 16), (5, 9, 3), (7, 7, 100), (40, 40, 16), (3, 50, 1)]
)
def test_dense_pair_count_with_window(nq, nk, window):
    want = int(_window_mask(nq, nk, window).sum())
    assert hf._causal_pairs(nq, nk, True, window) == want


# ------------------------------------------------------------------------ dense equals the model
@torch.no_grad()
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("n", [10, 40])
def test_dense_equals_own_attention(models, name, n):
    """prefill='dense' (and None) gives the model's own eager logits, with left padding, before and past
    the window; the model is restored bit-exactly."""
    model = models[name]
    ids, mask = _ids(n), _padding(2, n)
    want = model(ids, attention_mask=mask).logits
    snapshot = _snapshot(model)
    for prefill in ("dense", None):
        with hf.sparsify(model, prefill=prefill):
            got = model(ids, attention_mask=mask).logits
        assert (got[0, 3:] - want[0, 3:]).abs().max() <= 1e-5, prefill
        assert (got[1] - want[1]).abs().max() <= 1e-5, prefill
    _assert_restored(model, snapshot)


@contextlib.contextmanager
def _swapped(model, attribute: str, value):
    """Temporarily set ``attribute`` of every attention module (to show a feature changes the result)."""
    saved = []
    for m in model.modules():
        if getattr(m, attribute, None) is not None:
            saved.append((m, getattr(m, attribute)))
            setattr(m, attribute, value(getattr(m, attribute)))
    try:
        yield
    finally:
        for m, old in saved:
            setattr(m, attribute, old)


@torch.no_grad()
@pytest.mark.parametrize(
    "name, attribute, value",
    [
        ("gemma2", "attn_logit_softcapping", lambda old: None),
        ("gpt_oss", "sinks", lambda old: torch.nn.Parameter(torch.full_like(old, -1e4))),
    ],
)
def test_softcap_and_sinks_matter_here(models, name, attribute, value):
    """The features the dense test honours change these models' logits (so the test can fail)."""
    model, ids = models[name], _ids(40)
    want = model(ids).logits
    with _swapped(model, attribute, value):
        without = model(ids).logits
    assert (want - without).abs().max() > 1e-2


@torch.no_grad()
def test_sdpa_models_match_too(models):
    """Against sdpa as well (the implementation most models run by default)."""
    for name in ("mistral", "qwen2", "phi3"):
        model = _model(name, attn="sdpa")
        ids = _ids(40)
        want = model(ids).logits
        with hf.sparsify(model):
            got = model(ids).logits
        assert (got - want).abs().max() <= 1e-5, name


# ------------------------------------------------------------------------ generate with sparse attention
def _generate(model, ids, steps):
    out = model.generate(
        ids,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences, torch.stack(out.logits, 1)


@torch.no_grad()
@pytest.mark.parametrize("name", sorted(SLIDING))
def test_window_pattern_on_sliding_layers_is_exact_through_generate(models, name):
    """On the sliding layers, a pattern containing the window (a causal window of W-1) intersected with
    the layer's own window is the window: prefill and decode past the window (the KV cache of a
    sliding-window layer keeps only the last keys) give the model's own greedy tokens and logits."""
    model = models[name]
    ids = _ids(30, batch=1)
    want_seq, want_logits = _generate(model, ids, 8)
    spec = f"window(size={W - 1}, block=8)"
    with hf.sparsify(model, prefill=spec, decode=spec, layers=SLIDING[name]):
        got_seq, got_logits = _generate(model, ids, 8)
    assert torch.equal(got_seq, want_seq)
    assert (got_logits - want_logits).abs().max() <= 1e-4


@torch.no_grad()
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sparse_prefill_and_quest_decode_through_generate(models, name):
    """A sparse prefill and Quest decoding run through generate() past the window; both are sparse."""
    model = models[name]
    snapshot = _snapshot(model)
    ids = _ids(40, batch=1)
    with hf.sparsify(model, prefill="window(size=7, block=8)", decode="quest(page=4, budget=8, min_pages=1)") as h:
        seq, logits = _generate(model, ids, 10)
    assert seq.shape == (1, 50) and torch.isfinite(logits).all()
    assert h.density("prefill") < 0.7 and h.density("decode") < 0.7  # of the layers' own (windowed) attention
    _assert_restored(model, snapshot)


# ------------------------------------------------------------------------ the intersection, brute force
def _window_mask(nq: int, nk: int, window: int) -> torch.Tensor:
    pos = torch.arange(nq)[:, None] + nk - nq
    j = torch.arange(nk)[None, :]
    return (j <= pos) & (j > pos - window)


@torch.no_grad()
@pytest.mark.parametrize(
    "spec", ["xattention(threshold=0.6, stride=4, block=8)", "topk(k=5)", "a_shape(sinks=4, local=8, block=8)"]
)
def test_window_and_pattern_intersection_brute_force(models, spec):
    """The attention function on a sliding layer computes exactly pattern ∩ window (softcap included)."""
    model = models["gemma2"]
    module = hf._attention_modules(model)[0]
    gen = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(1, 4, 37, 16, generator=gen) * 3,
        torch.randn(1, 2, 37, 16, generator=gen) * 3,
        torch.randn(1, 2, 37, 16, generator=gen),
    )
    with hf.sparsify(model, prefill=spec):
        out, _ = hf._spattn_attention_forward(module, q, k, v, None, scaling=0.25, sliding_window=W, softcap=2.0)
    sel = spattn.pattern(spec).select(q, k, causal=True)
    allowed = sel.to_dense() & _window_mask(37, 37, W)
    want = reference_attention(
        q.double(), k.double(), v.double(), Layout.from_dense(allowed, 8), scale=0.25, softcap=2.0
    )
    assert (out.transpose(1, 2).double() - want).abs().max() <= 1e-5


@torch.no_grad()
def test_decode_selector_chooses_inside_the_window(models):
    """One query against a cache longer than the window (a full, non-sliding cache): the selector
    chooses among the keys inside the window, with sinks entering the denominator."""
    model = models["gpt_oss"]
    module = hf._attention_modules(model)[0]
    gen = torch.Generator().manual_seed(2)
    q, k, v = (
        torch.randn(1, 4, 1, 16, generator=gen),
        torch.randn(1, 2, 50, 16, generator=gen),
        torch.randn(1, 2, 50, 16, generator=gen),
    )
    quest = "quest(page=4, budget=8, min_pages=1)"
    with hf.sparsify(model, decode=quest):
        out, _ = hf._spattn_attention_forward(module, q, k, v, None, scaling=0.25, sliding_window=W, s_aux=module.sinks)
    kw, vw = k[:, :, -W:], v[:, :, -W:]
    o, lse = spattn.attention(
        q, kw, vw, spattn.pattern(quest).select(q, kw), scale=0.25, backend="reference", return_lse=True
    )
    want = o * torch.sigmoid(lse - module.sinks[None, :, None])[..., None]
    assert (out.transpose(1, 2) - want).abs().max() <= 1e-6


# ------------------------------------------------------------------------ clear errors at sparsify()
class _Shouting(torch.nn.Module):
    """An attention module whose call passes a keyword spattn does not implement."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.layer_idx, self.is_causal, self.config = inner, inner.layer_idx, True, inner.config

    def forward(self, hidden_states, *args, **kwargs):
        attention_interface = None
        return attention_interface(self, hidden_states, hidden_states, hidden_states, None, alibi_slopes=1.0)


def test_unknown_keyword_rejected_at_sparsify():
    model = _model("llama")
    model.model.layers[1].self_attn = _Shouting(model.model.layers[1].self_attn)
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"layer 1 .*alibi_slopes"):
        hf.sparsify(model)
    _assert_restored(model, snapshot)


@torch.no_grad()
def test_unknown_keyword_at_call_raises_naming_layer(models):
    model = models["llama"]
    with hf.sparsify(model):
        with pytest.raises(ValueError, match=r"layer 0 .*'made_up_flag'"):
            model(_ids(8), made_up_flag=True)


def test_unsupported_configurations_rejected_before_any_change(models):
    cross = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, add_cross_attention=True)
    with pytest.raises(ValueError, match="cross-attention"):
        hf.sparsify(AutoModelForCausalLM.from_config(cross))
    bidirectional = transformers.Gemma3TextConfig(
        head_dim=16, sliding_window=W, use_bidirectional_attention=True, **SIZES
    )
    with pytest.raises(ValueError, match="bidirectional sliding"):
        hf.sparsify(AutoModelForCausalLM.from_config(bidirectional))
    for name, kwargs, match in [
        ("gemma2", dict(prefill="routing(clusters=2)"), r"layer 0 has \['sliding_window', 'softcap'\]"),
        ("gpt_oss", dict(decode="routing(clusters=2)", layers=[1]), r"layer 1 has \['sinks'\]"),
        ("mistral", dict(decode="tidal(budget=8, select_layers=(0,))"), "layer 0 has a sliding window"),
    ]:
        model = models[name]
        snapshot = _snapshot(model)
        with pytest.raises(ValueError, match=match):
            hf.sparsify(model, **kwargs)
        _assert_restored(model, snapshot)


def test_layers_outside_the_sparse_set_skip_sparse_only_checks(models):
    """Kept-dense layers never meet a sparse-only check, and still honour their own window."""
    hf.sparsify(models["gemma2"], prefill="routing(clusters=2)", dense_layers=2).undo()
    hf.sparsify(models["gemma3"], decode="tidal(budget=8, select_layers=(1,))", layers=[1]).undo()
    model = models["gemma3"]
    ids = _ids(40)
    with torch.no_grad():
        want = model(ids).logits
        with hf.sparsify(model, prefill="window(size=7, block=8)", layers=[1]):
            got_sparse_full_layer = model(ids).logits
        with hf.sparsify(model, prefill="window(size=7, block=8)", dense_layers=[0, 1]):
            got_all_dense = model(ids).logits
    assert (got_all_dense - want).abs().max() <= 1e-5
    assert (got_sparse_full_layer - want).abs().max() > 1e-4  # the full layer did change


@torch.no_grad()
@pytest.mark.parametrize("options", [dict(heads=[0, 2]), dict(dense_tail=5), dict(heads=[1], dense_tail=3)])
def test_heads_and_dense_tail_keep_sinks_and_window(models, options):
    """Split calls (some heads sparse, the last rows dense) reassemble the log-sum-exp the sinks need:
    a pattern containing the window on GPT-OSS's sliding layer is still the model's own attention."""
    model = models["gpt_oss"]
    ids = _ids(40)
    want = model(ids).logits
    with hf.sparsify(model, prefill=f"window(size={W - 1}, block=8)", layers=[0], **options):
        got = model(ids).logits
    assert (got - want).abs().max() <= 1e-5


class _ByName(torch.nn.Module):
    """Passes the mask by name and flash-only packing keywords (None unless packed): allowed up front."""

    def forward(self, q, k, v, mask, **kwargs):
        attention_interface = None
        return attention_interface(self, q, k, v, attention_mask=mask, dropout=0.0, cu_seq_lens_q=None, **kwargs)


def test_keywords_passed_by_name_are_understood():
    names, extra_positional = hf._interface_keywords(_ByName)
    assert names == {"attention_mask", "dropout", "cu_seq_lens_q"} and not extra_positional
    model = _model("llama")
    model.model.layers[0].self_attn.__class__ = type(
        "ByNameAttention", (type(model.model.layers[0].self_attn),), {"forward": _ByName.forward}
    )
    hf.sparsify(model).undo()  # nothing in it that spattn does not implement
