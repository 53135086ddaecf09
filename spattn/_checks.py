"""Parameter validators shared by every layer (a leaf module: imports nothing from spattn).

Two contracts exist and both are kept, because callers and tests rely on them:

* :func:`check_int` / :func:`check_float` -- patterns, data, decode selectors: a wrong type is a
  ``TypeError``, a value out of range a ``ValueError``, each naming ``owner: name``.
* :func:`check_kind` -- kernels' selection argument: a ``TypeError`` unless the value is the kind of
  selection the kernel runs (the Selection protocol's ``kind``; the dispatch table decides who gets what).
* :func:`is_int` -- the shared type test (an int, not a bool) for checks whose message says more
  (``"a positive divisor of heads=8"``, ``"an even int >= 2"``).
* :func:`int_at_least` -- layers, models, approximations: any bad value (wrong type included) is a
  ``ValueError`` ``"<label> must be a positive int"`` (``"... an int >= m"`` for other minimums).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

__all__ = ["is_int", "check_int", "check_float", "int_at_least", "check_kind"]


def is_int(value: Any) -> bool:
    """True for a Python int that is not a bool (the type test every validator here starts from; call
    it directly only when the message needs more than :func:`check_int` / :func:`int_at_least` say)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(
    owner: Optional[str], name: str, value: Any, minimum: int = 0, allow_none: bool = False, *, numpy: bool = False
) -> Any:
    """``value`` if it is an int ``>= minimum`` (or None with ``allow_none``); else TypeError / ValueError
    naming ``owner: name`` (just ``name`` when ``owner`` is None). With ``numpy`` numpy integers are
    accepted too and every accepted value comes back as a Python int."""
    if value is None and allow_none:
        return value
    label = name if owner is None else f"{owner}: {name}"
    if not (is_int(value) or (numpy and isinstance(value, numbers.Integral) and not isinstance(value, bool))):
        raise TypeError(f"{label} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{label} must be >= {minimum}, got {value}")
    return int(value) if numpy else value


def check_float(owner: str, name: str, value: Any, low: float, high: float, *, low_open=False, high_open=False) -> Any:
    """``value`` if it is a number in the interval (``low_open`` / ``high_open`` exclude the ends)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be a finite number, got {value}")
    bad_low = value <= low if low_open else value < low
    bad_high = value >= high if high_open else value > high
    if bad_low or bad_high:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{owner}: {name} must lie in {lo}{low}, {high}{hi}, got {value}")
    return value


def int_at_least(
    label: str, value: Any, minimum: int = 1, *, allow_none: bool = False, minimum_name: Optional[str] = None
) -> Any:
    """``value`` if it is an int ``>= minimum`` (or None with ``allow_none``); else ``ValueError`` naming
    ``label`` (e.g. ``"seqboat: chunk"``). ``minimum_name`` names a minimum that is another parameter
    (``"max_repeat must be an int >= repeat (3)"``)."""
    if value is None and allow_none:
        return value
    if not is_int(value) or value < minimum:
        if minimum_name is not None:
            what = f"an int >= {minimum_name} ({minimum})"
        else:
            what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{label} must be {what}{' or None' if allow_none else ''}, got {value!r}")
    return value


def check_kind(label: str, value: Any, expected: type, expected_name: Optional[str] = None) -> Any:
    """``value`` if it is a selection of ``expected``'s ``kind`` (the Selection protocol); else ``TypeError``
    ``"<label> must be a <expected_name or expected's name>, got <type>"``."""
    if getattr(value, "kind", None) != expected.kind:
        raise TypeError(f"{label} must be a {expected_name or expected.__name__}, got {type(value).__name__}")
    return value
