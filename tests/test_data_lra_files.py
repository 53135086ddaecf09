"""LRA release-file readers, on small files of the official formats written by the tests."""

import os
import pickle

import numpy as np
import pytest

from spattn.data import lra_files


# ------------------------------------------------------------------------------------------------ text


def _acl(root, n=3):
    for split in ("train", "test"):
        for lab in ("pos", "neg"):
            d = root / "aclImdb" / split / lab
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"{i}_7.txt").write_text(f"{split} {lab} review {i} <br />caf\u00e9")


def test_text_acl_tree(tmp_path):
    _acl(tmp_path)
    s = lra_files.load_text(tmp_path, max_len=20)
    assert len(s.train) == 6 and len(s.val) == 6 and s.val is s.test  # LRA: val = test
    assert (s.vocab_size, s.num_classes) == (256, 2)
    labels = sorted(int(s.train[i][1]) for i in range(6))
    assert labels == [0, 0, 0, 1, 1, 1]
    x, y = s.train[0]
    text = "train neg review 0 <br />caf\u00e9".encode()
    assert x.tolist() == list(text[:20]) and y == 0
    full = lra_files.load_text(tmp_path / "aclImdb", max_len=1000)
    assert full.train[0][0].tolist() == list(text)


def test_text_tsv_and_collate(tmp_path):
    (tmp_path / "imdb.train.tsv").write_text("1\tgreat\\tfilm\n0\tbad\n\n")
    (tmp_path / "imdb.test.tsv").write_text("0.0\tmeh\\nno\n")
    s = lra_files.load_text(tmp_path)
    assert bytes(s.train[0][0].tolist()) == b"great\tfilm" and s.train[0][1] == 1
    assert bytes(s.test[0][0].tolist()) == b"meh\nno" and s.test[0][1] == 0
    b = s.collate([s.train[0], s.train[1]])
    assert b["tokens"].shape == (2, 10) and b["mask"].sum(1).tolist() == [10, 3]
    assert b["target"].tolist() == [1, 0]


def test_text_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="aclImdb"):
        lra_files.load_text(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        lra_files.load_text(tmp_path / "nope")
    (tmp_path / "imdb.train.tsv").write_text("1\tok\nno tab here\n")
    (tmp_path / "imdb.test.tsv").write_text("1\tok\n")
    with pytest.raises(ValueError, match=r"imdb\.train\.tsv, line 2"):
        lra_files.load_text(tmp_path)
    (tmp_path / "imdb.train.tsv").write_text("3\tok\n")
    with pytest.raises(ValueError, match="label '3'"):
        lra_files.load_text(tmp_path)


# ------------------------------------------------------------------------------------------- retrieval


def _aan(d, rows):
    d.mkdir(parents=True, exist_ok=True)
    for s in ("train", "eval", "test"):
        (d / f"new_aan_pairs.{s}.tsv").write_text("".join("\t".join(r) + "\n" for r in rows))


def test_retrieval_pairs(tmp_path):
    rows = [("1.0", "a1", "b1", "first doc", "second doc, longer"), ("0", "a2", "b2", "x" * 50, 'quote " inside')]
    _aan(tmp_path / "lra_release" / "tsv_data", rows)
    s = lra_files.load_retrieval(tmp_path, max_len=12)
    assert len(s.train) == len(s.val) == len(s.test) == 2
    t1, t2, y = s.train[0]
    assert bytes(t1.tolist()) == b"first doc" and bytes(t2.tolist()) == b"second doc, " and y == 1
    assert s.train[1][0].numel() == 12 and bytes(s.train[1][1].tolist()) == b'quote " insi' and s.train[1][2] == 0
    b = s.collate([s.train[0], s.train[1]])
    assert b["tokens"].shape == (2, 12) and b["tokens2"].shape == (2, 12)
    assert b["mask"].sum(1).tolist() == [9, 12] and b["mask2"].sum(1).tolist() == [12, 12]
    assert b["target"].tolist() == [1, 0]


def test_retrieval_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="new_aan_pairs.train.tsv"):
        lra_files.load_retrieval(tmp_path)
    _aan(tmp_path, [("1", "a", "b", "only four")])
    with pytest.raises(ValueError, match=r"new_aan_pairs\.train\.tsv, line 1: expected 5"):
        lra_files.load_retrieval(tmp_path)
    _aan(tmp_path, [("yes", "a", "b", "t1", "t2")])
    with pytest.raises(ValueError, match="not a number"):
        lra_files.load_retrieval(tmp_path)


# ----------------------------------------------------------------------------------------------- image


def _cifar(d, n=10, seed=0):
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        data[0, :] = 0  # a black image: pixel 0 is data
        labels = rng.integers(0, 10, size=n).tolist()
        with open(d / name, "wb") as fh:
            pickle.dump(
                {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": [b"x.png"] * n}, fh
            )
        batches[name] = (data, labels)
    return batches


def test_image_grayscale_splits_and_mask(tmp_path):
    batches = _cifar(tmp_path / "cifar-10-batches-py")
    s = lra_files.load_image(tmp_path)
    assert (len(s.train), len(s.val), len(s.test)) == (45, 5, 10) and (s.vocab_size, s.num_classes) == (256, 10)
    data, labels = batches["data_batch_1"]
    x, y = s.train[3]
    assert x.shape == (1024,) and y == labels[3]
    r, g, b = data[3, :1024], data[3, 1024:2048], data[3, 2048:]
    grey = np.clip(np.round(0.2989 * r.astype(float) + 0.5870 * g + 0.1140 * b), 0, 255)
    assert x.tolist() == grey.astype(int).tolist()  # row-major pixels: same order as each CIFAR channel plane
    v5, _ = batches["data_batch_5"]
    assert (
        s.val[0][0].tolist() == lra_files.to_grayscale(v5[5].reshape(3, 32, 32).transpose(1, 2, 0)).reshape(-1).tolist()
    )
    black = s.train[0][0]
    assert (black == 0).all()
    batch = s.collate([s.train[0], s.train[1]])
    assert batch["mask"].all()  # zero pixels are never treated as padding
    assert batch["target"].tolist() == [labels[0], labels[1]]


def test_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        lra_files.load_image(tmp_path)
    d = tmp_path / "cifar-10-batches-py"
    _cifar(d)
    (d / "data_batch_3").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="data_batch_3: not a CIFAR-10 python batch"):
        lra_files.load_image(tmp_path)
    with open(d / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(ValueError, match=r"data_batch_3: expected data uint8 \[n, 3072\]"):
        lra_files.load_image(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    with open(d / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": Evil()}, fh)
    with pytest.raises(ValueError, match="refusing to load"):
        lra_files.load_image(tmp_path)
    with pytest.raises(ValueError, match="max_len"):
        lra_files.load_image(tmp_path, max_len=512)


# --------------------------------------------------------------------------------------------- listops


def test_listops_release_tsv(tmp_path):
    d = tmp_path / "listops-1000"
    d.mkdir()
    for s in ("train", "val", "test"):
        (d / f"basic_{s}.tsv").write_text("Source\tTarget\n( ( ( [MAX 2 ) 9 ) X )\t9\n( ( [SM 4 ) 7 ) ]\t1\n")
    s = lra_files.load_listops(tmp_path)
    assert len(s.train) == 2 and s.train[0][1] == 9 and s.train[1][1] == 1
    from spattn.data import listops

    assert listops.to_text(s.train[0][0]) == "[MAX 2 9 ]" and listops.evaluate(s.test[1][0]) == 1
    (d / "basic_val.tsv").write_text("Source\tLabel\n")
    with pytest.raises(ValueError, match="header"):
        lra_files.load_listops(tmp_path)


# ------------------------------------------------------------------------------------------ pathfinder


def _write_png(path, img, filters):
    """A minimal greyscale PNG encoder using every row filter type (independent of the reader)."""
    import struct
    import zlib

    h, w = img.shape
    raw = bytearray()
    prev = [0] * w
    for y in range(h):
        f = filters[y % len(filters)]
        row = [int(v) for v in img[y]]
        out = []
        for x in range(w):
            a = row[x - 1] if x else 0
            b = prev[x]
            c = prev[x - 1] if x else 0
            if f == 0:
                pred = 0
            elif f == 1:
                pred = a
            elif f == 2:
                pred = b
            elif f == 3:
                pred = (a + b) // 2
            else:
                p = a + b - c
                pred = min((abs(p - a), 0, a), (abs(p - b), 1, b), (abs(p - c), 2, c))[2]
            out.append((row[x] - pred) % 256)
        raw += bytes([f] + out)
        prev = row

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(bytes(raw))) + chunk(b"IEND", b"")
    path.write_bytes(png)


def test_png_reader_all_filters(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(9, 7), dtype=np.uint8)
    _write_png(tmp_path / "a.png", img, filters=[0, 1, 2, 3, 4])
    assert np.array_equal(lra_files.read_png_gray(tmp_path / "a.png"), img)
    (tmp_path / "b.png").write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match="b.png: not a PNG"):
        lra_files.read_png_gray(tmp_path / "b.png")


def test_pathfinder_release_layout(tmp_path):
    base = tmp_path / "lra_release" / "pathfinder32" / "curv_contour_length_14"
    (base / "imgs" / "0").mkdir(parents=True)
    (base / "metadata").mkdir()
    rng = np.random.default_rng(1)
    lines, expect = [], []
    for i in range(11):
        img = rng.integers(0, 256, size=(32, 32), dtype=np.uint8)
        if i == 4:
            img[:] = 0  # an empty image, dropped as in LRA
        img[0, 0] = 0
        _write_png(base / "imgs" / "0" / f"sample_{i}.png", img, filters=[i % 5])
        lines.append(f"imgs/0 sample_{i}.png {i} {i % 2} 1.0 14 4 2 0.5 1 1")
        if i != 4:
            expect.append((img.reshape(-1), i % 2))
    (base / "metadata" / "0.npy").write_text("\n".join(lines) + "\n")
    s = lra_files.load_pathfinder(tmp_path, 32)
    assert (len(s.train), len(s.val), len(s.test)) == (8, 1, 1)
    got = [s.train[i] for i in range(8)] + [s.val[0], s.test[0]]
    for (x, y), (img, lab) in zip(got, expect):
        assert x.tolist() == img.tolist() and y == lab
    assert s.collate(got[:2])["mask"].all()
    with pytest.raises(FileNotFoundError, match="metadata"):
        lra_files.load_pathfinder(tmp_path, 64)
    with pytest.raises(ValueError, match="too short"):
        lra_files.load_pathfinder(tmp_path, 32, max_len=1000)
    (base / "metadata" / "0.npy").write_text("imgs/0 sample_0.png\n")
    with pytest.raises(ValueError, match=r"0\.npy, line 1"):
        lra_files.load_pathfinder(tmp_path, 32)
