"""Modules: attention layers running any registered mechanism."""

from .attention import Attention

__all__ = ["Attention"]
