"""The benchmarks' one clock and one memory probe (spattn.bench.timing): which calls are timed, in
which order, and what is reported. A fake clock stands in for time.perf_counter: no timed assertions."""

import itertools

import pytest
import torch

import spattn.bench.timing as timing
from spattn.bench.timing import PeakMemory, memory_probe, time_call, time_interleaved, timed


@pytest.fixture
def clock(monkeypatch):
    """A fake ``time.perf_counter``: ``clock[0]`` is the time; calls advance it themselves."""
    now = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
    return now


def test_timed_returns_the_value_and_the_seconds(clock):
    def fn():
        clock[0] += 2.5
        return "out"

    assert timed(fn) == ("out", 2.5)


def test_time_call_repeats_until_the_median_settles(clock):
    durations = itertools.chain([0.0, 5.0, 1.0, 9.0], itertools.repeat(1.0))  # noisy, then steady

    def fn():
        clock[0] += next(durations)

    res = time_call(fn, warmup=1, repeat=3, max_repeat=50, rel_tol=0.05, memory=False)
    assert res["stable"] is True and res["median_s"] == 1.0 and 3 < len(res["times_s"]) < 50
    durations = itertools.cycle([1.0, 3.0])  # never settles: stops at max_repeat and says so
    res = time_call(fn, warmup=0, repeat=3, max_repeat=8, rel_tol=0.05, memory=False)
    assert len(res["times_s"]) == 8 and res["stable"] is False and res["spread"] > 0.05
    res = time_call(fn, warmup=0, repeat=3, max_repeat=100, rel_tol=0.05, budget_s=10.0, memory=False)
    assert len(res["times_s"]) < 100 and sum(res["times_s"]) >= 10.0  # the time budget ends it
    res = time_call(fn, warmup=0, repeat=2, memory=False)  # fixed repeats, as before
    assert len(res["times_s"]) == 2 and res["stable"] is None


def test_time_call_warms_up_then_times_in_order_with_before_untimed(clock):
    durations = iter([7.0, 6.0, 3.0, 1.0, 2.0, 4.0])  # two warm-ups, then four timed calls
    events = []

    def fn():
        events.append("call")
        clock[0] += next(durations)

    def before():  # e.g. a barrier: runs before every call, its time not counted
        events.append("before")
        clock[0] += 100.0

    res = time_call(fn, warmup=2, repeat=4, memory=False, before=before)
    assert events == ["before", "call"] * 6
    assert res["times_s"] == [3.0, 1.0, 2.0, 4.0] and res["median_s"] == 2.5
    assert res["first_s"] == 7.0 and res["peak_bytes"] is None
    # without warm-up the first timed call is the first call
    durations = iter([5.0, 1.0, 3.0])
    events.clear()
    res = time_call(fn, warmup=0, repeat=3, memory=False)
    assert events == ["call"] * 3 and res["first_s"] == 5.0 and res["median_s"] == 3.0


def test_time_call_memory_is_one_more_untimed_call(clock):
    calls = []

    def fn():
        calls.append(1)
        clock[0] += 1.0

    res = time_call(fn, warmup=1, repeat=3, memory=True)
    assert len(calls) == 1 + 3 + 1 and len(res["times_s"]) == 3
    assert res["peak_bytes"] is None if not memory_probe().available else res["peak_bytes"] >= 0


def test_time_interleaved_takes_turns_after_each_ones_warm_up(clock):
    order = []
    step = {"a": 1.0, "b": 10.0}

    def make(name):
        def fn():
            order.append(name)
            clock[0] += step[name]
            step[name] += 1.0  # each call a step later: the times show the order they ran in

        return fn

    res = time_interleaved({"a": make("a"), "b": make("b")}, warmup=2, repeat=3)
    assert order == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert res["a"]["times_s"] == [3.0, 4.0, 5.0] and res["a"]["median_s"] == 4.0 and res["a"]["first_s"] == 1.0
    assert res["b"]["times_s"] == [12.0, 13.0, 14.0] and res["b"]["median_s"] == 13.0
    assert res["a"]["peak_bytes"] is None and set(res["a"]) == set(time_call(make("a"), repeat=1, memory=False))


def test_peak_memory_is_non_negative_and_sees_a_large_allocation():
    probe = PeakMemory()
    if not probe.available:
        assert probe.measure(lambda: None) is None
        pytest.skip("/proc/self/clear_refs is not writable here: memory unmeasurable")
    assert probe.measure(lambda: None) >= 0
    size = 64 * 2**20
    assert probe.measure(lambda: torch.ones(size // 4).sum()) >= size // 2  # 64 MiB touched: at least half seen
