"""The shared parameter validators of spattn._checks: each message names the argument and what was expected."""

from __future__ import annotations

import pytest
import torch

from spattn._checks import check_kind, int_at_least
from spattn.layout import Layout
from spattn.selection import TokenSelection


@pytest.mark.parametrize(
    "kwargs, value, message",
    [
        (dict(), 0, "x: n must be a positive int, got 0"),
        (dict(), True, "x: n must be a positive int, got True"),
        (dict(), 2.0, "x: n must be a positive int, got 2.0"),
        (dict(minimum=0), -1, "x: n must be an int >= 0, got -1"),
        (dict(allow_none=True), 0, "x: n must be a positive int or None, got 0"),
        (dict(minimum=3, minimum_name="repeat"), 2, "x: n must be an int >= repeat \\(3\\), got 2"),
    ],
)
def test_int_at_least_names_the_argument_and_the_bound(kwargs, value, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        int_at_least("x: n", value, **kwargs)


def test_int_at_least_returns_what_it_accepts():
    assert int_at_least("n", 3) == 3
    assert int_at_least("n", 0, 0) == 0
    assert int_at_least("n", None, allow_none=True) is None
    assert int_at_least("n", 5, 5, minimum_name="repeat") == 5


def test_check_kind_reads_the_selection_protocol():
    with pytest.raises(TypeError, match="^k: selection must be a TokenSelection, got Layout$"):
        check_kind("k: selection", Layout.from_dense(torch.ones(1, 1, 4, 4, dtype=bool), 2), TokenSelection)
    with pytest.raises(TypeError, match="^layout must be a spattn.Layout, got str$"):
        check_kind("layout", "window", Layout, "spattn.Layout")
    layout = Layout.from_dense(torch.ones(1, 1, 4, 4, dtype=torch.bool), 2)
    assert check_kind("layout", layout, Layout) is layout
