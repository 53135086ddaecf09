"""Pathfinder: labels checked by an independent flood fill on the rendered pixels; determinism; dataset."""

from collections import deque

import numpy as np
import pytest
import torch

from spattn.data import pathfinder as pf


def _components(img: np.ndarray, link: int) -> np.ndarray:
    """Label the lit pixels (value > 0); two lit pixels touch when their Chebyshev distance is <= link."""
    R = img.shape[0]
    comp = np.full(img.shape, -1, dtype=np.int64)
    n = 0
    for sy in range(R):
        for sx in range(R):
            if img[sy, sx] == 0 or comp[sy, sx] >= 0:
                continue
            comp[sy, sx] = n
            todo = deque([(sy, sx)])
            while todo:
                y, x = todo.popleft()
                for ny in range(max(0, y - link), min(R, y + link + 1)):
                    for nx in range(max(0, x - link), min(R, x + link + 1)):
                        if img[ny, nx] > 0 and comp[ny, nx] < 0:
                            comp[ny, nx] = n
                            todo.append((ny, nx))
            n += 1
    return comp


def _check_labels(images, labels, info):
    link = info["link"]
    for img, label, markers, placed in zip(images, labels, info["markers"], info["distractors"]):
        comp = _components(img, link)
        (y0, x0), (y1, x1) = np.round(markers).astype(int)
        assert img[y0, x0] > 0 and img[y1, x1] > 0, "marker centres must be lit"
        assert (comp[y0, x0] == comp[y1, x1]) == (label == 1)
        # every contour is one component: two targets plus the distractors that were placed
        assert comp.max() + 1 == 2 + placed
        # each marker sits on a contour, not alone: its component is larger than a marker disc
        for y, x in ((y0, x0), (y1, x1)):
            assert (comp == comp[y, x]).sum() > 20


def test_labels_match_flood_fill_32():
    images, labels, info = pf.generate(40, seed=0, cfg=pf.config_for(32), return_info=True)
    assert images.shape == (40, 32, 32) and images.dtype == np.uint8
    assert 8 <= labels.sum() <= 32
    assert info["link"] == 2 and info["distractors"].sum() > 0
    _check_labels(images, labels, info)


def test_labels_match_flood_fill_64_easy():
    images, labels, info = pf.generate(8, seed=3, cfg=pf.config_for(64, "easy"), return_info=True)
    assert images.shape == (8, 64, 64)
    _check_labels(images, labels, info)


def test_labels_match_flood_fill_path_x_128():
    images, labels, info = pf.generate(4, seed=0, cfg=pf.config_for(128, "easy"), return_info=True)
    assert images.shape == (4, 128, 128) and info["link"] == 6
    _check_labels(images, labels, info)


def test_dashes_need_the_link_radius():
    # the test above is not trivial: with plain 8-connectivity the dashed targets fall apart
    images, labels, info = pf.generate(12, seed=1, cfg=pf.config_for(32), return_info=True)
    pieces = [_components(img, 1).max() + 1 for img in images]
    assert all(p > 2 + d for p, d in zip(pieces, info["distractors"]))


def test_deterministic_by_seed():
    a = pf.generate(6, seed=5, cfg=pf.config_for(32, "easy"))
    b = pf.generate(6, seed=5, cfg=pf.config_for(32, "easy"))
    c = pf.generate(6, seed=6, cfg=pf.config_for(32, "easy"))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_dataset_tokens_cache_and_collate(tmp_path):
    ds = pf.PathfinderDataset(num_examples=6, seed=2, difficulty="easy", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("pathfinder32-*.npz"))) == 1
    again = pf.PathfinderDataset(num_examples=6, seed=2, difficulty="easy", cache_dir=tmp_path)
    x, y = ds[0]
    assert x.dtype == torch.long and x.shape == (1024,) and y in (0, 1)
    assert torch.equal(x, torch.from_numpy(ds.images[0].reshape(-1).astype(np.int64)))
    assert torch.equal(again[5][0], ds[5][0])
    assert (x == 0).any()  # black pixels are data ...
    b = pf.collate([ds[i] for i in range(6)])
    assert b["tokens"].shape == (6, 1024) and b["mask"].all()  # ... and never masked
    assert ds.vocab_size == 256 and ds.num_classes == 2


def test_config_errors():
    with pytest.raises(ValueError, match="resolution"):
        pf.config_for(48)
    with pytest.raises(ValueError, match="difficulty"):
        pf.config_for(32, "medium")
    with pytest.raises(ValueError, match="paddle_length"):
        pf.config_for(32, paddle_length=-1.0)
    with pytest.raises(RuntimeError, match="too small"):
        pf.generate(2, cfg=pf.config_for(32, contour_length=60, max_target_tries=3))
