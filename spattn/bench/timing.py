"""The one clock and the one memory probe of spattn's benchmarks.

Every time a benchmark reports (``spattn bench``, ``spattn longctx``, ``spattn train``'s step
times, the scripts under ``benchmarks/``) is read by :func:`timed`; every peak memory by
:class:`PeakMemory`. The rest composes them:

* :func:`time_call`: one callable, ``warmup`` untimed calls, then ``repeat`` timed ones (more, up
  to ``max_repeat``, until the median settles); the median, the spread, and the peak memory of one
  more call.
* :func:`time_interleaved`: several callables taking turns, one call of each per round, so that
  machine noise hits them alike; fits steps that must each run once, in order (training steps).
* one long call timed once (``generate()``, a prefill): ``value, seconds = timed(fn)``, after the
  caller's own warm-up.

**Clock**: wall time, ``time.perf_counter``. **Peak memory** (Linux): free heap pages are returned to
the OS (``malloc_trim``) and the kernel's resident-set high-water mark is reset (``echo 5 >
/proc/self/clear_refs``); the call's peak is ``VmHWM - VmRSS`` read around it, i.e. the extra
resident memory it needed on top of what was already allocated. Where ``/proc/self/clear_refs``
cannot be written (macOS, some containers) memory is None.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
import statistics
import time
from typing import Any, Callable, Mapping, Optional, Sequence

__all__ = ["timed", "time_call", "time_interleaved", "PeakMemory", "memory_probe"]


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()``'s return value and its wall time in seconds: the one place benchmarks read the clock."""
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


class PeakMemory:
    """Extra resident memory of a call, via the Linux RSS high-water mark (see module docstring)."""

    def __init__(self) -> None:
        self.available = False
        self._trim = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._read()
            self.available = True
        except (OSError, ValueError, AttributeError):
            return
        libc_name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(libc_name) if libc_name else None
            self._trim = getattr(libc, "malloc_trim", None)
        except OSError:
            self._trim = None

    @staticmethod
    def _read() -> tuple[int, int]:
        text = open("/proc/self/status").read()
        rss = int(re.search(r"VmRSS:\s+(\d+)", text).group(1))
        hwm = int(re.search(r"VmHWM:\s+(\d+)", text).group(1))
        return rss * 1024, hwm * 1024

    def start(self) -> Optional[int]:
        if not self.available:
            return None
        gc.collect()
        if self._trim is not None:
            self._trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return self._read()[0]

    def stop(self, rss_before: Optional[int]) -> Optional[int]:
        if rss_before is None:
            return None
        return max(0, self._read()[1] - rss_before)

    def measure(self, fn: Callable[[], Any]) -> Optional[int]:
        """Bytes of resident memory ``fn()`` needed above what was resident before it (None if unmeasurable)."""
        before = self.start()
        fn()
        return self.stop(before)


_PROBE: Optional[PeakMemory] = None


def memory_probe() -> PeakMemory:
    """The process's :class:`PeakMemory` (built on first use)."""
    global _PROBE
    if _PROBE is None:
        _PROBE = PeakMemory()
    return _PROBE


def time_call(
    fn: Callable[[], Any],
    *,
    warmup: int = 1,
    repeat: int = 5,
    memory: bool = True,
    max_repeat: Optional[int] = None,
    rel_tol: float = 0.05,
    budget_s: Optional[float] = None,
    before: Optional[Callable[[], Any]] = None,
) -> dict[str, Any]:
    """Median wall time of ``fn()`` after ``warmup`` calls; peak extra RSS of one more call when ``memory``.

    Times ``repeat`` calls; with ``max_repeat > repeat`` it goes on (up to ``max_repeat`` calls, and
    while the timed calls took less than ``budget_s`` in total) until the median is stable: the
    interquartile range of the timings is at most ``rel_tol`` of their median. ``before``, if given,
    runs untimed before every call of ``fn`` (e.g. ``torch.distributed.barrier``, so that ranks start
    each call together; with ``max_repeat`` unset every rank makes the same number of calls).

    Returns ``{"median_s", "times_s", "first_s", "peak_bytes", "spread", "stable"}``: ``first_s`` is
    the first call's time (including any compilation); ``peak_bytes`` None when unmeasurable or not
    asked for; ``spread`` the relative interquartile range; ``stable`` whether it met ``rel_tol``
    (None when fewer than 3 timed calls make no spread).
    """

    def call() -> float:
        if before is not None:
            before()
        return timed(fn)[1]

    first = None
    for i in range(max(warmup, 0)):
        seconds = call()
        if i == 0:
            first = seconds
    times: list[float] = []
    limit = max(repeat, 1, max_repeat or 0)
    while len(times) < limit:
        times.append(call())
        if len(times) >= max(repeat, 1):
            spread = _spread(times)
            if spread is not None and spread <= rel_tol:
                break
            if budget_s is not None and sum(times) >= budget_s:
                break
    peak_bytes = None
    if memory:  # one extra, untimed call: returning pages to the OS first would slow the timed ones
        if before is not None:
            before()
        peak_bytes = memory_probe().measure(fn)
    return _summary(times, first, peak_bytes, rel_tol)


def time_interleaved(
    calls: Mapping[str, Callable[[], Any]],
    *,
    warmup: int = 1,
    repeat: int = 5,
    memory: bool = False,
    rel_tol: float = 0.05,
) -> dict[str, dict[str, Any]]:
    """Each of ``calls`` timed ``repeat`` times, taking turns: round ``i`` times one call of each, in order.

    First each callable makes its ``warmup`` untimed calls (one callable after the other), then the
    ``repeat`` rounds; with ``memory``, one more call of each is measured by :class:`PeakMemory`.
    Every call runs exactly once, so a callable may be a step with side effects (a training step:
    forward, backward, optimizer update). Returns, per name, what :func:`time_call` returns.
    """
    first: dict[str, Optional[float]] = {}
    for name, fn in calls.items():
        first[name] = None
        for i in range(max(warmup, 0)):
            seconds = timed(fn)[1]
            if i == 0:
                first[name] = seconds
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(max(repeat, 1)):
        for name, fn in calls.items():
            times[name].append(timed(fn)[1])
    return {
        name: _summary(times[name], first[name], memory_probe().measure(fn) if memory else None, rel_tol)
        for name, fn in calls.items()
    }


def _summary(times: list[float], first: Optional[float], peak_bytes: Optional[int], rel_tol: float) -> dict[str, Any]:
    spread = _spread(times)
    return {
        "median_s": statistics.median(times),
        "times_s": times,
        "first_s": times[0] if first is None else first,
        "peak_bytes": peak_bytes,
        "spread": spread,
        "stable": None if spread is None else spread <= rel_tol,
    }


def _spread(times: Sequence[float]) -> Optional[float]:
    """Interquartile range / median of ``times`` (None for fewer than 3)."""
    if len(times) < 3:
        return None
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    med = statistics.median(times)
    return (q3 - q1) / med if med > 0 else None
