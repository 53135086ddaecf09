"""Training loop: learning, exact resume, checkpoint errors, early stop, metrics log, CLI entry points."""

import argparse
import json
import os

import pytest
import torch
from torch.utils.data import Dataset

from spattn.bench import tasks as T
from spattn.bench.train import TrainConfig, add_train_arguments, load_checkpoint, lr_lambda, run_train, train

from .helpers import TINY_MQAR_TRAIN


class FirstTokenDataset(Dataset):
    """Label = the class of the first token; variable lengths (padding exercised)."""

    def __init__(self, n, seed, seq=24, vocab=12, classes=4):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(1, vocab, (n, seq), generator=g)
        self.len = torch.randint(seq // 2, seq + 1, (n,), generator=g)
        self.classes = classes

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        n = int(self.len[i])
        return self.x[i, :n], int(self.x[i, 0]) % self.classes


def collate(items):
    n = max(len(t) for t, _ in items)
    tokens = torch.zeros(len(items), n, dtype=torch.long)
    mask = torch.zeros(len(items), n, dtype=torch.bool)
    for b, (t, _) in enumerate(items):
        tokens[b, : len(t)] = t
        mask[b, : len(t)] = True
    return {"tokens": tokens, "labels": torch.tensor([y for _, y in items]), "mask": mask}


class ShiftDataset(Dataset):
    """Token task: target at position i is the token at i - 1 (needs attention one step back)."""

    def __init__(self, n, seed, seq=16, vocab=10):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        y = torch.full_like(self.x[i], -100)
        y[1:] = self.x[i, :-1]
        return {"tokens": self.x[i], "targets": y}


def shift_collate(items):
    return {
        "tokens": torch.stack([it["tokens"] for it in items]),
        "targets": torch.stack([it["targets"] for it in items]),
    }


def _first(num_train=256, seq=24):
    return T.TaskData(
        FirstTokenDataset(num_train, 0, seq),
        FirstTokenDataset(64, 1, seq),
        FirstTokenDataset(64, 2, seq),
        collate,
        12,
        4,
        seq,
        majority_acc=0.25,
    )


def _shift(num_train=256):
    return T.TaskData(ShiftDataset(num_train, 0), ShiftDataset(64, 1), ShiftDataset(64, 2), shift_collate, 10, 10, 16)


T.register_task(
    T.Task(
        "_first",
        _first,
        "classifier",
        "classify",
        model_defaults=dict(dim=32, depth=1, heads=2),
        train_defaults=dict(batch_size=16, lr=3e-3, warmup=5, steps=40),
    ),
    replace=True,
)
T.register_task(
    T.Task(
        "_shift",
        _shift,
        "lm",
        "tokens",
        model_defaults=dict(dim=32, depth=1, heads=2, mlp_ratio=0.0),
        train_defaults=dict(batch_size=16, lr=1e-2, warmup=5, steps=60),
    ),
    replace=True,
)


def cfg(**kw):
    kw.setdefault("progress", False)
    kw.setdefault("eval_every", 20)
    return TrainConfig(**kw)


@pytest.mark.slow
def test_learns_classification_and_writes_metrics(tmp_path):
    torch.manual_seed(0)
    res = train(cfg(task="_first", attention="window(size=2)", out_dir=str(tmp_path), model=dict(pool="cls")))
    assert res["test"]["acc"] > 0.9, res["test"]  # majority is 0.25: the CLS token must find position 0
    log = json.loads((tmp_path / "metrics.json").read_text())
    assert [h["step"] for h in log["history"]] == [20, 40]
    assert log["result"]["test"]["acc"] == res["test"]["acc"]
    assert log["model_config"]["attention"] == "window(size=2)"


@pytest.mark.slow
def test_learns_token_task_with_causal_window():
    res = train(cfg(task="_shift", attention="window(size=1)", model=dict(positions="rope")))
    assert res["val"]["acc"] > 0.9, res["val"]


def test_early_stop_at_target_accuracy():
    res = train(cfg(task="_shift", steps=400, eval_every=10, target_acc=0.5))
    assert res["stopped"] == "target" and res["steps"] < 400
    assert res["history"][-1]["val_acc"] >= 0.5


@pytest.mark.parametrize("attention", ["dense", pytest.param("routing(clusters=2)", marks=pytest.mark.slow)])
def test_interrupted_run_resumes_bit_identical(tmp_path, attention):
    """Model, optimizer, scheduler, RNG (dropout), data position and routing's EMA centroids all resume exactly."""
    base = dict(
        task="_first",
        attention=attention,
        steps=12,
        eval_every=4,
        checkpoint_every=2,
        model=dict(dropout=0.2, embed_dropout=0.1),
        task_options=dict(num_train=64),
    )
    full = train(cfg(out_dir=str(tmp_path / "a"), **base))  # 64 / 16 = 4 batches per epoch: crosses epochs

    def crash(step, record):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg(out_dir=str(tmp_path / "b"), **base), callback=crash)
    assert load_checkpoint(str(tmp_path / "b" / "checkpoint.pt"))["step"] == 6
    resumed = train(cfg(out_dir=str(tmp_path / "b"), resume=True, **base))
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if attention.startswith("routing"):
        assert any(k.endswith("centroids") for k in a)
    assert [h["val_loss"] for h in full["history"]] == [h["val_loss"] for h in resumed["history"]]


def test_resume_refuses_other_model(tmp_path):
    train(cfg(task="_first", steps=2, out_dir=str(tmp_path), test=False))
    with pytest.raises(ValueError, match="model config differs in .*dim"):
        train(cfg(task="_first", steps=4, out_dir=str(tmp_path), resume=True, model=dict(dim=16)))


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="corrupt"):
        train(cfg(task="_first", steps=2, out_dir=str(tmp_path), resume=True))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="not a spattn training checkpoint"):
        load_checkpoint(str(tmp_path / "checkpoint.pt"))
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.pt"))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(task="no_such_task"), "unknown task 'no_such_task'; valid tasks: .*mqar"),
        (dict(task="_first", attention="no_such_attention"), "unknown attention mechanism 'no_such_attention'"),
        (dict(task="_first", attention="window(size=2"), "cannot parse spec"),
        (dict(task="_first", steps=0), "steps must be a positive int"),
        (dict(task="_first", lr=-1.0), "lr > 0"),
        (dict(task="_first", target_acc=1.5), "target_acc"),
        (dict(task="_first", resume=True), "resume=True needs out_dir"),
        (dict(task="_first", model=dict(width=3)), "unknown model field"),
        (dict(task="_first", task_options=dict(bogus=1)), "does not take option"),
        (dict(task="_first", model=dict(max_len=10)), "exceeds the model's max_len=10"),
    ],
)
def test_bad_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        train(cfg(**kw))


def test_warmup_cosine_schedule():
    f = lr_lambda(10, 110, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)


def test_aux_loss_is_added(monkeypatch):
    """The model's aux loss is part of the training loss: a NaN aux loss (only) makes the loop stop with a clear error."""
    from spattn.models.backbone import Backbone

    orig = Backbone.encode

    def encode(self, x, mask=None):
        h = orig(self, x, mask)
        self.aux_loss = self.aux_loss + h.sum() * float("nan")
        return h

    monkeypatch.setattr(Backbone, "encode", encode)
    with pytest.raises(FloatingPointError, match="loss became nan"):
        train(cfg(task="_first", steps=2))


def test_cli_functions(tmp_path, capsys):
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    args = p.parse_args(
        [
            "_first",
            "--attention",
            "window(size=3)",
            "--steps",
            "6",
            "--eval-every",
            "3",
            "--out",
            str(tmp_path),
            "--no-progress",
            "--dim",
            "16",
            "--task-option",
            "num_train=64",
        ]
    )
    assert run_train(args) == 0
    out = capsys.readouterr().out
    assert "_first window(size=3" in out and ": 6 steps" in out and "test acc" in out
    args = p.parse_args(
        [
            "_first",
            "--steps",
            "8",
            "--eval-every",
            "3",
            "--out",
            str(tmp_path),
            "--resume",
            "--no-progress",
            "--dim",
            "16",
            "--task-option",
            "num_train=64",
            "--attention",
            "window(size=3)",
        ]
    )
    assert run_train(args) == 0
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] == 8


@pytest.mark.slow
def test_init_from_a_dense_run_then_sparse(tmp_path):
    """A sparse model started from a trained dense run's weights: same accuracy before any step when the
    sparse pattern covers what the dense model uses; its own state (routing centroids) may be missing."""
    torch.manual_seed(0)
    dense = train(cfg(task="_shift", steps=200, out_dir=str(tmp_path / "dense"), model=dict(positions="rope")))
    ckpt = str(tmp_path / "dense" / "checkpoint.pt")
    res = train(cfg(task="_shift", attention="window(size=1)", steps=2, init_from=ckpt, model=dict(positions="rope")))
    ini = res["initial"]
    assert ini["attention"] == "dense" and ini["missing"] == [] and ini["unexpected"] == []
    assert ini["val"]["acc"] > 0.9 and abs(ini["val"]["acc"] - dense["val"]["acc"]) < 0.05
    routed = train(
        cfg(task="_shift", attention="routing(clusters=2)", steps=2, init_from=ckpt, model=dict(positions="rope"))
    )
    assert routed["initial"]["missing"] and all(".attn.mechanism." in k for k in routed["initial"]["missing"])
    with pytest.raises(ValueError, match="differs in"):
        train(cfg(task="_shift", steps=2, init_from=ckpt, model=dict(positions="rope", dim=16)))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(cfg(task="_shift", steps=2, init_from=str(tmp_path / "nope.pt")))


# ----------------------------------------------------------------------------------------- no lost work (issue 16)

from spattn.bench.train import TrainingInterrupted, save_checkpoint  # noqa: E402

SMALL = dict(task="_first", steps=4, eval_every=2, task_options=dict(num_train=64), model=dict(dim=16))


def test_existing_checkpoint_needs_resume_or_overwrite(tmp_path):
    train(cfg(out_dir=str(tmp_path), **SMALL))
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match="already holds a training checkpoint.*--resume.*--overwrite"):
        train(cfg(out_dir=str(tmp_path), seed=1, **SMALL))
    assert (tmp_path / "checkpoint.pt").read_bytes() == before  # untouched
    res = train(cfg(out_dir=str(tmp_path), seed=1, overwrite=True, **{**SMALL, "steps": 2}))
    assert res["steps"] == 2 and load_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] == 2
    with pytest.raises(ValueError, match="resume and overwrite"):
        train(cfg(out_dir=str(tmp_path), resume=True, overwrite=True, **SMALL))


def test_flipped_byte_is_refused_naming_the_file(tmp_path):
    train(cfg(out_dir=str(tmp_path), **SMALL))
    path = tmp_path / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    for where in (len(data) // 2, len(data) - 10):
        bad = bytearray(data)
        bad[where] ^= 0x01
        path.write_bytes(bytes(bad))
        with pytest.raises(ValueError, match=r"checkpoint\.pt.*corrupt.*checksum"):
            load_checkpoint(str(path))
        with pytest.raises(ValueError, match="checksum"):
            train(cfg(out_dir=str(tmp_path), resume=True, **SMALL))
    path.write_bytes(bytes(data[:-100]))
    with pytest.raises(ValueError, match="truncated"):
        load_checkpoint(str(path))
    path.write_bytes(bytes(data))
    assert load_checkpoint(str(path))["step"] == 4
    assert not list(tmp_path.glob("*.tmp*"))  # atomic writes leave no temporary files behind


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("small")
    train(cfg(out_dir=str(out), **SMALL))
    return str(out / "checkpoint.pt")


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("step", -5, "field 'step' must be an int >= 0, got -5"),
        ("pos", 1.5, "field 'pos'"),
        ("epoch", True, "field 'epoch'"),
        ("history", {"a": 1}, "field 'history'"),
        ("best", [], "field 'best'"),
        ("train_seconds", float("nan"), "field 'train_seconds'"),
        ("optimizer", {"state": {}, "param_groups": 3}, "field 'optimizer'"),
        ("rng", {"torch": torch.zeros(3), "python": (3,), "numpy": ()}, "field 'rng.torch'"),
        ("model", {"w": 3}, "field 'model.w'"),
        ("model_config", [1], "field 'model_config'"),
        ("train_config", {"task_options": {}}, "field 'train_config.task'"),
        ("optimizer", None, "field 'optimizer'"),
    ],
)
def test_malformed_checkpoint_fields_are_named(tmp_path, small_checkpoint, field, value, match):
    path = str(tmp_path / "checkpoint.pt")
    payload = load_checkpoint(small_checkpoint)
    payload[field] = value
    save_checkpoint(path, payload)  # a valid checksum over malformed content
    with pytest.raises(ValueError, match=match):
        load_checkpoint(path)
    with pytest.raises(ValueError, match=match):
        train(cfg(out_dir=str(tmp_path), resume=True, **SMALL))


def test_checkpoint_that_does_not_fit_names_the_field(tmp_path, small_checkpoint):
    path = str(tmp_path / "checkpoint.pt")
    payload = load_checkpoint(small_checkpoint)
    del payload["history"]
    save_checkpoint(path, payload)
    with pytest.raises(ValueError, match=r"missing field\(s\) \['history'\]"):
        load_checkpoint(path)
    payload = load_checkpoint(small_checkpoint)
    name = next(iter(payload["model"]))
    payload["model"][name] = torch.zeros(1)  # the right field, the wrong shape
    save_checkpoint(path, payload)
    with pytest.raises(ValueError, match="field 'model' does not fit"):
        train(cfg(out_dir=str(tmp_path), resume=True, **{**SMALL, "steps": 6}))


def test_resume_refuses_settings_that_break_exactness(tmp_path, capsys):
    train(cfg(out_dir=str(tmp_path), **SMALL))
    for change, match in (
        (dict(seed=1), "seed 0 -> 1"),
        (dict(batch_size=8), "batch_size 16 -> 8"),
        (dict(lr=1e-4), "lr 0.003 -> 0.0001"),
    ):
        with pytest.raises(ValueError, match=f"cannot resume .* exactly: changed {match}.*--resume-inexact"):
            train(cfg(out_dir=str(tmp_path), resume=True, **{**SMALL, "steps": 6}, **change))
    res = train(cfg(out_dir=str(tmp_path), resume=True, resume_inexact=True, seed=1, **{**SMALL, "steps": 6}))
    assert res["steps"] == 6
    err = capsys.readouterr().err
    assert "NON-EXACTLY" in err and "seed 0 -> 1" in err and "steps 4 -> 6" in err


def test_metrics_never_ahead_of_the_checkpoint(tmp_path):
    def crash(step, record):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(
            cfg(
                out_dir=str(tmp_path),
                checkpoint_every=4,
                num_val=8,
                test=False,
                **{**SMALL, "steps": 12, "eval_every": 1},
            ),
            callback=crash,
        )
    ckpt = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert ckpt["step"] == 4 and metrics["checkpoint_step"] == 4
    assert [h["step"] for h in metrics["history"]] == [h["step"] for h in ckpt["history"]] == [1, 2, 3, 4]


def test_evaluation_shows_progress_and_is_not_repeated(monkeypatch, capsys):
    import spattn.bench.train as train_mod

    calls = []
    real = train_mod.evaluate

    def counting(*a, **kw):
        calls.append(kw.get("desc"))
        return real(*a, **kw)

    monkeypatch.setattr(train_mod, "evaluate", counting)
    res = train(cfg(progress=True, num_val=40, num_test=24, **SMALL))
    assert calls == ["validation (step 2)", "validation (step 4)", "test (step 4)"]  # the last validation is reused
    assert res["val"]["count"] == 40 and res["test"]["count"] == 24
    err = capsys.readouterr().err
    assert "validation (step 4)" in err and "test (step 4)" in err and "/40 [" in err and "/24 [" in err
    assert "building the _first data" in err and "training _first" in err


def test_cli_default_run_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    base = [
        "_first",
        "--steps",
        "2",
        "--eval-every",
        "2",
        "--no-progress",
        "--dim",
        "16",
        "--task-option",
        "num_train=64",
    ]
    assert run_train(p.parse_args(base + ["--num-val", "8", "--num-test", "8"])) == 0
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("_first-")
    assert (runs[0] / "checkpoint.pt").exists() and (runs[0] / "metrics.json").exists()
    out = capsys.readouterr().out
    assert f"saved runs/{runs[0].name}/checkpoint.pt" in out and "--resume" in out
    assert run_train(p.parse_args(base + ["--no-save"])) == 0
    assert len(list((tmp_path / "runs").iterdir())) == 1
    with pytest.raises(ValueError, match="--resume needs --out"):
        run_train(p.parse_args(base + ["--resume"]))


SIGNAL_RUN = [
    "-m",
    "spattn.cli",
    *TINY_MQAR_TRAIN,
    "--num-train",
    "4096",
    "--steps",
    "100000",
    "--eval-every",
    "100000",
    "--num-val",
    "8",
    "--num-test",
    "8",
    "--threads",
    "1",
]


@pytest.mark.parametrize("signame", ["SIGINT", pytest.param("SIGTERM", marks=pytest.mark.slow)])
def test_signal_saves_a_final_checkpoint(tmp_path, signame):
    """A real process: a checkpoint exists only because of the signal (every checkpoint interval is far away)."""
    import signal
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, *SIGNAL_RUN, "--out", str(tmp_path)],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=root,
    )
    try:
        line = ""
        deadline = time.monotonic() + 120
        while not line.startswith("training mqar") and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "the run ended before training started"
        time.sleep(1.5)  # some steps
        proc.send_signal(getattr(signal, signame))
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted after step" in err and "--resume" in err and "Traceback" not in err
    ckpt = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert ckpt["step"] >= 1
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["checkpoint_step"] == ckpt["step"]


def test_interrupt_in_process_raises_training_interrupted(tmp_path):
    """The handler's path without a subprocess: a signal during training stops at the step boundary."""
    import signal

    def send(step, record):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted, match="after step 3"):
        train(cfg(out_dir=str(tmp_path), **{**SMALL, "steps": 10, "eval_every": 100}), callback=send)
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_schema_1_checkpoints_still_load(tmp_path, small_checkpoint):
    """Checkpoints written before checksums (a bare torch.save, format spattn-train-v1) are read and validated."""
    payload = load_checkpoint(small_checkpoint)
    payload = {k: v for k, v in payload.items() if k != "schema"}
    payload["format"] = "spattn-train-v1"
    torch.save(payload, tmp_path / "old.pt")
    old = load_checkpoint(str(tmp_path / "old.pt"))
    assert old["schema"] == 1 and old["step"] == 4
    payload["step"] = -5
    torch.save(payload, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="field 'step'"):
        load_checkpoint(str(tmp_path / "old.pt"))
