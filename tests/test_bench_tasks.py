"""Task registry, batch normalisation, and the bench entry points (mqar sweep, lra table, plot) on tiny configs."""

import argparse
import builtins
import json

import pytest
import torch

from spattn.bench import lra, mqar, plot
from spattn.bench.tasks import as_batch, get_task, task_names


def test_registry_has_the_benchmark_tasks():
    assert {"mqar", "listops", "bytelm", "pathfinder", "text", "retrieval", "image"} <= set(task_names())
    with pytest.raises(ValueError, match="unknown task 'nope'; valid tasks:"):
        get_task("nope")
    with pytest.raises(ValueError, match="does not take option"):
        get_task("mqar").make_data(colour="red")
    with pytest.raises(ValueError, match="needs the LRA release files|pass data_dir"):
        get_task("text").make_data()


def test_as_batch_normalises_keys_and_tuples():
    t = torch.zeros(2, 3, dtype=torch.long)
    b = as_batch({"inputs": t, "labels": t[:, 0], "padding_mask": t.bool()})
    assert set(b) == {"tokens", "target", "mask"}
    assert set(as_batch((t, t))) == {"tokens", "target"}
    with pytest.raises(ValueError, match="needs tokens and target"):
        as_batch({"x2": t})
    with pytest.raises(TypeError):
        as_batch(t)


def test_mqar_task_data_and_query_positions():
    data = get_task("mqar").make_data(seq_len=64, kv_pairs=4, vocab=128, num_train=8, num_val=4, num_test=4)
    b = as_batch(data.collate([data.train[i] for i in range(4)]))
    assert b["tokens"].shape == (4, 64) and data.vocab_size == 128
    assert ((b["target"] != -100).sum(1) == 4).all()  # one target per key


def test_mqar_sweep_and_table(tmp_path):
    torch.manual_seed(0)
    rows = mqar.run_mqar_sweep(
        ["dense", "window(size=2)"],
        seq_lens=[32],
        dims=[16],
        steps=3,
        batch_size=4,
        num_train=16,
        num_test=8,
        vocab=64,
        eval_every=3,
        json_path=str(tmp_path / "m.json"),
        log=lambda s: None,
    )
    assert [(r["spec"], r["seq_len"], r["kv_pairs"], r["dim"]) for r in rows] == [
        ("dense", 32, 2, 16),
        ("window(size=2)", 32, 2, 16),
    ]
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in rows)
    table = mqar.format_mqar_table(rows)
    assert "| dense | 16 |" in table and "L=32, kv=2" in table
    assert len(json.loads((tmp_path / "m.json").read_text())["rows"]) == 2
    with pytest.raises(ValueError, match="multiples of 16"):
        mqar.run_mqar_sweep(["dense"], seq_lens=[40], dims=[16], log=lambda s: None)


def test_mqar_cli_functions(tmp_path, capsys):
    p = argparse.ArgumentParser()
    mqar.add_mqar_arguments(p)
    args = p.parse_args(
        [
            "--attentions",
            "dense",
            "--seq-lens",
            "32",
            "--dims",
            "16",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--num-train",
            "8",
            "--num-test",
            "4",
            "--vocab",
            "64",
            "--json",
            str(tmp_path / "m.json"),
        ]
    )
    assert mqar.run_mqar(args) == 0
    assert "| dense | 16 |" in capsys.readouterr().out


def test_lra_table_has_published_rows_labelled():
    rows = [
        {"task": "listops", "spec": "bigbird(block=32)", "test_acc": 37.5, "majority_acc": 17.0},
        {"task": "pathfinder", "spec": "bigbird(block=32)", "test_acc": 60.0},
    ]
    t = lra.format_lra_table(rows)
    assert "| ours: bigbird(block=32) (CPU-scaled) | 37.50 | — | — | — | 60.00 | — | 48.75 |" in t
    assert "| Transformer (published, Tay et al. 2021) | 36.37 | 64.27 | 57.46 | 42.44 | 71.40 | FAIL | 54.39" in t
    assert "BigBird (published" in t and "Performer (published" in t and "majority class" in t


def test_lra_skips_file_tasks_without_data_dir():
    run, skipped = lra.available_tasks(["listops", "text", "image"], None)
    assert run == ["listops"] and len(skipped) == 2 and "--data-dir" in skipped[0]
    with pytest.raises(ValueError, match="unknown LRA task"):
        lra.available_tasks(["cifar"], None)


def test_lra_sweep_on_tiny_listops(tmp_path):
    pytest.importorskip("spattn.data.listops")
    over = {
        "listops": dict(
            task_options=dict(max_len=60, min_len=10, num_train=32, num_val=8, num_test=8, cache_dir=str(tmp_path)),
            steps=2,
            batch_size=8,
            model=dict(dim=16, depth=1, heads=2),
        )
    }
    res = lra.run_lra_sweep(["dense"], ["listops"], overrides=over, log=lambda s: None)
    (row,) = res["rows"]
    assert row["task"] == "listops" and 0 <= row["test_acc"] <= 100 and row["majority_acc"] is not None


def test_pattern_mask_matches_definition():
    m = plot.pattern_mask("window(size=2, block=4)", 12)
    i, j = torch.meshgrid(torch.arange(12), torch.arange(12), indexing="ij")
    assert torch.equal(m, (i - j).abs() <= 2)
    mc = plot.pattern_mask("window(size=2, block=4)", 12, causal=True)
    assert torch.equal(mc, ((i - j) <= 2) & (j <= i))
    with pytest.raises(ValueError, match="unknown attention mechanism"):
        plot.pattern_mask("nope", 8)


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    p = argparse.ArgumentParser()
    plot.add_plot_arguments(p)
    out = tmp_path / "p.png"
    args = p.parse_args(["--patterns", "window(size=2, block=4)", "bigbird(block=4)", "--n", "24", "--out", str(out)])
    assert plot.run_plot(args) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch):
    real = builtins.__import__

    def fake(name, *a, **kw):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(RuntimeError, match="needs matplotlib: pip install"):
        plot.plot_patterns(["window(size=2)"], 8)
