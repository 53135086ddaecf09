"""Byte-level LM corpus: split by file (disjoint, deterministic), windows, determinism."""

import zlib

import pytest
import torch

from spattn.data import corpus


@pytest.fixture
def tree(tmp_path):
    for i in range(60):
        d = tmp_path / f"pkg{i % 4}"
        d.mkdir(exist_ok=True)
        (d / f"mod{i}.py").write_bytes(f"# module {i}\n".encode() + bytes(range(256)) * (i % 3 + 1))
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text("x = 1\n")
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "other.py").write_text("y = 2\n")
    (tmp_path / "notes.txt").write_text("not python")
    return tmp_path


def test_real_stdlib_files_and_split():
    files = corpus.corpus_files()
    assert "pydoc_data/topics.py" in files and "os.py" in files
    assert not any(f.startswith("test/") or "/tests/" in f for f in files)
    train, val = corpus.split_files(files, "train"), corpus.split_files(files, "val")
    assert set(train).isdisjoint(val) and sorted(train + val) == files
    assert 0.02 < len(val) / len(files) < 0.09


def test_split_by_file_disjoint_and_deterministic(tree):
    files = corpus.corpus_files(tree)
    assert "tests/test_x.py" not in files and "site-packages/other.py" not in files and len(files) == 60
    assert "tests/test_x.py" in corpus.corpus_files(tree, include_tests=True)
    tr = corpus.ByteLMDataset("train", seq_len=32, root=tree, val_percent=20)
    va = corpus.ByteLMDataset("val", seq_len=32, root=tree, val_percent=20)
    assert set(tr.files).isdisjoint(va.files) and sorted(tr.files + va.files) == files
    assert all((zlib.crc32(f.encode()) % 100 < 20) for f in va.files)
    # the split does not depend on the order or the set of other files
    assert corpus.split_files(list(reversed(files)), "val", 20) == list(reversed(va.files))
    assert corpus.split_files(files[:10], "val", 20) == [f for f in va.files if f in files[:10]]
    # the data is the concatenation of the split's files in sorted order
    expected = b"".join((tree / f).read_bytes() for f in tr.files)
    assert tr.data.dtype == torch.uint8 and bytes(tr.data.numpy()) == expected


def test_random_windows_deterministic_and_shifted(tree):
    a = corpus.ByteLMDataset("train", seq_len=50, num_examples=20, seed=4, root=tree, val_percent=20)
    b = corpus.ByteLMDataset("train", seq_len=50, num_examples=20, seed=4, root=tree, val_percent=20)
    c = corpus.ByteLMDataset("train", seq_len=50, num_examples=20, seed=5, root=tree, val_percent=20)
    assert len(a) == 20
    for i in reversed(range(20)):
        x, y = a[i]
        assert x.shape == y.shape == (50,) and x.dtype == torch.long
        assert torch.equal(x[1:], y[:-1])
        s = a.start(i)
        assert torch.equal(x, a.data[s : s + 50].long()) and torch.equal(y, a.data[s + 1 : s + 51].long())
        assert torch.equal(x, b[i][0])
    assert len({a.start(i) for i in range(20)}) > 15
    assert [a.start(i) for i in range(20)] != [c.start(i) for i in range(20)]


def test_sequential_windows(tree):
    d = corpus.ByteLMDataset("train", seq_len=64, sampling="sequential", root=tree, val_percent=20)
    n = d.data.numel()
    assert len(d) == (n - 1) // 64
    assert [d.start(i) for i in range(3)] == [0, 64, 128]
    assert d.start(len(d) - 1) + 65 <= n
    spread = corpus.ByteLMDataset("val", seq_len=16, num_examples=5, root=tree, val_percent=20)
    assert spread.sampling == "sequential"
    starts = [spread.start(i) for i in range(5)]
    assert starts[0] == 0 and starts[-1] + 17 <= spread.data.numel() and starts[-1] > spread.data.numel() // 2
    b = corpus.collate([d[0], d[1]])
    assert b["tokens"].shape == (2, 64) and b["mask"].all() and torch.equal(b["target"][0], d[0][1])


def test_errors(tree, tmp_path):
    with pytest.raises(ValueError, match="split"):
        corpus.ByteLMDataset("dev", root=tree)
    with pytest.raises(ValueError, match="sampling"):
        corpus.ByteLMDataset("train", root=tree, sampling="shuffled")
    with pytest.raises(ValueError, match="fewer than seq_len"):
        corpus.ByteLMDataset("train", seq_len=10**7, root=tree)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        corpus.ByteLMDataset("train", root=tmp_path / "missing")
    with pytest.raises(TypeError, match="seq_len"):
        corpus.ByteLMDataset("train", seq_len=3.0, root=tree)
