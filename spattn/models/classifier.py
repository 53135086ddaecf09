"""Encoder sequence classifier, LRA style (Tay et al. 2021, "Long Range Arena").

``tokens [B, N]`` (+ bool ``mask [B, N]``, True = real token) -> logits ``[B, num_classes]``.
Pooling: ``"cls"`` prepends a learned vector and classifies its final state (LRA's ListOps/Text
configs); ``"mean"`` averages the final states of real tokens (LRA's Pathfinder config).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .._checks import int_at_least

from .backbone import Backbone

__all__ = ["SequenceClassifier", "POOLS", "pool_states"]

POOLS = ("cls", "mean")


def pool_states(h: Tensor, mask: Optional[Tensor], pool: str) -> Tensor:
    """``h [B, N(+1), dim]`` -> ``[B, dim]``: CLS state (position 0) or the mean over real tokens."""
    if pool == "cls":
        return h[:, 0]
    if mask is None:
        return h.mean(1)
    w = mask.to(h.dtype).unsqueeze(-1)
    return (h * w).sum(1) / w.sum(1).clamp_min(1.0)


class SequenceClassifier(nn.Module):
    """Pre-norm Transformer encoder + pooling + linear head. ``max_len`` counts the CLS token."""

    def __init__(self, vocab_size: int, num_classes: int, *, pool: str = "cls", head_hidden: int = 0, **backbone):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"SequenceClassifier: pool must be one of {', '.join(POOLS)}; got {pool!r}")
        int_at_least("SequenceClassifier: num_classes", num_classes, 2)
        int_at_least("SequenceClassifier: head_hidden", head_hidden, 0)  # 0 = linear head
        backbone.pop("causal", None)
        self.backbone = Backbone(vocab_size, causal=False, **backbone)
        self.pool, self.num_classes = pool, num_classes
        dim = self.backbone.dim
        self.cls = nn.Parameter(torch.randn(dim) * 0.02) if pool == "cls" else None
        self.head = (
            nn.Sequential(nn.Linear(dim, head_hidden), nn.GELU(), nn.Linear(head_hidden, num_classes))
            if head_hidden
            else nn.Linear(dim, num_classes)
        )

    @property
    def aux_loss(self) -> Tensor:
        return self.backbone.aux_loss

    def features(self, tokens: Tensor, mask: Optional[Tensor] = None, name: str = "tokens") -> Tensor:
        """Pooled representation ``[B, dim]`` (``name``: what error messages call ``tokens``)."""
        extra = 1 if self.cls is not None else 0
        self.backbone.check_tokens(tokens, mask, extra, name)
        x = self.backbone.embed(tokens.long())
        if self.cls is not None:
            x = torch.cat([self.cls.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
            if mask is not None:
                mask = torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)
        h = self.backbone.encode(x, mask)
        return pool_states(h, mask if self.cls is None else None, self.pool)

    def forward(self, tokens: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return self.head(self.features(tokens, mask))
