"""Build a model from a :class:`ModelConfig` (a plain, JSON-serialisable description).

``build_model(ModelConfig(kind="classifier", vocab_size=20, num_classes=10, attention="window(size=32)"))``.
The attention spec is validated when the model is built: an unknown mechanism raises ``ValueError``
listing the registered ones.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

from torch import nn

from .. import registry
from ..functional import BACKENDS
from .backbone import POSITIONS, layer_specs
from .classifier import POOLS, SequenceClassifier
from .lm import CausalLM
from .retrieval import TwoTowerClassifier

__all__ = ["ModelConfig", "build_model", "MODEL_KINDS"]

MODEL_KINDS = ("classifier", "lm", "retrieval")


@dataclass
class ModelConfig:
    """Hyperparameters of a model. ``max_len`` bounds the sequence length (CLS included)."""

    kind: str = "classifier"
    vocab_size: int = 256
    num_classes: int = 2
    dim: int = 64
    depth: int = 2
    heads: int = 2
    kv_heads: Optional[int] = None
    max_len: int = 512
    attention: str = "dense"
    positions: str = "learned"
    pool: str = "cls"
    mlp_ratio: float = 2.0
    dropout: float = 0.0
    attn_dropout: float = 0.0
    embed_dropout: float = 0.0
    head_hidden: int = 0
    backend: str = "auto"
    #: width of a causal depthwise convolution over the embeddings (0 = none); see Backbone
    short_conv: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if not isinstance(d, dict):
            raise TypeError(f"ModelConfig.from_dict: expected a dict of ModelConfig fields, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {unknown}; valid: {', '.join(sorted(names))}")
        return cls(**d)

    def validate(self) -> None:
        """Every field checked by name (a bad value raises ValueError naming the field and its range)."""

        def bad(name, expected):
            raise ValueError(f"ModelConfig: {name} must be {expected}, got {getattr(self, name)!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("vocab_size", "num_classes", "dim", "depth", "heads", "max_len"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                bad(name, "a positive int")
        if self.kv_heads is not None and (not is_int(self.kv_heads) or self.kv_heads < 1):
            bad("kv_heads", "a positive int or None")
        for name in ("head_hidden", "short_conv"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                bad(name, "an int >= 0 (0 = none)")
        if not is_number(self.mlp_ratio) or self.mlp_ratio < 0:
            bad("mlp_ratio", ">= 0 (a finite number)")
        for name in ("dropout", "attn_dropout", "embed_dropout"):
            if not is_number(getattr(self, name)) or not 0 <= getattr(self, name) < 1:
                bad(name, "a number in [0, 1)")
        if self.backend not in BACKENDS:
            bad("backend", f"one of {', '.join(BACKENDS)}")
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"ModelConfig: kind must be one of {', '.join(MODEL_KINDS)}; got {self.kind!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"ModelConfig: positions must be one of {', '.join(POSITIONS)}; got {self.positions!r}")
        if self.pool not in POOLS:
            raise ValueError(f"ModelConfig: pool must be one of {', '.join(POOLS)}; got {self.pool!r}")
        if not isinstance(self.attention, str) or not self.attention.strip():
            raise ValueError(
                f"ModelConfig: attention must be a spec string such as 'window(size=32)', got {self.attention!r}"
            )
        try:
            for spec in layer_specs(self.attention, self.depth):
                name, _ = registry.parse_spec(spec)
                registry.lookup(name)
        except (KeyError, ValueError) as e:
            msg = e.args[0] if e.args else str(e)
            raise ValueError(f"ModelConfig: bad attention {self.attention!r}: {msg}") from None


def build_model(config: ModelConfig) -> nn.Module:
    """The model described by ``config`` (classifier, causal LM, or two-tower retrieval)."""
    if isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    if not isinstance(config, ModelConfig):
        raise TypeError(f"build_model: expected a ModelConfig or dict, got {type(config).__name__}")
    config.validate()
    common = dict(
        dim=config.dim,
        depth=config.depth,
        heads=config.heads,
        kv_heads=config.kv_heads,
        max_len=config.max_len,
        attention=config.attention,
        positions=config.positions,
        mlp_ratio=config.mlp_ratio,
        dropout=config.dropout,
        attn_dropout=config.attn_dropout,
        embed_dropout=config.embed_dropout,
        backend=config.backend,
        short_conv=config.short_conv,
    )
    if config.kind == "lm":
        return CausalLM(config.vocab_size, **common)
    if config.kind == "retrieval":
        return TwoTowerClassifier(
            config.vocab_size, config.num_classes, pool=config.pool, head_hidden=config.head_hidden, **common
        )
    return SequenceClassifier(
        config.vocab_size, config.num_classes, pool=config.pool, head_hidden=config.head_hidden, **common
    )
