"""Name -> mechanism registry and the spec-string parser.

A *spec* names a mechanism everywhere (API, models, CLI): ``"window(size=256)"``,
``"bigbird(block=64, window=3, globals=2, random=3, seed=0)"`` or a bare ``"dense"``.
Values are Python literals (ints, floats, bools, None, strings, tuples).

This module is a leaf: it imports nothing from spattn, so every layer can register into it.
"""

from __future__ import annotations

import ast
import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = [
    "Mechanism",
    "register",
    "parse_spec",
    "lookup",
    "mechanisms",
    "build",
    "check_spec",
    "suggest",
    "as_python_scalar",
]

#: longest spec string accepted, and deepest nesting of its values (a tuple of tuples is depth 2)
MAX_SPEC_LENGTH = 2000
MAX_SPEC_DEPTH = 16


@dataclass(frozen=True)
class Mechanism:
    """One registered mechanism: how to build it and where it comes from."""

    name: str
    kind: str  # "static", "dynamic", "approximation", "hybrid", ...
    factory: Callable[..., Any] = field(repr=False)
    description: str
    paper: str

    def parameters(self) -> list[str]:
        """Names of the keyword parameters the factory accepts."""
        sig = inspect.signature(self.factory)
        return [
            p.name
            for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
        ]

    def required(self) -> list[str]:
        """Names of the keyword parameters that have no default."""
        sig = inspect.signature(self.factory)
        return [
            p.name
            for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self" and p.default is p.empty
        ]

    def signature(self) -> str:
        sig = inspect.signature(self.factory)
        parts = []
        for p in sig.parameters.values():
            if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) or p.name == "self":
                continue
            parts.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
        return f"{self.name}({', '.join(parts)})"


_REGISTRY: dict[str, Mechanism] = {}


def register(name: str, *, kind: str, description: str, paper: str):
    """Class/function decorator adding a mechanism factory under ``name``."""

    def wrap(factory):
        if name in _REGISTRY and _REGISTRY[name].factory is not factory:
            raise ValueError(f"mechanism {name!r} is already registered")
        _REGISTRY[name] = Mechanism(name, kind, factory, description, paper)
        return factory

    return wrap


def mechanisms() -> list[Mechanism]:
    """Every registered mechanism, sorted by kind then name."""
    return sorted(_REGISTRY.values(), key=lambda m: (m.kind, m.name))


def suggest(word: str, choices, n: int = 3) -> str:
    """`` (did you mean 'window'?)`` for the closest of ``choices`` (difflib), or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


def lookup(name: str) -> Mechanism:
    try:
        return _REGISTRY[name]
    except KeyError:
        valid = ", ".join(sorted(_REGISTRY)) or "(none registered)"
        raise ValueError(
            f"unknown attention mechanism {name!r}{suggest(name, _REGISTRY)}; valid names: {valid}"
        ) from None


def _literal(node: ast.AST, spec: str) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        if isinstance(node, ast.Name):  # bare words are strings: mode=fixed
            return node.id
        raise ValueError(
            f"cannot parse value {ast.unparse(node)!r} in spec {spec!r}; "
            "use Python literals such as 3, 0.9, True, None, 'text' or (2, 3)"
        ) from None


def _depth(node: ast.AST) -> int:
    """Nesting depth of an expression tree, without recursion (a deep tree must not overflow the stack)."""
    deepest, stack = 0, [(node, 1)]
    while stack:
        n, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > MAX_SPEC_DEPTH + 2:
            break
        stack.extend((c, d + 1) for c in ast.iter_child_nodes(n))
    return deepest


def _short(spec: str, limit: int = 80) -> str:
    return repr(spec if len(spec) <= limit else spec[:limit] + "...")


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"name(a=1, b=2)"`` into ``("name", {"a": 1, "b": 2})``.

    Refused with ``ValueError``: syntax errors, positional or repeated keywords, values that are
    not literals, specs longer than :data:`MAX_SPEC_LENGTH` or nested deeper than :data:`MAX_SPEC_DEPTH`.
    """
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a str such as 'window(size=256)', got {type(spec).__name__}")
    text = spec.strip()
    if not text:
        raise ValueError("spec must be a non-empty string such as 'window(size=256)'")
    if len(text) > MAX_SPEC_LENGTH:
        raise ValueError(f"spec {_short(spec)} is {len(text)} characters long; at most {MAX_SPEC_LENGTH} are accepted")
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError as err:
        raise ValueError(
            f"cannot parse spec {_short(spec)}: {err.msg}; expected 'name' or 'name(key=value, ...)'"
        ) from None
    except (RecursionError, MemoryError):
        raise ValueError(f"spec {_short(spec)} is nested too deeply (at most {MAX_SPEC_DEPTH} levels)") from None
    if _depth(node) > MAX_SPEC_DEPTH + 2:  # + the call and its keyword
        raise ValueError(f"spec {_short(spec)} is nested too deeply (at most {MAX_SPEC_DEPTH} levels)")
    spec = _short(spec)[1:-1] if len(spec) > 80 else spec
    if isinstance(node, ast.Name):
        return node.id, {}
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise ValueError(f"cannot parse spec {spec!r}; expected 'name' or 'name(key=value, ...)'")
    if node.args:
        raise ValueError(f"spec {spec!r}: parameters must be given by keyword, e.g. 'window(size=256)'")
    kwargs = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise ValueError(f"spec {spec!r}: '**' is not allowed")
        if kw.arg in kwargs:
            raise ValueError(f"spec {spec!r}: keyword {kw.arg!r} is given twice")
        kwargs[kw.arg] = _literal(kw.value, spec)
    return node.func.id, kwargs


def check_spec(spec: str, what: str = "spec", provided=()) -> tuple[Mechanism, dict[str, Any]]:
    """Check a spec without building it: syntax, a registered name, known and required parameters.

    ``provided`` names parameters the caller fills in (e.g. ``dim``, ``heads`` from a model).
    Returns the mechanism and the parsed keywords. Cheap: CLIs call it before loading models or data.
    """
    try:
        name, kwargs = parse_spec(spec)
        mech = lookup(name)
        _check_parameters(mech, set(kwargs), filled=set(provided))
    except (ValueError, TypeError) as err:
        if what == "spec":
            raise
        raise type(err)(f"{what}: {err}") from None
    return mech, kwargs


def _check_parameters(mech: Mechanism, given: set, filled: frozenset = frozenset()) -> None:
    unknown = sorted(given - set(mech.parameters()))
    if unknown:
        hints = "".join(suggest(u, mech.parameters(), n=1) for u in unknown[:1])
        raise ValueError(f"{mech.name}: unknown parameter(s) {', '.join(unknown)}{hints}; valid: {mech.signature()}")
    missing = [p for p in mech.required() if p not in given and p not in filled]
    if missing:  # a missing argument is a TypeError, as Python's own is
        verb = "is" if len(missing) == 1 else "are"
        example = ", ".join(f"{p}=..." for p in missing)
        raise TypeError(
            f"{mech.name}: {', '.join(missing)} {verb} required, e.g. '{mech.name}({example})'; "
            f"signature: {mech.signature()}"
        )


def build(spec: str | None = None, /, **overrides: Any) -> Any:
    """Build a registered mechanism from a spec string, keyword overrides win.

    A bare name takes the defaults of its parameters; parameters without a default must be given
    (``TypeError: window: size is required``); unknown ones are refused with the closest valid name suggested.
    """
    name, kwargs = parse_spec(spec)
    kwargs.update({k: as_python_scalar(v) for k, v in overrides.items()})
    mech = lookup(name)
    _check_parameters(mech, set(kwargs))
    return mech.factory(**kwargs)


def as_python_scalar(value: Any) -> Any:
    """NumPy scalars (``np.float32(0.25)``, ``np.int64(3)``) as the Python numbers factories check for."""
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()
    return value
