"""Name -> mechanism registry and the spec-string parser.

A *spec* names a mechanism everywhere (API, models, CLI): ``"window(size=256)"``,
``"bigbird(block=64, window=3, globals=2, random=3, seed=0)"`` or a bare ``"dense"``.
Values are Python literals (ints, floats, bools, None, strings, tuples).

This module is a leaf: it imports nothing from spattn, so every layer can register into it.
"""

from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["Mechanism", "register", "parse_spec", "lookup", "mechanisms", "build"]


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


def lookup(name: str) -> Mechanism:
    try:
        return _REGISTRY[name]
    except KeyError:
        valid = ", ".join(sorted(_REGISTRY)) or "(none registered)"
        raise ValueError(f"unknown attention mechanism {name!r}; valid names: {valid}") from None


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


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"name(a=1, b=2)"`` into ``("name", {"a": 1, "b": 2})``."""
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a str such as 'window(size=256)', got {type(spec).__name__}")
    text = spec.strip()
    if not text:
        raise ValueError("spec must be a non-empty string such as 'window(size=256)'")
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError as err:
        raise ValueError(f"cannot parse spec {spec!r}: {err.msg}; expected 'name' or 'name(key=value, ...)'") from None
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
        kwargs[kw.arg] = _literal(kw.value, spec)
    return node.func.id, kwargs


def build(spec: str | None = None, /, **overrides: Any) -> Any:
    """Build a registered mechanism from a spec string, keyword overrides win."""
    name, kwargs = parse_spec(spec)
    kwargs.update(overrides)
    mech = lookup(name)
    allowed = mech.parameters()
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"{name}: unknown parameter(s) {', '.join(unknown)}; valid: {mech.signature()}"
        )
    return mech.factory(**kwargs)
