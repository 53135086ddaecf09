"""Fuzz: every registered mechanism with bad parameter types and values (rows generated per parameter).

For each mechanism and each of its parameters whose default tells its type, the table holds:
a string for a number, NaN / inf for a float, a non-bool for a bool, a number for a string choice.
Each must be rejected when the mechanism is built, with an error naming the parameter.
"""

from __future__ import annotations

import inspect
import math

import pytest

from spattn import registry
from spattn.approx.base import CONTEXT_PARAMETERS

from ._table import Bad, check, params

#: parameters without defaults, and a valid value for each (so that one bad value at a time is tested)
REQUIRED = {"size": 4, "dilation": 2, "rows": 4, "count": 2, "stride": 4}
#: what nn.Attention would fill in
CONTEXT = dict(dim=32, heads=2, kv_heads=2, head_dim=16, causal=False, max_len=256)
#: parameters with no single type (a documented union), tested by hand in other tables
FREE = {("topp", "scale"), ("tidal", "select_layers"), ("neighborhood", "kernel"), ("neighborhood", "dilation")}


def _bad_values(default):
    if isinstance(default, bool):
        return [("int", 2), ("str", "yes")]
    if isinstance(default, int):
        return [("str", "abc"), ("float", 2.5), ("list", [4])]
    if isinstance(default, float):
        return [("str", "abc"), ("nan", math.nan), ("inf", math.inf), ("bool", True)]
    if isinstance(default, str):
        return [("int", 123), ("unknown", "no_such_choice")]
    if isinstance(default, tuple):
        return [("str", "abc")]
    return []


def _build(name, kwargs):
    mech = registry.lookup(name)
    accepted = mech.parameters()
    ctx = {k: v for k, v in CONTEXT.items() if k in accepted and k not in kwargs}
    return lambda: registry.build(name, **kwargs, **ctx)


def _rows():
    rows = []
    for mech in registry.mechanisms():
        sig = inspect.signature(mech.factory)
        required = {}
        for p in sig.parameters.values():
            if p.name != "self" and p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                required[p.name] = REQUIRED[p.name] if p.name in REQUIRED else CONTEXT[p.name]
        for p in sig.parameters.values():
            if p.name in ("self",) or p.name in CONTEXT_PARAMETERS or (mech.name, p.name) in FREE:
                continue
            if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                continue
            default = required.get(p.name, p.default)
            for label, bad in _bad_values(default):
                kwargs = dict(required, **{p.name: bad})
                rows.append(
                    Bad(f"{mech.name}-{p.name}-{label}", _build(mech.name, kwargs), (TypeError, ValueError), p.name)
                )
    return rows


ROWS = _rows()


@pytest.mark.parametrize("row", params(ROWS))
def test_mechanism_parameter_rejected(row):
    check(row)


def test_every_mechanism_has_rows():
    named = {row.id.split("-")[0] for row in ROWS}
    no_params = {
        m.name for m in registry.mechanisms() if not [p for p in m.parameters() if p not in CONTEXT_PARAMETERS]
    }
    assert named | no_params >= {m.name for m in registry.mechanisms()}
