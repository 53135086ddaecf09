"""Integrations with other libraries. ``spattn.integrations.hf`` (transformers) is imported on demand,
so that ``import spattn`` never imports transformers."""

import importlib

__all__ = ["hf"]


def __getattr__(name):
    if name == "hf":
        return importlib.import_module(f"{__name__}.hf")
    raise AttributeError(f"module 'spattn.integrations' has no attribute {name!r}")
