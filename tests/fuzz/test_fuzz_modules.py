"""Fuzz: bad inputs to the nn layers, spattn.models.build_model and the models' forward."""

from __future__ import annotations

import math

import pytest
import torch

import spattn
from spattn.models import ModelConfig, build_model
from spattn.nn import Attention, RoutingAttention, SeqBoat, SparseQueryAttention, TransformerBlock, build_mechanism
from spattn.nn.ema import MultiHeadEMA
from spattn.nn.positions import LearnedPositions, rotary_tables

from ._table import Bad, check, params

VE, TE = ValueError, TypeError
EITHER = (ValueError, TypeError)
X = torch.randn(2, 8, 16)


def attn(*args, **kw):
    return lambda: Attention(*args, **kw)


def fwd(module, *args, **kw):
    return lambda: module(*args, **kw)


LAYER = Attention(16, 2)
WIN = Attention(16, 2, "window(size=2)")
PERF = Attention(16, 2, "performer(features=8)")
LINF = Attention(16, 2, "linformer(k=4)", max_len=16)
BLOCK = TransformerBlock(16, 2, "window(size=2)")
SQA = SparseQueryAttention(16, 2)
EMA = MultiHeadEMA(16, 4)

NN = [
    Bad("attn-dim-zero", attn(0, 2), VE, "dim"),
    Bad("attn-dim-float", attn(16.0, 2), VE, "dim"),
    Bad("attn-dim-str", attn("16", 2), VE, "dim"),
    Bad("attn-heads-neg", attn(16, -2), VE, "heads"),
    Bad("attn-heads-bool", attn(16, True), VE, "heads"),
    Bad("attn-dim-not-divisible", attn(15, 2), VE, "dim=15"),
    Bad("attn-kv-heads-3", attn(16, 2, kv_heads=3), VE, "kv_heads"),
    Bad("attn-kv-heads-0", attn(16, 2, kv_heads=0), VE, "kv_heads"),
    Bad("attn-kv-heads-float", attn(16, 2, kv_heads=1.0), VE, "kv_heads"),
    Bad("attn-head-dim-0", attn(16, 2, head_dim=0), VE, "head_dim"),
    Bad("attn-head-dim-str", attn(16, 2, head_dim="8"), EITHER, "head_dim"),
    Bad("attn-dropout-1", attn(16, 2, dropout=1.0), VE, "dropout"),
    Bad("attn-dropout-neg", attn(16, 2, dropout=-0.1), VE, "dropout"),
    Bad("attn-dropout-nan", attn(16, 2, dropout=math.nan), VE, "dropout"),
    Bad("attn-dropout-str", attn(16, 2, dropout="0.1"), EITHER, "dropout"),
    Bad("attn-backend", attn(16, 2, backend="gpu"), VE, "backend"),
    Bad("attn-causal-int", attn(16, 2, causal=1), TE, "causal"),
    Bad("attn-max-len-0", attn(16, 2, max_len=0), VE, "max_len"),
    Bad("attn-max-len-float", attn(16, 2, max_len=8.0), VE, "max_len"),
    Bad("attn-bias-str", attn(16, 2, bias="no"), TE, "bias"),
    Bad("attn-spec-int", attn(16, 2, 5), TE, "attention"),
    Bad("attn-spec-unknown", attn(16, 2, "nope"), VE, "unknown attention mechanism 'nope'"),
    Bad("attn-spec-param", attn(16, 2, "window(size=-1)"), VE, "size"),
    Bad("attn-spec-kwarg", attn(16, 2, "window(width=3)"), VE, "width"),
    Bad("attn-noncausal-approx", attn(16, 2, "linformer(k=4)", max_len=16, causal=True), VE, "causal"),
    Bad("attn-linformer-no-max-len", attn(16, 2, "linformer(k=4)"), VE, "max_len"),
    Bad("attn-x-2d", fwd(LAYER, X[0]), VE, "x"),
    Bad("attn-x-dim", fwd(LAYER, torch.randn(2, 8, 15)), VE, "x"),
    Bad("attn-x-list", fwd(LAYER, [[0.0] * 16]), VE, "x"),
    Bad("attn-x-int", fwd(LAYER, X.long()), EITHER, "x"),
    Bad("attn-kpm-shape", fwd(LAYER, X, torch.ones(2, 7, dtype=torch.bool)), VE, "key_padding_mask"),
    Bad("attn-kpm-float", fwd(WIN, X, torch.ones(2, 8)), TE, "key_padding_mask"),
    Bad("perf-kpm-float", fwd(PERF, X, torch.ones(2, 8)), EITHER, "key_padding_mask"),
    Bad("perf-kpm-shape", fwd(PERF, X, torch.ones(8, 2, dtype=torch.bool)), VE, "key_padding_mask"),
    Bad("linformer-too-long", fwd(LINF, torch.randn(1, 20, 16)), VE, "max_len"),
    Bad("block-mlp-ratio-neg", lambda: TransformerBlock(16, 2, mlp_ratio=-1), VE, "mlp_ratio"),
    Bad("block-mlp-ratio-str", lambda: TransformerBlock(16, 2, mlp_ratio="4"), EITHER, "mlp_ratio"),
    Bad("block-mlp-ratio-nan", lambda: TransformerBlock(16, 2, mlp_ratio=math.nan), VE, "mlp_ratio"),
    Bad("block-dropout-str", lambda: TransformerBlock(16, 2, dropout="0"), EITHER, "dropout"),
    Bad("block-dropout-2", lambda: TransformerBlock(16, 2, dropout=2.0), VE, "dropout"),
    Bad("block-rope-no-len", lambda: TransformerBlock(16, 2, rope=True), VE, "max_len"),
    Bad("block-rope-int", lambda: TransformerBlock(16, 2, rope=1, max_len=8), TE, "rope"),
    Bad("block-rope-odd", lambda: TransformerBlock(6, 2, rope=True, max_len=8), VE, "head"),
    Bad("block-rope-layer", lambda: TransformerBlock(16, 2, "sqa", rope=True, max_len=8), VE, "RoPE"),
    Bad("block-x-2d", fwd(BLOCK, X[0]), VE, "x"),
    Bad("block-kpm", fwd(BLOCK, X, torch.ones(2, 8)), TE, "key_padding_mask"),
    Bad("sqa-variant", lambda: SparseQueryAttention(16, 2, variant="fast"), VE, "variant"),
    Bad("sqa-query-heads", lambda: SparseQueryAttention(16, 2, query_heads=4), VE, "query_heads"),
    Bad("sqa-kv-heads", lambda: SparseQueryAttention(16, 4, query_heads=4, key_value_heads=3), VE, "key_value_heads"),
    Bad("sqa-pattern", lambda: SparseQueryAttention(16, 2, pattern="nope"), VE, "pattern"),
    Bad("sqa-pattern-approx", lambda: SparseQueryAttention(16, 2, pattern="performer"), VE, "pattern"),
    Bad("sqa-x", fwd(SQA, X[..., :8]), VE, "x"),
    Bad("routing-dim", lambda: RoutingAttention(0, 2), VE, "dim"),
    Bad("routing-local-heads", lambda: RoutingAttention(16, 2, local_heads=3), VE, "local_heads"),
    Bad("routing-window", lambda: RoutingAttention(16, 2, window=-1), VE, "window"),
    Bad("routing-share-qk", lambda: RoutingAttention(16, 2, share_qk="yes"), TE, "share_qk"),
    Bad("routing-x", fwd(RoutingAttention(16, 2, window=4), X[0]), VE, "x"),
    Bad("seqboat-dim", lambda: SeqBoat(dim=0), EITHER, "dim"),
    Bad("seqboat-x", fwd(SeqBoat(dim=16, max_len=16), X[..., :8]), VE, "x"),
    Bad("ema-dim", lambda: MultiHeadEMA(0), VE, "dim"),
    Bad("ema-ndim", lambda: MultiHeadEMA(16, ndim=1.5), VE, "ndim"),
    Bad("ema-bidirectional", lambda: MultiHeadEMA(16, bidirectional="yes"), TE, "bidirectional"),
    Bad("ema-x", fwd(EMA, X[..., :8]), VE, "x"),
    Bad("ema-mask", fwd(EMA, X, torch.ones(2, 7, dtype=torch.bool)), VE, "padding_mask"),
    Bad("routing-x-int", fwd(RoutingAttention(16, 2, window=4), X.long()), TE, "x"),
    Bad(
        "routing-kpm-shape",
        fwd(RoutingAttention(16, 2, window=4), X, torch.ones(2, 7, dtype=torch.bool)),
        VE,
        "key_padding_mask",
    ),
    Bad("seqboat-kpm-float", fwd(SeqBoat(dim=16, max_len=16), X, torch.ones(2, 8)), TE, "key_padding_mask"),
    Bad("sqa-x-int", fwd(SQA, X.long()), TE, "x"),
    Bad("sqa-kpm-float", fwd(SQA, X, torch.ones(2, 8)), TE, "key_padding_mask"),
    Bad("positions-max-len-0", lambda: LearnedPositions(0, 16), VE, "max_len"),
    Bad("positions-too-long", fwd(LearnedPositions(4, 16), X), VE, "max_len"),
    Bad("rotary-odd-head-dim", lambda: rotary_tables(8, 5), VE, "head_dim"),
    Bad("rotary-negative-n", lambda: rotary_tables(-1, 4), VE, "n must be"),
    Bad("block-rope-too-long", fwd(TransformerBlock(16, 2, rope=True, max_len=4), X), VE, "max_len"),
    Bad("attn-x-empty-n", fwd(WIN, X[:, :0]), VE, "x"),
    Bad("attn-x-empty-batch", fwd(WIN, X[:0]), VE, "x"),
    Bad("block-x-empty", fwd(BLOCK, X[:, :0]), VE, "x"),
    Bad("ema-recurrent-state", lambda: EMA.recurrent(X, torch.zeros(3, 3)), VE, "state"),
    Bad(
        "ema-recurrent-bidirectional", lambda: MultiHeadEMA(16, 4, bidirectional=True).recurrent(X), VE, "bidirectional"
    ),
    Bad("build-mech-context", lambda: build_mechanism("dense", width=3), VE, "context"),
    Bad("build-mech-int", lambda: build_mechanism(3), TE, "attention"),
    Bad("build-mech-unknown", lambda: build_mechanism("nope(x=1)"), VE, "nope"),
]


def model(**kw):
    return lambda: build_model(ModelConfig(**kw))


CLS = build_model(ModelConfig(vocab_size=20, num_classes=3, dim=16, heads=2, depth=1, max_len=16))
LM = build_model(ModelConfig(kind="lm", vocab_size=20, dim=16, heads=2, depth=1, max_len=16))
RET = build_model(ModelConfig(kind="retrieval", vocab_size=20, dim=16, heads=2, depth=1, max_len=16))
TOKENS = torch.randint(0, 20, (2, 8))

MODELS = [
    Bad("cfg-type", lambda: build_model("classifier"), TE, "ModelConfig"),
    Bad("cfg-dict-unknown", lambda: build_model({"kind": "lm", "width": 3}), VE, "width"),
    Bad("cfg-kind", model(kind="regressor"), VE, "kind"),
    Bad("cfg-kind-int", model(kind=3), VE, "kind"),
    Bad("cfg-positions", model(positions="sinusoidal"), VE, "positions"),
    Bad("cfg-pool", model(pool="max"), VE, "pool"),
    Bad("cfg-attention-int", model(attention=3), VE, "attention"),
    Bad("cfg-attention-empty", model(attention=" "), VE, "attention"),
    Bad("cfg-attention-unknown", model(attention="nope"), VE, "attention"),
    Bad("cfg-attention-param", model(attention="window(size=-2)"), VE, "size"),
    Bad("cfg-vocab-0", model(vocab_size=0), VE, "vocab_size"),
    Bad("cfg-vocab-str", model(vocab_size="256"), EITHER, "vocab_size"),
    Bad("cfg-num-classes-0", model(num_classes=0), VE, "num_classes"),
    Bad("cfg-num-classes-float", model(num_classes=2.0), EITHER, "num_classes"),
    Bad("cfg-dim-neg", model(dim=-64), VE, "dim"),
    Bad("cfg-depth-0", model(depth=0), VE, "depth"),
    Bad("cfg-depth-float", model(depth=2.5), EITHER, "depth"),
    Bad("cfg-heads-0", model(heads=0), VE, "heads"),
    Bad("cfg-kv-heads", model(kv_heads=3), VE, "kv_heads"),
    Bad("cfg-max-len-0", model(max_len=0), VE, "max_len"),
    Bad("cfg-max-len-none", model(max_len=None), EITHER, "max_len"),
    Bad("cfg-mlp-ratio-neg", model(mlp_ratio=-2.0), VE, "mlp_ratio"),
    Bad("cfg-dropout-2", model(dropout=2.0), VE, "dropout"),
    Bad("cfg-attn-dropout-neg", model(attn_dropout=-0.5), VE, "attn_dropout"),
    Bad("cfg-embed-dropout-1", model(embed_dropout=1.0), VE, "embed_dropout"),
    Bad("cfg-embed-dropout-str", model(embed_dropout="0"), EITHER, "embed_dropout"),
    Bad("cfg-head-hidden-neg", model(head_hidden=-1), VE, "head_hidden"),
    Bad("cfg-head-hidden-float", model(head_hidden=1.5), EITHER, "head_hidden"),
    Bad("cfg-backend", model(backend="tpu"), VE, "backend"),
    Bad("cfg-short-conv-neg", model(short_conv=-1), VE, "short_conv"),
    Bad("cfg-dim-heads", model(dim=30, heads=4), VE, "dim=30"),
    Bad("cfg-from-dict-type", lambda: ModelConfig.from_dict(["kind"]), TE, "ModelConfig"),
    Bad("cls-tokens-float", fwd(CLS, TOKENS.float()), VE, "tokens"),
    Bad("cls-tokens-1d", fwd(CLS, TOKENS[0]), VE, "tokens"),
    Bad("cls-tokens-long", fwd(CLS, torch.randint(0, 20, (2, 40))), VE, "max_len"),
    Bad("cls-tokens-vocab", fwd(CLS, TOKENS + 100), VE, "tokens"),
    Bad("cls-tokens-neg", fwd(CLS, TOKENS - 100), VE, "tokens"),
    Bad("cls-mask-shape", fwd(CLS, TOKENS, torch.ones(2, 7, dtype=torch.bool)), VE, "mask"),
    Bad("cls-mask-float", fwd(CLS, TOKENS, torch.ones(2, 8)), VE, "mask"),
    Bad("cls-tokens-list", fwd(CLS, [[1, 2]]), VE, "tokens"),
    Bad("cls-tokens-empty", fwd(CLS, TOKENS[:, :0]), VE, "tokens"),
    Bad("lm-tokens-batch0", fwd(LM, TOKENS[:0]), VE, "tokens"),
    Bad("lm-tokens-vocab", fwd(LM, TOKENS + 20), VE, "tokens"),
    Bad("lm-tokens-3d", fwd(LM, TOKENS[None]), VE, "tokens"),
    Bad("ret-tokens2-missing", fwd(RET, TOKENS, None, None), VE, "tokens2"),
    Bad("ret-tokens2-float", fwd(RET, TOKENS, None, TOKENS.float()), VE, "tokens"),
    Bad("ret-batch", fwd(RET, TOKENS, None, TOKENS[:1]), VE, "batch"),
]


@pytest.mark.parametrize("row", params(NN))
def test_nn_rejects(row):
    check(row)


@pytest.mark.parametrize("row", params(MODELS))
def test_models_reject(row):
    check(row)


def test_spattn_nn_all_entry_points_covered():
    names = {r.id.split("-")[0] for r in NN}
    assert {"attn", "block", "sqa", "routing", "seqboat", "ema", "build", "positions", "rotary"} <= names
    assert set(spattn.nn.__all__) <= {
        "Attention",
        "build_mechanism",
        "TransformerBlock",
        "MLP",
        "RoutingAttention",
        "SeqBoat",
        "SparseQueryAttention",
    }


# ------------------------------------------------------------------ approximations called directly (generated rows)


def _approx_rows():
    from spattn import registry
    from spattn.approx.base import ApproxAttention

    q, k, v = torch.randn(1, 2, 16, 16), torch.randn(1, 2, 16, 16), torch.randn(1, 2, 16, 16)
    cases = {
        "q-3d": (lambda m: m(q[0], k, v), "q"),
        "int-inputs": (lambda m: m(q.long(), k.long(), v.long()), "q"),
        "v-length": (lambda m: m(q, k, v[:, :, :8]), "v"),
        "k-head-dim": (lambda m: m(q, k[..., :8], v[..., :8]), "k"),
        "gqa-heads": (lambda m: m(torch.randn(1, 3, 16, 16), k, v), "heads"),
        "kpm-float": (lambda m: m(q, k, v, key_padding_mask=torch.ones(1, 16)), "key_padding_mask"),
        "kpm-shape": (lambda m: m(q, k, v, key_padding_mask=torch.ones(1, 15, dtype=torch.bool)), "key_padding_mask"),
        "batch": (lambda m: m(q, torch.randn(2, 2, 16, 16), torch.randn(2, 2, 16, 16)), "batch"),
        "q-list": (lambda m: m([1.0], k, v), "q"),
        "causal-int": (lambda m: m(q, k, v, causal=1), "causal"),
        "dtype-mix": (lambda m: m(q.double(), k, v), "dtype"),
    }
    not_mine = {("scatterbrain", "causal-int"), ("sea", "causal-int")}  # approx/mixed.py, sea.py: owned elsewhere
    rows = []
    for mech in registry.mechanisms():
        if mech.kind not in ("approximation", "hybrid") and mech.name != "drsformer_topk":
            continue
        obj = build_mechanism(mech.name, dim=32, heads=2, kv_heads=2, head_dim=16, causal=False, max_len=512)
        if not isinstance(obj, ApproxAttention):
            continue
        for case, (call, fragment) in cases.items():
            if (mech.name, case) in not_mine:
                continue
            rows.append(Bad(f"{mech.name}-{case}", (lambda call=call, obj=obj: call(obj)), EITHER, fragment))
    return rows


APPROX = _approx_rows()


@pytest.mark.parametrize("row", params(APPROX))
def test_approximations_reject(row):
    check(row)
