"""Causal language model: ``tokens [B, N]`` -> next-token logits ``[B, N, vocab]``.

Also the model of Zoology's MQAR (Arora et al. 2024), where the loss is taken only at query
positions (targets elsewhere are -100).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .backbone import Backbone

__all__ = ["CausalLM"]


class CausalLM(nn.Module):
    """Pre-norm decoder with causal attention; the output head is tied to the token embedding."""

    def __init__(self, vocab_size: int, *, tie_embeddings: bool = True, **backbone):
        super().__init__()
        backbone.pop("causal", None)
        self.backbone = Backbone(vocab_size, causal=True, **backbone)
        self.head = nn.Linear(self.backbone.dim, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.backbone.embed.weight

    @property
    def aux_loss(self) -> Tensor:
        return self.backbone.aux_loss

    def hidden(self, tokens: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Final hidden states ``[B, N, dim]`` (apply ``self.head`` to the positions you need logits for)."""
        return self.backbone(tokens, mask)

    def forward(self, tokens: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return self.head(self.backbone(tokens, mask))
