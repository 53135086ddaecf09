"""LRA ListOps: labels checked by an independent recursive evaluator, determinism, bounds, cache."""

import statistics
import warnings

import numpy as np
import pytest
import torch

from spattn.data import listops

SMALL = dict(min_len=20, max_len=80, max_depth=6, max_args=5)


def _eval_text(text: str) -> int:
    """Independent evaluator: recursive descent over the LRA source words."""
    words = text.split()
    funcs = {
        "[MIN": min,
        "[MAX": max,
        "[SM": lambda a: sum(a) % 10,
        "[MED": lambda a: int(statistics.median(a)),
    }

    def parse(i):
        w = words[i]
        if w.isdigit():
            return int(w), i + 1
        assert w in funcs, w
        args, i = [], i + 1
        while words[i] != "]":
            v, i = parse(i)
            args.append(v)
        assert len(args) >= 2
        return funcs[w](args), i + 1

    value, end = parse(0)
    assert end == len(words)
    return value


def test_labels_match_independent_evaluator(tmp_path):
    ds = listops.ListOpsDataset("train", num_examples=150, seed=1, cache_dir=tmp_path, **SMALL)
    assert len(ds) == 150
    ops_seen = set()
    for i in range(len(ds)):
        tokens, label = ds[i]
        assert tokens.dtype == torch.long and 0 <= label <= 9
        text = listops.to_text(tokens)
        assert _eval_text(text) == label == listops.evaluate(tokens)
        ops_seen |= {w for w in text.split() if w.startswith("[")}
    assert ops_seen == set(listops.OPERATORS)


def test_length_bounds_depth_and_args(tmp_path):
    ds = listops.ListOpsDataset("val", num_examples=100, seed=2, cache_dir=tmp_path, **SMALL)
    assert ((ds.lengths > 20) & (ds.lengths < 80)).all()
    for i in range(len(ds)):
        words = listops.to_text(ds[i][0]).split()
        depth, max_d, counts = 0, 0, []
        for w in words:  # nesting depth of operators <= max_depth - 1 (leaves sit at max_depth)
            if w.startswith("["):
                depth += 1
                counts.append(0)
                max_d = max(max_d, depth)
            elif w == "]":
                depth -= 1
                assert 2 <= counts.pop() <= 5
                if counts:
                    counts[-1] += 1
            elif counts:
                counts[-1] += 1
        assert max_d <= 5


def test_deterministic_by_seed_and_splits_disjoint(tmp_path):
    a = listops.generate(40, seed=5, split="train", **SMALL)
    b = listops.generate(40, seed=5, split="train", **SMALL)
    c = listops.generate(40, seed=6, split="train", **SMALL)
    assert a == b and a[0] != c[0]
    splits = {s: {tuple(x) for x in listops.generate(200, seed=5, split=s, **SMALL)[0]} for s in listops.SPLITS}
    assert all(len(v) == 200 for v in splits.values())  # de-duplicated within a split
    assert (
        not (splits["train"] & splits["val"])
        and not (splits["train"] & splits["test"])
        and not (splits["val"] & splits["test"])
    )


def test_cache_reused_and_corrupt_file_regenerated(tmp_path, monkeypatch):
    ds = listops.ListOpsDataset("test", num_examples=30, seed=3, cache_dir=tmp_path, **SMALL)
    files = list(tmp_path.glob("listops-*.npz"))
    assert len(files) == 1

    def boom(*a, **k):
        raise AssertionError("should have loaded from the cache")

    monkeypatch.setattr(listops, "generate", boom)
    again = listops.ListOpsDataset("test", num_examples=30, seed=3, cache_dir=tmp_path, **SMALL)
    assert all(torch.equal(ds[i][0], again[i][0]) and ds[i][1] == again[i][1] for i in range(30))
    monkeypatch.undo()

    files[0].write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match="corrupt"):
        fixed = listops.ListOpsDataset("test", num_examples=30, seed=3, cache_dir=tmp_path, **SMALL)
    assert all(torch.equal(ds[i][0], fixed[i][0]) for i in range(30))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        listops.ListOpsDataset("test", num_examples=30, seed=3, cache_dir=tmp_path, **SMALL)


def test_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SPATTN_CACHE", str(tmp_path / "env"))
    listops.ListOpsDataset("val", num_examples=5, seed=0, **SMALL)
    assert len(list((tmp_path / "env").glob("listops-*.npz"))) == 1


def test_collate_mask_from_lengths_and_majority(tmp_path):
    ds = listops.ListOpsDataset("train", num_examples=8, seed=0, use_cache=False, **SMALL)
    b = listops.collate([ds[i] for i in range(8)])
    assert b["tokens"].shape == (8, int(ds.lengths.max())) and b["target"].shape == (8,)
    assert torch.equal(b["mask"].sum(1), torch.as_tensor(ds.lengths))
    assert (b["tokens"][~b["mask"]] == listops.PAD_ID).all() and (b["tokens"][b["mask"]] != listops.PAD_ID).all()
    assert listops.majority_accuracy([0, 9, 9, 3]) == 0.5
    assert ds.majority_accuracy == np.bincount(ds.labels).max() / 8


def test_text_roundtrip_lra_format():
    ids = listops.from_text("( ( ( [MAX 2 ) 9 ) X )")
    assert listops.to_text(ids) == "[MAX 2 9 ]" and listops.evaluate(ids) == 9
    with pytest.raises(ValueError, match="unknown ListOps token"):
        listops.from_text("[FOO 1 ]")


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(split="dev"), "split"),
        (dict(min_len=50, max_len=51), "min_len"),
        (dict(max_args=1), "max_args"),
        (dict(num_examples=-1), "num_examples"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_bad_config(kw, msg):
    args = dict(split="train", num_examples=2, use_cache=False, **SMALL)
    args.update(kw)
    with pytest.raises((ValueError, TypeError), match=msg):
        listops.ListOpsDataset(**args)
