"""Needle-in-a-haystack and RULER-style long-context tasks, generated locally (no downloads).

Tasks (Hsieh et al. 2024, RULER; Kamradt 2023, NIAH; passkey retrieval of Mohtashami & Jaggi 2023):

* ``passkey`` — a 5-digit pass key hidden at a depth in repeated filler ("The grass is green...").
* ``niah_single`` — RULER's "One of the special magic numbers for {key} is: {value}." in prose.
* ``niah_multikey`` — ``keys`` such needles with different keys at spread depths; one is queried.
* ``variable_tracking`` — ``VAR ABCDE = 12345``, then chains ``VAR X = VAR Y`` (``hops`` per chain);
  the answer is every variable holding the value.
* ``common_words`` — a numbered word list: ``num_common`` words appear ``freq_common`` times, the
  others ``freq_rare`` times; the answer is the common words.

The haystack prose is the Python standard library's ``pydoc_data/topics.py`` (English reference
text shipped with every Python). Lengths are fitted RULER-style: a binary search over the number of
filler units so that ``count_tokens(prompt) <= length`` (pass the model tokenizer's counter).
Depth is the fraction of the context before the needle (0 = start, 1 = end); the needle is placed at
a sentence boundary. Scoring is RULER's ``string_match_all``.

Data layer: imports nothing from spattn.
"""

from __future__ import annotations

import numbers
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Optional

from .._checks import int_at_least

__all__ = [
    "NeedleSample",
    "TASKS",
    "make_task",
    "passkey",
    "niah_single",
    "niah_multikey",
    "variable_tracking",
    "common_words",
    "string_match_all",
    "prose_sentences",
    "prose_text",
    "word_count",
]

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_WORDS = (
    "apple river stone garden window candle silver mountain forest ocean thunder violet copper meadow lantern "
    "harbor pepper marble falcon willow crystal ember saddle orchard compass velvet glacier canyon sparrow timber "
    "quartz lagoon pebble meteor blossom cactus dolphin trumpet puzzle ribbon walnut anchor beacon cobalt dragon "
    "feather galaxy hammer igloo jasmine kettle lemon magnet nectar oyster parrot quiver rocket saffron tulip "
    "umbrella vessel wagon yarrow zephyr acorn bramble cider dune falcon grove hazel iris juniper kelp lotus"
).split()


def word_count(text: str) -> int:
    """Default token counter: whitespace-separated words (pass the model tokenizer's for real runs)."""
    return len(text.split())


@dataclass
class NeedleSample:
    """One task instance: ``prompt`` (ending with the answer prefix) and the ``answers`` to find."""

    task: str
    prompt: str
    answers: list[str]
    length: int  # target length in tokens
    depth: Optional[float] = None
    meta: dict = field(default_factory=dict)

    def score(self, prediction: str) -> float:
        return string_match_all(prediction, self.answers)


def string_match_all(prediction: str, answers: list[str]) -> float:
    """RULER's metric: the fraction of reference strings found (case-insensitive) in the prediction."""
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a str, got {type(prediction).__name__}")
    if isinstance(answers, str) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"answers must be a non-empty list of str, got {answers!r}")
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


@lru_cache(maxsize=1)
def prose_sentences() -> tuple[str, ...]:
    """English sentences from the stdlib's ``pydoc_data.topics`` (reStructuredText markup removed)."""
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    text = re.sub(r"[*`|]+", "", text)
    text = re.sub(r"\s+", " ", text)
    sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text)]
    return tuple(s for s in sents if 20 <= len(s) <= 400 and s.isascii())


def prose_text(n_sentences: int, start: int = 0) -> str:
    """``n_sentences`` consecutive prose sentences starting at ``start`` (wrapping around)."""
    sents = prose_sentences()
    return " ".join(sents[(start + i) % len(sents)] for i in range(n_sentences))


def _check(length: int, depth: Optional[float] = None, count_tokens=word_count, **counts: int) -> None:
    """Validate the common arguments; ``counts`` are ints that must be >= 1 (``hops=4``)."""
    int_at_least("length (tokens)", length, 64)
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0 <= depth <= 1):
        raise ValueError(f"depth must be a number in [0, 1], got {depth!r}")
    if not callable(count_tokens):
        raise TypeError(
            f"count_tokens must be a callable str -> int (a tokenizer's counter), got {type(count_tokens).__name__}"
        )
    for name, value in counts.items():
        int_at_least(name, value)


def _count(count_tokens: Callable[[str], int], text: str) -> int:
    n = count_tokens(text)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"count_tokens must return an int >= 0, returned {n!r}")
    return int(n)


def _fit(
    build: Callable[[int], str], count_tokens: Callable[[str], int], length: int, unit_tokens: int
) -> tuple[str, int]:
    """Largest number of filler units whose prompt fits in ``length`` tokens (binary search)."""
    lo, hi = 0, max(2, 2 * length // max(1, unit_tokens) + 2)
    limit = 64 * hi  # filler units of at least 1/32 token each would exceed length long before this
    while _count(count_tokens, build(hi)) <= length:
        hi *= 2
        if hi > limit:
            raise ValueError(
                f"count_tokens never counts more than length={length} tokens however long the prompt "
                f"({hi // 2} filler units); it must count the tokens of its argument"
            )
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _count(count_tokens, build(mid)) <= length:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0 and _count(count_tokens, build(0)) > length:
        raise ValueError(f"length={length} tokens is too short for this task's question and needles")
    return build(lo), lo


def _insert(units: list[str], needles: list[tuple[float, str]]) -> str:
    """Place each needle before unit ``round(depth * len(units))`` (a unit = a sentence or line)."""
    out = list(units)
    for depth, needle in sorted(needles, key=lambda x: -x[0]):
        out.insert(round(depth * len(units)), needle)
    return " ".join(out)


def _filler(kind: str, n: int, start: int) -> list[str]:
    if kind == "noise":
        return [NOISE] * n
    if kind == "essay":
        sents = prose_sentences()
        return [sents[(start + i) % len(sents)] for i in range(n)]
    raise ValueError(f"haystack must be 'noise' or 'essay', got {kind!r}")


def passkey(length: int, depth: float, count_tokens: Callable[[str], int] = word_count, seed: int = 0) -> NeedleSample:
    """Passkey retrieval (Mohtashami & Jaggi 2023): a 5-digit key in repeated noise at ``depth``."""
    _check(length, depth, count_tokens)
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    head = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n"
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    tail = "\nWhat is the pass key? The pass key is"

    def build(n):
        return head + _insert(_filler("noise", n, 0), [(depth, needle)]) + tail

    prompt, n = _fit(build, count_tokens, length, max(1, _count(count_tokens, NOISE)))
    return NeedleSample("passkey", prompt, [key], length, depth, {"units": n})


def _magic(rng: random.Random, used: set) -> tuple[str, str]:
    while True:
        key = f"{rng.choice(_WORDS)}-{rng.choice(_WORDS)}"
        if key not in used:
            used.add(key)
            return key, str(rng.randint(1_000_000, 9_999_999))


def _niah(task, length, depths, query_index, count_tokens, seed, haystack) -> NeedleSample:
    rng = random.Random(seed)
    used: set = set()
    pairs = [_magic(rng, used) for _ in depths]
    key, value = pairs[query_index]
    head = (
        "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the numbers afterwards.\n"
    )
    tail = (
        f"\nWhat is the special magic number for {key} mentioned in the provided text? "
        f"The special magic number for {key} mentioned in the provided text is"
    )
    needles = [(d, f"One of the special magic numbers for {k} is: {v}.") for d, (k, v) in zip(depths, pairs)]
    start = rng.randrange(len(prose_sentences()))

    def build(n):
        return head + _insert(_filler(haystack, n, start), needles) + tail

    prompt, n = _fit(build, count_tokens, length, 25 if haystack == "essay" else max(1, _count(count_tokens, NOISE)))
    return NeedleSample(task, prompt, [value], length, depths[query_index], {"units": n, "key": key})


def niah_single(
    length: int, depth: float, count_tokens: Callable[[str], int] = word_count, seed: int = 0, haystack: str = "essay"
) -> NeedleSample:
    """RULER niah_single: one word-key / 7-digit-number needle in prose (or ``haystack="noise"``)."""
    _check(length, depth, count_tokens)
    return _niah("niah_single", length, [depth], 0, count_tokens, seed, haystack)


def niah_multikey(
    length: int,
    depth: float,
    count_tokens: Callable[[str], int] = word_count,
    seed: int = 0,
    keys: int = 4,
    haystack: str = "essay",
) -> NeedleSample:
    """RULER niah_multikey_1: ``keys`` needles (distractors at other depths); the one at ``depth`` is queried."""
    _check(length, depth, count_tokens)
    int_at_least("keys", keys, 2)
    rng = random.Random(seed + 7919)
    depths = [depth] + [rng.random() for _ in range(keys - 1)]
    return _niah("niah_multikey", length, depths, 0, count_tokens, seed, haystack)


def variable_tracking(
    length: int, count_tokens: Callable[[str], int] = word_count, seed: int = 0, chains: int = 1, hops: int = 4
) -> NeedleSample:
    """RULER vt: chains ``VAR A = 12345. VAR B = VAR A. ...`` spread through noise; answer: the variables of chain 0."""
    _check(length, None, count_tokens, chains=chains, hops=hops)
    rng = random.Random(seed)
    names: set = set()

    def name():
        while True:
            n = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
            if n not in names:
                names.add(n)
                return n

    values = rng.sample(range(10000, 100000), chains)
    statements, answer = [], []
    for c in range(chains):
        vars_ = [name() for _ in range(hops + 1)]
        if c == 0:
            answer = vars_
        chain = [f"VAR {vars_[0]} = {values[c]}."] + [f"VAR {vars_[i + 1]} = VAR {vars_[i]}." for i in range(hops)]
        statements.append(chain)
    # increasing depths keep each chain in order
    placed = []
    for chain in statements:
        depths = sorted(rng.random() for _ in chain)
        placed += list(zip(depths, chain))
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
    tail = (
        f"\nQuestion: Find all variables that are assigned the value {values[0]} in the text above. "
        f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables are "
        f"assigned the value {values[0]}, they are:"
    )

    def build(n):
        return head + _insert(_filler("noise", n, 0), placed) + tail

    prompt, n = _fit(build, count_tokens, length, max(1, _count(count_tokens, NOISE)))
    return NeedleSample("variable_tracking", prompt, answer, length, None, {"units": n, "value": values[0]})


def common_words(
    length: int,
    count_tokens: Callable[[str], int] = word_count,
    seed: int = 0,
    num_common: int = 10,
    freq_common: int = 30,
    freq_rare: int = 3,
) -> NeedleSample:
    """RULER cwe: a numbered list where ``num_common`` words occur ``freq_common`` times and every other word
    ``freq_rare`` times; the length is fitted by the number of rare words."""
    _check(length, None, count_tokens, num_common=num_common, freq_common=freq_common, freq_rare=freq_rare)
    if not num_common < len(_WORDS) or freq_common <= freq_rare:
        raise ValueError(
            f"need num_common < {len(_WORDS)} and freq_common > freq_rare >= 1, got num_common={num_common}, "
            f"freq_common={freq_common}, freq_rare={freq_rare}"
        )
    rng = random.Random(seed)
    base = list(dict.fromkeys(_WORDS))
    vocab = list(dict.fromkeys(base + [f"{a}{b}" for a in base for b in base if a != b]))
    rng.shuffle(vocab)
    common, rare_pool = vocab[:num_common], vocab[num_common:]
    order_rng_seed = rng.randrange(1 << 30)
    head = "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n"
    tail = (
        f"\nQuestion: What are the {num_common} most common words in the above list? "
        f"Answer: The top {num_common} words that appear most often in the list are:"
    )

    def build(n):
        words = common * freq_common + rare_pool[:n] * freq_rare
        random.Random(order_rng_seed).shuffle(words)
        return head + " ".join(f"{i + 1}. {w}" for i, w in enumerate(words)) + tail

    prompt, n = _fit(build, count_tokens, length, 3 * freq_rare * max(1, _count(count_tokens, "12. word")))
    return NeedleSample("common_words", prompt, common, length, None, {"rare_words": n})


TASKS = {
    "passkey": passkey,
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "variable_tracking": variable_tracking,
    "common_words": common_words,
}
_DEPTH_TASKS = {"passkey", "niah_single", "niah_multikey"}


def make_task(
    task: str,
    length: int,
    depth: Optional[float] = None,
    count_tokens: Callable[[str], int] = word_count,
    seed: int = 0,
) -> NeedleSample:
    """Build one sample of ``task`` (see :data:`TASKS`); ``depth`` is used by the needle tasks (default 0.5)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    if task in _DEPTH_TASKS:
        return TASKS[task](length, 0.5 if depth is None else depth, count_tokens, seed)
    return TASKS[task](length, count_tokens, seed)
