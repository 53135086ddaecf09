"""Two-tower (dual encoder) matching model, LRA Retrieval style (Tay et al. 2021, §3.3).

Both documents go through one shared encoder and are pooled to ``u, v [B, dim]``; the classifier
sees ``[u, v, u*v, u-v]`` (the LRA dual-encoder head) and returns logits ``[B, num_classes]``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .classifier import SequenceClassifier

__all__ = ["TwoTowerClassifier"]


class TwoTowerClassifier(nn.Module):
    def __init__(self, vocab_size: int, num_classes: int = 2, *, pool: str = "cls", head_hidden: int = 0, **backbone):
        super().__init__()
        self.encoder = SequenceClassifier(vocab_size, num_classes, pool=pool, **backbone)
        self.encoder.head = nn.Identity()  # the tower only pools
        dim = self.encoder.backbone.dim
        hidden = head_hidden or dim
        self.head = nn.Sequential(nn.Linear(4 * dim, hidden), nn.GELU(), nn.Linear(hidden, num_classes))
        self._aux = torch.zeros(())

    @property
    def aux_loss(self) -> Tensor:
        return self._aux

    def forward(
        self, tokens: Tensor, mask: Optional[Tensor], tokens2: Tensor, mask2: Optional[Tensor] = None
    ) -> Tensor:
        """``tokens, tokens2 [B, N]`` (bool masks True = real) -> logits ``[B, num_classes]``."""
        u = self.encoder.features(tokens, mask)
        aux = self.encoder.aux_loss
        v = self.encoder.features(tokens2, mask2, name="tokens2")
        if u.shape[0] != v.shape[0]:
            raise ValueError(f"tokens and tokens2 must have the same batch size, got {u.shape[0]} and {v.shape[0]}")
        self._aux = aux + self.encoder.aux_loss
        return self.head(torch.cat([u, v, u * v, u - v], dim=-1))
