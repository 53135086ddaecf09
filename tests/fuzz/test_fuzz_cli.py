"""Fuzz: the ``spattn`` command with bad arguments, and ``spattn.integrations.hf.sparsify`` with bad arguments.

Each bad command line must end with exit status 2 and exactly one error line on stderr naming the
argument (the last line; never a traceback, never a run that starts). Runs in-process
(``spattn.cli.main``), bounded in time.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import pytest

from spattn.cli import main

from ._table import Bad, check, time_limit


@dataclass(frozen=True)
class Cli:
    id: str
    argv: tuple
    fragment: str
    marks: tuple = ()


def c(id_, *argv, fragment, marks=()):
    return Cli(id_, tuple(argv), fragment, marks)


MQAR = ("train", "mqar")
#: rows whose fix belongs to spattn/bench/* (owned by "ux"): strict, so the fix shows up as XPASS
CLI = [
    c("unknown-command", "launch", fragment="launch"),
    c("list-extra", "list", "--all", fragment="--all"),
    c("bench-unknown", "bench", "profile", fragment="profile"),
    c("speed-n-str", "bench", "speed", "--n", "abc", fragment="--n"),
    c("speed-n-zero", "bench", "speed", "--n", "0", fragment="n"),
    c("speed-n-neg", "bench", "speed", "--n", "-128", fragment="n"),
    c("speed-pattern", "bench", "speed", "--patterns", "nope", fragment="nope"),
    c("speed-pattern-syntax", "bench", "speed", "--patterns", "window(size=", fragment="window(size="),
    c("speed-pattern-param", "bench", "speed", "--patterns", "window(size=-1)", fragment="size"),
    c("speed-dtype", "bench", "speed", "--dtype", "int8", fragment="dtype"),
    c("speed-backends", "bench", "speed", "--backends", "gpu", fragment="gpu"),
    c("speed-batch", "bench", "speed", "--batch", "0", fragment="batch"),
    c("speed-heads", "bench", "speed", "--heads", "-1", fragment="heads"),
    c("speed-dim", "bench", "speed", "--dim", "0", fragment="dim"),
    c("speed-repeat", "bench", "speed", "--repeat", "0", fragment="repeat"),
    c("speed-warmup", "bench", "speed", "--warmup", "-1", fragment="warmup"),
    c("speed-dim-float", "bench", "speed", "--dim", "6.5", fragment="--dim"),
    c("short-bench-pattern", "bench", "--patterns", "nope", fragment="nope"),
    c("fidelity-n", "bench", "fidelity", "--n", "-5", fragment="n"),
    c("fidelity-spec", "bench", "fidelity", "--specs", "nope", fragment="nope"),
    c("fidelity-inputs", "bench", "fidelity", "--inputs", "weird", fragment="--inputs"),
    c("fidelity-topk", "bench", "fidelity", "--topk", "0", fragment="topk"),
    c("fidelity-heads", "bench", "fidelity", "--heads", "0", fragment="heads"),
    c("fidelity-batch", "bench", "fidelity", "--batch", "0", fragment="batch"),
    c("lra-task", "bench", "lra", "--tasks", "nope", fragment="nope"),
    c("lra-attention", "bench", "lra", "--attentions", "nope", fragment="nope"),
    c("lra-steps", "bench", "lra", "--steps", "-1", fragment="steps"),
    c("lra-minutes", "bench", "lra", "--max-minutes", "-1", fragment="max"),
    c(
        "lra-text-no-dir",
        "bench",
        "lra",
        "--tasks",
        "text",
        "--data-dir",
        "/nonexistent/lra",
        fragment="/nonexistent/lra",
    ),
    c("mqar-seq-len", "bench", "mqar", "--seq-lens", "63", fragment="seq"),
    c("mqar-dims", "bench", "mqar", "--dims", "0", fragment="dim"),
    c("mqar-lrs", "bench", "mqar", "--lrs", "-1", fragment="lr"),
    c("mqar-vocab", "bench", "mqar", "--vocab", "3", fragment="vocab"),
    c("mqar-target", "bench", "mqar", "--target-acc", "2", fragment="target"),
    c("mqar-batch", "bench", "mqar", "--batch-size", "0", fragment="batch"),
    c("mqar-attention", "bench", "mqar", "--attentions", "nope", fragment="nope"),
    c("mqar-steps", "bench", "mqar", "--steps", "0", fragment="steps"),
    c("plot-n", "bench", "plot", "--n", "0", fragment="n"),
    c("plot-pattern", "bench", "plot", "--patterns", "nope", fragment="nope"),
    c("plot-head", "bench", "plot", "--head", "-1", fragment="head"),
    c("train-no-task", "train", fragment="task"),
    c("train-task", "train", "nope", fragment="nope"),
    c("train-attention", *MQAR, "--attention", "nope", fragment="nope"),
    c("train-attention-param", *MQAR, "--attention", "window(size=-3)", fragment="size"),
    c("train-steps", *MQAR, "--steps", "-1", fragment="steps"),
    c("train-steps-str", *MQAR, "--steps", "many", fragment="--steps"),
    c("train-lr", *MQAR, "--lr", "-1", fragment="lr"),
    c("train-lr-nan", *MQAR, "--lr", "nan", fragment="lr"),
    c("train-lr-inf", *MQAR, "--lr", "inf", fragment="lr"),
    c("train-batch", *MQAR, "--batch-size", "0", fragment="batch"),
    c("train-warmup", *MQAR, "--warmup", "-1", fragment="warmup"),
    c("train-clip", *MQAR, "--grad-clip", "-1", fragment="clip"),
    c("train-min-lr", *MQAR, "--min-lr-ratio", "2", fragment="min_lr"),
    c("train-wd", *MQAR, "--weight-decay", "-1", fragment="weight"),
    c("train-eval-every", *MQAR, "--eval-every", "0", fragment="eval"),
    c("train-eval-batches", *MQAR, "--eval-batches", "0", fragment="eval"),
    c("train-ckpt-every", *MQAR, "--checkpoint-every", "0", fragment="checkpoint"),
    c("train-target", *MQAR, "--target-acc", "2", fragment="target"),
    c("train-minutes", *MQAR, "--max-minutes", "-1", fragment="max"),
    c("train-threads", *MQAR, "--threads", "-1", fragment="threads"),
    c("train-dim", *MQAR, "--dim", "0", fragment="dim"),
    c("train-depth", *MQAR, "--depth", "0", fragment="depth"),
    c("train-heads", *MQAR, "--heads", "3", fragment="heads"),
    c("train-kv-heads", *MQAR, "--kv-heads", "3", fragment="kv_heads"),
    c("train-mlp", *MQAR, "--mlp-ratio", "-1", fragment="mlp_ratio"),
    c("train-dropout", *MQAR, "--dropout", "1.5", fragment="dropout"),
    c("train-positions", *MQAR, "--positions", "sin", fragment="--positions"),
    c("train-pool", *MQAR, "--pool", "max", fragment="--pool"),
    c("train-backend", *MQAR, "--backend", "gpu", fragment="backend"),
    c("train-short-conv", *MQAR, "--short-conv", "-1", fragment="short_conv"),
    c("train-seq-len", *MQAR, "--seq-len", "-1", fragment="seq_len"),
    c("train-kv-pairs", *MQAR, "--kv-pairs", "0", fragment="kv_pairs"),
    c("train-vocab", *MQAR, "--vocab", "2", fragment="vocab"),
    c("train-num-train", *MQAR, "--num-train", "0", fragment="num"),
    c("train-option-form", *MQAR, "--task-option", "novalue", fragment="novalue"),
    c("train-option-unknown", *MQAR, "--task-option", "colour=3", fragment="colour"),
    c("train-init-from", *MQAR, "--init-from", "/nonexistent/ckpt.pt", fragment="/nonexistent/ckpt.pt"),
    c("train-text-no-dir", "train", "text", "--data-dir", "/nonexistent/lra", fragment="/nonexistent/lra"),
    c("train-max-len", "train", "listops", "--max-len", "0", fragment="max_len"),
    c("longctx-method", "longctx", "--methods", "nope", fragment="nope"),
    c("longctx-decode", "longctx", "--decode", "nope", fragment="nope"),
    c("longctx-lengths", "longctx", "--lengths", "0", fragment="length"),
    c("longctx-depths", "longctx", "--depths", "2", fragment="depth"),
    c("longctx-trials", "longctx", "--trials", "0", fragment="trials"),
    c("longctx-new-tokens", "longctx", "--new-tokens", "0", fragment="new"),
    c("longctx-dense-layers", "longctx", "--dense-layers", "-1", fragment="dense"),
    c("longctx-dense-tail", "longctx", "--dense-tail", "-1", fragment="dense"),
    c("longctx-tasks", "longctx", "--tasks", "nope", fragment="nope"),
    c("longctx-ppl", "longctx", "--ppl-lengths", "0", fragment="ppl"),
    c("longctx-model", "longctx", "--model", "gpt2", fragment="--model"),
    c("longctx-threads", "longctx", "--threads", "0", fragment="threads"),
    c("longctx-prefill-decoder", "longctx", "--methods", "quest", fragment="quest"),
]


def run_cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with time_limit(5), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id, marks=r.marks) for r in CLI])
def test_cli_rejects(row, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing a refused command writes may land in the checkout
    code, out, err = run_cli(row.argv)
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("spattn: ")]
    assert code == 2, f"exit status {code}; stderr {err!r}"
    # the error is one line, the last one (a run may have said what it was building before it failed)
    assert len(errors) == 1 and lines[-1] == errors[0], f"expected one error line, at the end; got {lines}"
    assert row.fragment in errors[0], f"{errors[0]!r} does not name {row.fragment!r}"
    assert "Traceback" not in err


def test_cli_ids_unique():
    assert len({r.id for r in CLI}) == len(CLI)


# ------------------------------------------------------------------ hf.sparsify

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


def _sparsify_rows(model):
    from spattn.integrations.hf import sparsify

    def s(*args, **kw):
        return lambda: sparsify(model, *args, **kw)

    def nested():
        with sparsify(model, prefill="window(size=8)"):
            sparsify(model, prefill="window(size=8)")

    VE, TE = ValueError, TypeError
    return [
        Bad("model-str", lambda: sparsify("llama", prefill="window(size=8)"), TE, "model"),
        Bad("model-module", lambda: sparsify(__import__("torch").nn.Linear(2, 2)), TE, "model"),
        Bad("prefill-int", s(prefill=3), (TE, VE), "prefill"),
        Bad("prefill-unknown", s(prefill="nope"), VE, "nope"),
        Bad("prefill-syntax", s(prefill="window(size="), VE, "window(size="),
        Bad("prefill-decoder", s(prefill="quest"), VE, "quest"),
        Bad("prefill-approx", s(prefill="performer"), (TE, VE), "performer"),
        Bad("decode-unknown", s(decode="nope(x=1)"), VE, "nope"),
        Bad("decode-int", s(decode=1.5), (TE, VE), "decode"),
        Bad("layers-range", s(prefill="window(size=8)", layers=[5]), VE, "layers"),
        Bad("layers-neg", s(prefill="window(size=8)", layers=[-1]), VE, "layers"),
        Bad("layers-str", s(prefill="window(size=8)", layers="01"), (TE, VE), "layers"),
        Bad("layers-float", s(prefill="window(size=8)", layers=[0.5]), (TE, VE), "layers"),
        Bad("heads-range", s(prefill="window(size=8)", heads=[4]), VE, "heads"),
        Bad("heads-none-item", s(prefill="window(size=8)", heads=[None]), (TE, VE), "heads"),
        Bad("dense-layers-neg", s(prefill="window(size=8)", dense_layers=-1), VE, "dense_layers"),
        Bad("dense-layers-str", s(prefill="window(size=8)", dense_layers="2"), (TE, VE), "dense_layers"),
        Bad("dense-layers-range", s(prefill="window(size=8)", dense_layers=[7]), VE, "dense_layers"),
        Bad("dense-tail-neg", s(prefill="window(size=8)", dense_tail=-1), VE, "dense_tail"),
        Bad("dense-tail-float", s(prefill="window(size=8)", dense_tail=1.5), (TE, VE), "dense_tail"),
        Bad("backend", s(prefill="window(size=8)", backend="gpu"), VE, "backend"),
        Bad("nested", nested, (RuntimeError, ValueError), "sparsify"),
    ]


SPARSIFY_IDS = [r.id for r in _sparsify_rows(None)]


@pytest.mark.parametrize("index", range(len(SPARSIFY_IDS)), ids=SPARSIFY_IDS)
def test_sparsify_rejects(index, tiny_llama):
    row = _sparsify_rows(tiny_llama)[index]
    before = tiny_llama.config._attn_implementation
    check(row)
    assert tiny_llama.config._attn_implementation == before  # a refused sparsify changes nothing
