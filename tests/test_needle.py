"""Local needle / RULER-style task generators."""

import re

import pytest

from spattn.data import needle


def chars4(text):  # a second, different token counter (about 4 characters per token)
    return len(text) // 4


@pytest.mark.parametrize("count", [needle.word_count, chars4])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_fits_and_places_needle(count, depth):
    s = needle.passkey(1000, depth, count, seed=3)
    assert count(s.prompt) <= 1000
    # one more filler unit would not fit: the length is used (RULER's binary search)
    assert count(s.prompt) > 1000 - 2 * count(needle.NOISE)
    key = s.answers[0]
    assert re.fullmatch(r"\d{5}", key) and s.prompt.count(key) == 2
    body = s.prompt[: s.prompt.rindex("\n")]
    pos = body.index(f"The pass key is {key}") / len(body)
    assert abs(pos - depth) < 0.05
    assert s.score(f" {key}.") == 1.0 and s.score("12") == 0.0
    assert needle.passkey(1000, depth, count, seed=3).prompt == s.prompt  # deterministic


def test_niah_single_and_multikey():
    s = needle.niah_single(800, 0.5, seed=1)
    assert needle.word_count(s.prompt) <= 800
    assert f"for {s.meta['key']} is: {s.answers[0]}." in s.prompt
    assert s.prompt.rstrip().endswith("is")
    m = needle.niah_multikey(800, 0.25, seed=2, keys=4)
    assert m.prompt.count("One of the special magic numbers for") == 4
    assert m.prompt.count(m.answers[0]) == 1 and m.meta["key"] in m.prompt.split("\n")[-1]
    sents = needle.prose_sentences()
    assert len(sents) > 1000 and all(s.isascii() for s in sents[:50])


def test_variable_tracking_chain_is_consistent():
    s = needle.variable_tracking(600, seed=4, chains=2, hops=3)
    value = s.meta["value"]
    assert len(s.answers) == 4
    # follow the chain in the text: each answer variable is assigned the previous one, in order
    assert f"VAR {s.answers[0]} = {value}." in s.prompt
    positions = [s.prompt.index(f"VAR {s.answers[0]} = {value}.")]
    for a, b in zip(s.answers, s.answers[1:]):
        positions.append(s.prompt.index(f"VAR {b} = VAR {a}."))
    assert positions == sorted(positions)
    assert needle.word_count(s.prompt) <= 600


def test_common_words_frequencies():
    s = needle.common_words(1500, seed=5, num_common=5, freq_common=20, freq_rare=2)
    body = s.prompt.split("\n")[1]
    words = re.findall(r"\d+\. (\w+)", body)
    counts = {w: words.count(w) for w in set(words)}
    assert sorted(w for w, c in counts.items() if c == 20) == sorted(s.answers)
    assert all(c == 2 for w, c in counts.items() if w not in s.answers)
    assert needle.word_count(s.prompt) <= 1500


def test_make_task_and_errors():
    for task in needle.TASKS:
        s = needle.make_task(task, 1000, seed=0)
        assert s.task == task and needle.word_count(s.prompt) <= 1000 and s.answers
    with pytest.raises(ValueError, match="unknown task"):
        needle.make_task("qa", 500)
    with pytest.raises(ValueError, match="depth"):
        needle.passkey(500, 1.5)
    with pytest.raises(ValueError, match="length"):
        needle.passkey(10, 0.5)
    with pytest.raises(ValueError, match="too short"):
        needle.niah_multikey(64, 0.5, keys=30)
    with pytest.raises(ValueError, match="keys"):
        needle.niah_multikey(500, 0.5, keys=1)
    with pytest.raises(ValueError):
        needle.string_match_all("x", [])
    assert needle.string_match_all("Alpha and BETA", ["alpha", "beta", "gamma"]) == pytest.approx(2 / 3)
