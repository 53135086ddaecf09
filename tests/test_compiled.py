"""The optional compiled CPU decode loops (spattn/csrc/decode_cpu.cpp) against brute force, and the
selectors / kernel that use them against their eager paths."""

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import spattn
from spattn import _compiled
from spattn.kvcache import SelectorState
from spattn.patterns.decode import DoubleSparsity, Quest
from spattn.patterns.reference import brute_group_label_scores
from spattn.selection import PageSelection

from .helpers import CountingOps

HAS_TOOLCHAIN = shutil.which("c++") is not None and (
    shutil.which("ninja") is not None or importlib.util.find_spec("ninja") is not None
)


def test_builds_where_a_toolchain_exists():
    """CI has g++ and ninja: the loops must build there, or the tests below would all be skipped."""
    if not HAS_TOOLCHAIN:
        pytest.skip("no C++ compiler or ninja: spattn runs its eager paths")
    assert _compiled.ops() is not None, _compiled.build_error()


def _ops():
    ops = _compiled.ops()
    if ops is None:
        pytest.skip(f"compiled loops unavailable: {_compiled.build_error()}")
    return ops


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 2),
    st.sampled_from([(2, 1), (6, 2), (3, 3)]),
    st.integers(1, 9),
    st.integers(1, 300),
    st.integers(1, 300),
    st.sampled_from([torch.float32, torch.float64]),
    st.integers(0, 10_000),
)
def test_group_topk_brute_force(b, heads, r, n, count, dtype, seed):
    ops = _ops()
    hq, hkv = heads
    count = min(count, n)
    g = torch.Generator().manual_seed(seed)
    d = 12
    q = torch.randn(b, hq, d, generator=g, dtype=dtype)
    labels = torch.randn(b, hkv, r, n + 7, generator=g, dtype=dtype)[..., :n]  # a cache's capacity view
    channels = torch.stack([torch.randperm(d, generator=g)[:r].sort().values for _ in range(hkv)])
    got = ops.group_topk(q, labels, channels, count)
    assert got.shape == (b, hkv, count)
    assert torch.equal(got, got.sort(-1).values)  # ascending positions
    want = brute_group_label_scores(q, labels, channels).topk(count, dim=-1).indices.sort(-1).values
    assert torch.equal(got, want)


@settings(max_examples=15, deadline=None)
@given(st.integers(2000, 9000), st.integers(1, 700), st.booleans(), st.integers(0, 10_000))
def test_group_topk_long_caches(n, count, bf16, seed):
    """Long caches take the sampled-threshold path (and its fallback when the sample misjudges);
    bfloat16 labels (float32 queries) rank by the widened labels."""
    ops = _ops()
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 9, 64, generator=g)
    labels = torch.randn(1, 3, 8, n, generator=g)
    if seed % 3 == 0:
        labels[..., ::5] += 3.0  # a skewed distribution the strided sample sees differently
    if bf16:
        labels = labels.bfloat16()
    channels = torch.stack([torch.randperm(64, generator=g)[:8].sort().values for _ in range(3)])
    got = ops.group_topk(q, labels, channels, count)
    scores = brute_group_label_scores(q.double(), labels.double(), channels)
    want_scores = scores.topk(count, dim=-1).values.sort(-1).values
    # bfloat16 labels tie often: compare the selected scores (ties may pick other positions of equal score)
    torch.testing.assert_close(scores.gather(-1, got).sort(-1).values, want_scores, atol=1e-9, rtol=0)
    assert torch.equal(got, got.sort(-1).values) and all(len(set(row.tolist())) == count for row in got[0])


def test_group_topk_ties_and_nan_take_the_earliest():
    ops = _ops()
    q = torch.ones(1, 2, 4)
    labels = torch.zeros(1, 1, 2, 10)
    labels[..., 7] = 1.0  # one clear winner, the rest tie at 0
    got = ops.group_topk(q, labels, torch.tensor([[0, 1]]), 4)
    assert got.tolist() == [[[0, 1, 2, 7]]]
    labels[..., 3] = float("nan")  # NaN ranks last
    assert ops.group_topk(q, labels, torch.tensor([[0, 1]]), 10)[0, 0].tolist() == list(range(10))
    assert 3 not in ops.group_topk(q, labels, torch.tensor([[0, 1]]), 9)[0, 0].tolist()


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("heads", [(6, 2), (4, 4), (8, 1)])
def test_shared_rows_attention_matches_reference(dtype, atol, heads):
    ops = _ops()
    hq, hkv = heads
    g = torch.Generator().manual_seed(1)
    b, n, d, width = 2, 90, 16, 23
    q = torch.randn(b, hq, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, n + 10, d, generator=g, dtype=dtype)[:, :, :n]  # strided like a cache
    v = torch.randn(b, hkv, n + 10, d, generator=g, dtype=dtype)[:, :, :n]
    rows = torch.stack([torch.stack([torch.randperm(n, generator=g)[:width] for _ in range(hkv)]) for _ in range(b)])
    rows[0, 0, :5] = -1  # unused slots
    rows[1, -1] = -1  # a kv head with nothing selected: zeros and lse = -inf
    out, lse = ops.shared_rows_attention(q, k, v, rows, 0.3)
    group = hq // hkv
    for bi in range(b):
        for h in range(hq):
            sel = rows[bi, h // group]
            sel = sel[sel >= 0]
            if sel.numel() == 0:
                assert torch.equal(out[bi, h], torch.zeros(d, dtype=dtype)) and lse[bi, h] == float("-inf")
                continue
            s = (k[bi, h // group, sel] @ q[bi, h]) * 0.3
            torch.testing.assert_close(out[bi, h], torch.softmax(s, 0) @ v[bi, h // group, sel], atol=atol, rtol=0)
            torch.testing.assert_close(lse[bi, h], torch.logsumexp(s, 0), atol=atol, rtol=0)


def _counting(monkeypatch) -> CountingOps:
    spy = CountingOps(_ops())
    monkeypatch.setitem(_compiled._state, "ops", spy)
    return spy


def _decode_inputs(dtype=torch.float32, n=300, seed=3):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 6, 1, 16, generator=g, dtype=dtype)
    k = torch.randn(2, 2, n, 16, generator=g, dtype=dtype)
    v = torch.randn(2, 2, n, 16, generator=g, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize(
    "dtype,label_dtype", [(torch.float32, None), (torch.float64, None), (torch.float32, "bfloat16")]
)
def test_grouped_double_sparsity_compiled_equals_eager(dtype, label_dtype, monkeypatch):
    spy = _counting(monkeypatch)
    q, k, v = _decode_inputs(dtype)
    ds = DoubleSparsity(channels=4, budget=40, group_tokens=True, label_dtype=label_dtype)
    g = torch.Generator().manual_seed(4)
    ds.calibrate(
        torch.randn(2, 6, 64, 16, generator=g, dtype=dtype),
        torch.randn(2, 2, 64, 16, generator=g, dtype=dtype),
        layer=0,
    )
    sel = ds.select(q, k, True, state=SelectorState().at(0))
    out = spattn.attention(q, k, v, sel)
    assert spy.calls == {"group_topk": 1, "shared_rows_attention": 1}
    monkeypatch.setitem(_compiled._state, "ops", None)
    eager_sel = ds.select(q, k, True, state=SelectorState().at(0))
    assert isinstance(sel, PageSelection) and torch.equal(sel.pages, eager_sel.pages.sort(-1).values)
    eager_out = spattn.attention(q, k, v, eager_sel)
    torch.testing.assert_close(out, eager_out, atol=1e-5 if dtype == torch.float32 else 1e-10, rtol=0)


@pytest.mark.parametrize("page", [1, 4, 16])
def test_quest_group_pages_compiled_equals_eager(page, monkeypatch):
    spy = _counting(monkeypatch)
    q, k, v = _decode_inputs(n=301)  # the last page is partial
    sel = Quest(page=page, budget=48, group_pages=True).select(q, k, causal=True)
    out = spattn.attention(q, k, v, sel)
    assert spy.calls == {"shared_rows_attention": 1}
    monkeypatch.setitem(_compiled._state, "ops", None)
    torch.testing.assert_close(out, spattn.attention(q, k, v, sel), atol=1e-5, rtol=0)
    ref = spattn.attention(q.double(), k.double(), v.double(), sel, backend="reference")
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- the build cache (issue 17 item 3)
def _fake_sources(tmp_path, text):
    src = tmp_path / f"src_{abs(hash(text))}" / "a.cpp"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text(text)
    return [src]


def test_build_dir_is_keyed_by_sources_torch_and_python(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    a, a_again, b = (
        _fake_sources(tmp_path, "int a;"),
        _fake_sources(tmp_path, "int a;"),
        _fake_sources(tmp_path, "int b;"),
    )
    assert _compiled.build_dir(a) == _compiled.build_dir(a_again)
    assert _compiled.build_dir(a) != _compiled.build_dir(b)
    assert _compiled.build_dir(a).parent == tmp_path / "cache"
    key = _compiled.build_dir(a)
    monkeypatch.setattr(torch, "__version__", "0.0.0+other")
    assert _compiled.build_dir(a) != key
    monkeypatch.undo()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_compiled.sysconfig, "get_config_var", lambda name: "cpython-399-other")
    assert _compiled.build_dir(a) != key


class _FakeBuild:
    """Stands in for the C++ build: writes a library file, counts builds and loads."""

    def __init__(self, monkeypatch, seconds=0.0):
        import threading
        import time

        self.builds, self.loads, self.lock = 0, [], threading.Lock()

        def fake_load(name, sources, build_directory, **kwargs):
            time.sleep(seconds)
            with self.lock:
                self.builds += 1
            (_compiled.Path(build_directory) / f"{name}.so").write_bytes(b"\x7fELF fake library " * 100)

        import torch.utils.cpp_extension as cpp

        monkeypatch.setattr(cpp, "load", fake_load)
        monkeypatch.setattr(torch.ops, "load_library", lambda path: self.loads.append(path))


def test_damaged_library_is_rebuilt_never_loaded(tmp_path, monkeypatch, capsys):
    fake = _FakeBuild(monkeypatch)
    sources = _fake_sources(tmp_path, "int a;")
    directory = tmp_path / "cache" / "spattn_cpu_test"
    lib = _compiled.load_library(directory, sources)
    assert fake.builds == 1 and "building compiled CPU kernels, once" in capsys.readouterr().err
    assert _compiled.load_library(directory, sources) == lib and fake.builds == 1 and fake.loads == [str(lib)]
    for damage in (
        lambda: lib.write_bytes(lib.read_bytes()[:50]),  # truncated (SIGBUS when mapped)
        lambda: (directory / _compiled._STAMP).unlink(),  # interrupted before the stamp
        lambda: lib.write_bytes(b"\0" * len(lib.read_bytes())),
    ):  # same size, other bytes
        damage()
        assert _compiled._verified_library(directory) is None
        fake.loads.clear()
        _compiled.load_library(directory, sources)
        assert fake.loads == []  # the damaged file was not loaded: it was rebuilt (load() loads the new one)
    assert fake.builds == 4 and _compiled._verified_library(directory) == lib


def test_concurrent_first_uses_wait_on_one_build_threads(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    fake = _FakeBuild(monkeypatch, seconds=0.3)
    sources = _fake_sources(tmp_path, "int a;")
    directory = tmp_path / "cache" / "spattn_cpu_threads"
    with ThreadPoolExecutor(6) as pool:
        libs = list(pool.map(lambda _: _compiled.load_library(directory, sources), range(6)))
    assert fake.builds == 1 and len(set(libs)) == 1
    assert len(fake.loads) == 5  # the others load the verified library the first one built


_PROCESS_BUILD = """
import sys, time, pathlib
import torch, torch.utils.cpp_extension as cpp
from spattn import _compiled
def fake_load(name, sources, build_directory, **kwargs):
    with open(sys.argv[2], "a") as log:
        log.write("build\\n")
    time.sleep(1.0)
    (pathlib.Path(build_directory) / f"{name}.so").write_bytes(b"fake library")
cpp.load = fake_load
torch.ops.load_library = lambda path: None
_compiled.load_library(pathlib.Path(sys.argv[1]), [pathlib.Path(sys.argv[3])])
"""


@pytest.mark.slow
def test_concurrent_first_uses_wait_on_one_build_processes(tmp_path):
    import os
    import subprocess
    import sys

    sources = _fake_sources(tmp_path, "int a;")
    script, log = tmp_path / "build.py", tmp_path / "builds.log"
    script.write_text(_PROCESS_BUILD)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "cache" / "spattn_cpu_procs"), str(log), str(sources[0])],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    assert log.read_text().count("build") == 1
    assert sum("building compiled CPU kernels" in e for e in errors) == 1


@pytest.mark.slow
def test_truncated_real_library_is_rebuilt_in_a_fresh_process(tmp_path):
    """The real extension: a truncated cached .so (SIGBUS if mapped) is detected and rebuilt."""
    import os
    import subprocess
    import sys

    _ops()
    cache = tmp_path / "cache"
    directory = cache / _compiled.build_dir().name
    shutil.copytree(_compiled.build_dir(), directory)
    lib = directory / f"{directory.name}.so"
    lib.write_bytes(lib.read_bytes()[: lib.stat().st_size // 3])
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(cache), PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "from spattn import _compiled; assert _compiled.ops() is not None, "
            "_compiled.build_error(); print(_compiled.status()['built'])",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "building compiled CPU kernels" in run.stderr and run.stdout.strip() == "True"


def test_doctor_reports_build_and_paths(capsys, monkeypatch):
    from spattn.cli import main

    _ops()
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for text in (
        "build dir",
        str(_compiled.build_dir()),
        "built       yes",
        "loaded      yes",
        "BLAS",
        "threads",
        "block-sparse prefill forward",
        "decode",
    ):
        assert text in out, text
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/nonexistent/spattn-doctor-test")
    monkeypatch.setitem(_compiled._state, "ops", None)
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "built       no" in out and "/nonexistent/spattn-doctor-test" in out


def test_every_csrc_file_ships_with_the_package():
    """The compiled loops build from spattn/csrc at run time: every source and header must be package data."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["spattn"]
    files = [p.relative_to(root / "spattn").as_posix() for p in (root / "spattn" / "csrc").iterdir() if p.is_file()]
    assert files
    missing = [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)]
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"
