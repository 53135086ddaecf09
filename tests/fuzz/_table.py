"""Table-driven bad-input checks shared by the fuzz suite.

A row is ``Bad(id, call, exc, fragments)``: calling ``call()`` must raise ``exc`` (an exception type
or tuple of them) within :data:`TIME_LIMIT` seconds, and the message must contain every fragment
(the argument, file or field it names, and what was expected). A call that returns, hangs, or raises
anything else fails the row.
"""

from __future__ import annotations

import contextlib
import signal
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

import pytest

#: seconds one bad input may take before it counts as a hang
TIME_LIMIT = 10.0

ExcSpec = Union[type, tuple]


@dataclass(frozen=True)
class Bad:
    id: str
    call: Callable[[], Any]
    exc: ExcSpec
    fragments: Union[str, Sequence[str]]
    marks: tuple = field(default=())

    def fragment_list(self) -> list[str]:
        return [self.fragments] if isinstance(self.fragments, str) else list(self.fragments)


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float = TIME_LIMIT):
    """Raise :class:`Hang` if the body runs longer than ``seconds`` (SIGALRM; main thread, POSIX)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def check(row: Bad) -> None:
    """Run one row: the right exception type, naming what the row says, in bounded time."""
    with time_limit():
        try:
            result = row.call()
        except Hang:
            raise
        except row.exc as err:
            message = str(err)
            missing = [f for f in row.fragment_list() if f not in message]
            assert not missing, f"{row.id}: message {message!r} lacks {missing}"
            return
        except Exception as err:  # the wrong kind of error: report it whole
            raise AssertionError(
                f"{row.id}: expected {row.exc} naming {row.fragment_list()}, got {type(err).__name__}: {err}"
            ) from err
    raise AssertionError(f"{row.id}: accepted silently (returned {type(result).__name__})")


def params(rows: Sequence[Bad]) -> list:
    """``pytest.param`` per row, ids unique (a duplicate id is a table error)."""
    seen = set()
    out = []
    for row in rows:
        if row.id in seen:
            raise ValueError(f"duplicate fuzz row id {row.id!r}")
        seen.add(row.id)
        out.append(pytest.param(row, id=row.id, marks=row.marks))
    return out


def check_message(err: BaseException, *fragments: str) -> None:
    """For property tests: the error names every fragment."""
    message = str(err)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"message {message!r} lacks {missing}"
