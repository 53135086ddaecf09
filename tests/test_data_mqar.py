"""MQAR generator (Zoology): targets checked by an independent scan, power-law gaps, determinism."""

import numpy as np
import pytest
import torch

from spattn.data import mqar


def _check_example(x, y, kv, vocab, random_fill):
    """Independent check: every query key's target is the value right after that key in the context."""
    x, y = x.tolist(), y.tolist()
    C = 2 * kv
    context = {x[j]: x[j + 1] for j in range(0, C, 2)}
    assert len(context) == kv, "keys in the context must be distinct"
    assert all(1 <= k < vocab // 2 for k in context) and all(vocab // 2 <= v < vocab for v in context.values())
    queried = []
    for t in range(len(x)):
        if y[t] == -100:
            continue
        assert t >= C and (t - C) % 2 == 0, f"target at a non-query position {t}"
        assert x[t] in context and y[t] == context[x[t]]
        queried.append(x[t])
    assert sorted(queried) == sorted(context), "each key is queried exactly once"
    if not random_fill:
        assert all(x[t] == 0 for t in range(C, len(x)) if y[t] == -100)


@pytest.mark.parametrize("seq_len,kv,vocab,fill", [(64, 4, 128, False), (128, 8, 8192, True), (40, 5, 50, False)])
def test_targets_are_values_of_earlier_keys(seq_len, kv, vocab, fill):
    ds = mqar.MQARDataset(50, seq_len=seq_len, kv_pairs=kv, vocab_size=vocab, seed=3, random_non_queries=fill)
    assert len(ds) == 50 and ds.vocab_size == vocab
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == torch.long and x.shape == (seq_len,) and y.shape == (seq_len,)
        assert int(x.min()) >= 0 and int(x.max()) < vocab
        _check_example(x, y, kv, vocab, fill)


def test_zoology_layout_example():
    x, y = mqar.generate(np.random.default_rng(0), 3, 16, 2, 12)
    for xi, yi in zip(x, y):
        _check_example(torch.tensor(xi), torch.tensor(yi), 2, 12, False)
        assert (yi != -100).sum() == 2


def test_random_fill_changes_only_blanks():
    a = mqar.generate(np.random.default_rng(5), 20, 64, 4, 256, random_non_queries=False)
    b = mqar.generate(np.random.default_rng(5), 20, 64, 4, 256, random_non_queries=True)
    assert np.array_equal(a[1], b[1])
    assert np.array_equal(a[0][a[0] != 0], b[0][a[0] != 0])
    assert (b[0][a[0] == 0] != 0).mean() > 0.9


def test_deterministic_by_seed_and_order_free():
    d1 = mqar.MQARDataset(20, seq_len=64, kv_pairs=4, vocab_size=256, seed=7)
    d2 = mqar.MQARDataset(20, seq_len=64, kv_pairs=4, vocab_size=256, seed=7)
    d3 = mqar.MQARDataset(20, seq_len=64, kv_pairs=4, vocab_size=256, seed=8)
    for i in reversed(range(20)):
        assert torch.equal(d1[i][0], d2[i][0]) and torch.equal(d1[i][1], d2[i][1])
    assert not all(torch.equal(d1[i][0], d3[i][0]) for i in range(20))
    assert not torch.equal(d1[0][0], d1[1][0])


@pytest.mark.parametrize("power_a", [0.01, 0.5])
def test_query_gaps_follow_power_law(power_a):
    # one query per example: its slot is a single draw from p[g] ∝ a (g+1)^(a-1)
    L, n = 64, 20000
    x, y = mqar.generate(np.random.default_rng(11), n, L, 1, 256, power_a=power_a)
    pos = np.nonzero(y != -100)[1]
    slots = (pos - 2) // 2
    emp = np.bincount(slots, minlength=31) / n
    g = np.arange(31)
    p = (g + 1.0) ** (power_a - 1.0)
    p /= p.sum()
    assert 0.5 * np.abs(emp - p).sum() < 0.03  # total variation; sampling noise is ~0.01
    assert 0.5 * np.abs(emp - 1 / 31).sum() > 0.1  # far from uniform
    # log-log slope of the frequencies ~ a - 1
    slope = np.polyfit(np.log(g[:16] + 1), np.log(emp[:16]), 1)[0]
    assert abs(slope - (power_a - 1)) < 0.15


def test_many_queries_favor_short_gaps():
    x, y = mqar.generate(np.random.default_rng(1), 2000, 256, 16, 8192)
    slots = (np.nonzero(y != -100)[1] - 32) // 2
    counts = np.bincount(slots, minlength=112)
    assert counts[:10].sum() > 2 * counts[-10:].sum()


def test_collate_and_accuracy():
    ds = mqar.MQARDataset(4, seq_len=32, kv_pairs=4, vocab_size=64)
    b = mqar.collate([ds[i] for i in range(4)])
    assert b["tokens"].shape == (4, 32) and b["target"].shape == (4, 32) and b["mask"].all()
    logits = torch.nn.functional.one_hot(b["target"].clamp_min(0), 64).float()
    assert mqar.accuracy(logits, b["target"]) == 1.0
    assert mqar.accuracy(torch.zeros(4, 32, 64), b["target"]) == 0.0


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(seq_len=63), "even"),
        (dict(kv_pairs=20), "seq_len must be >="),
        (dict(vocab_size=8), "distinct keys"),
        (dict(power_a=0.0), "power_a"),
        (dict(kv_pairs=2.5), "kv_pairs must be an int"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_config(kw, msg):
    args = dict(num_examples=2, seq_len=64, kv_pairs=4, vocab_size=256)
    args.update(kw)
    with pytest.raises((ValueError, TypeError), match=msg):
        mqar.MQARDataset(**args)


def test_index_out_of_range():
    with pytest.raises(IndexError):
        mqar.MQARDataset(2, seq_len=16, kv_pairs=2, vocab_size=64)[2]
