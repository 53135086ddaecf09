"""Token embedding + positions + a stack of pre-norm blocks + final norm, shared by every model."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .._checks import int_at_least
from ..nn.block import TransformerBlock
from ..nn.positions import LearnedPositions

__all__ = ["Backbone", "POSITIONS", "layer_specs"]

POSITIONS = ("learned", "rope", "none")


def layer_specs(attention: Optional[str], depth: int) -> list[Optional[str]]:
    """One attention spec per layer: ``"window(size=32)"`` for every layer, or ``depth`` specs joined by
    ``;`` (``"dense; routing(clusters=4)"``: layer 0 dense, layer 1 routing), e.g. local and
    content-based layers interleaved as in the Routing Transformer."""
    if attention is None or ";" not in attention:
        return [attention] * depth
    specs = [part.strip() for part in attention.split(";")]
    if len(specs) != depth or not all(specs):
        raise ValueError(
            f"attention {attention!r}: a per-layer list needs {depth} non-empty specs joined by ';' "
            f"(one per layer), got {len(specs)}"
        )
    return specs


class Backbone(nn.Module):
    """``tokens [B, N]`` (int64) -> hidden states ``[B, N(+extra), dim]``.

    ``extra_tokens`` learned vectors (e.g. a CLS token) can be prepended by the caller through
    :meth:`embed` + :meth:`encode`. ``max_len`` bounds the length *including* prepended vectors;
    longer inputs raise ``ValueError``. ``aux_loss`` after a forward is the sum of the blocks'
    auxiliary losses (routing's commitment loss), to be added to the training loss.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        depth: int,
        heads: int,
        max_len: int,
        attention: Optional[str] = None,
        *,
        causal: bool = False,
        positions: str = "learned",
        kv_heads: Optional[int] = None,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        embed_dropout: float = 0.0,
        backend: str = "auto",
        short_conv: int = 0,
    ):
        super().__init__()
        owner = type(self).__name__
        for name, val in (
            ("vocab_size", vocab_size),
            ("dim", dim),
            ("depth", depth),
            ("heads", heads),
            ("max_len", max_len),
        ):
            int_at_least(f"{owner}: {name}", val)
        int_at_least(f"{owner}: short_conv", short_conv, 0)  # 0 = none
        if isinstance(embed_dropout, bool) or not isinstance(embed_dropout, (int, float)) or not 0 <= embed_dropout < 1:
            raise ValueError(f"{owner}: embed_dropout must be a number in [0, 1), got {embed_dropout!r}")
        if positions not in POSITIONS:
            raise ValueError(f"{owner}: positions must be one of {', '.join(POSITIONS)}; got {positions!r}")
        self.vocab_size, self.dim, self.max_len, self.positions = vocab_size, dim, max_len, positions
        self.embed = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.pos = LearnedPositions(max_len, dim) if positions == "learned" else None
        self.embed_drop = nn.Dropout(embed_dropout)
        # x + causal depthwise conv of width short_conv over the embeddings: each position also sees the
        # previous tokens' embeddings (the short convolution of H3 / Based, Zoology's MQAR models)
        self.short_conv = None
        if short_conv:
            # no bias and zero weights: the block starts as the identity. PyTorch's default init draws
            # a bias of up to 1/sqrt(K) per channel, which drowns embeddings of std 0.02 (every
            # position then looks alike after the first LayerNorm and MQAR never leaves chance)
            self.short_conv = nn.Conv1d(dim, dim, short_conv, padding=short_conv - 1, groups=dim, bias=False)
            nn.init.zeros_(self.short_conv.weight)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                dim,
                heads,
                spec,
                causal=causal,
                max_len=max_len,
                kv_heads=kv_heads,
                mlp_ratio=mlp_ratio,
                dropout=dropout,
                attn_dropout=attn_dropout,
                rope=positions == "rope",
                backend=backend,
            )
            for spec in layer_specs(attention, depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.aux_loss: Tensor = torch.zeros(())

    @property
    def attention_spec(self) -> str:
        specs = [block.attn.spec for block in self.blocks]
        return specs[0] if len(set(specs)) == 1 else "; ".join(specs)

    def check_tokens(self, tokens: Tensor, mask: Optional[Tensor], extra: int = 0, name: str = "tokens") -> None:
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            shape = f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ValueError(f"{name} must be an int64 tensor [B, N], got {shape}")
        if 0 in tokens.shape:
            raise ValueError(f"{name} must have B, N >= 1, got shape {tuple(tokens.shape)}")
        if tokens.numel():
            low, high = torch.aminmax(tokens)
            if int(low) < 0 or int(high) >= self.vocab_size:
                raise ValueError(
                    f"{name} must lie in [0, vocab_size={self.vocab_size}), got values in [{int(low)}, {int(high)}]"
                )
        n = tokens.shape[1] + extra
        if n > self.max_len:
            raise ValueError(
                f"sequence length {n} (including {extra} prepended token(s)) exceeds the model's max_len={self.max_len}; "
                "build the model with a larger max_len or truncate the input"
            )
        if mask is not None and (
            not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != tokens.shape
        ):
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            mask_name = "mask" if name == "tokens" else f"mask of {name}"
            raise ValueError(
                f"{mask_name} must be a bool tensor of shape {tuple(tokens.shape)} (True = real token), got {got}"
            )

    def encode(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Embedded ``x [B, N, dim]`` -> hidden ``[B, N, dim]``; ``mask [B, N]`` bool, True = real."""
        if self.short_conv is not None:
            x = x + self.short_conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)
        if self.pos is not None:
            x = self.pos(x)
        x = self.embed_drop(x)
        aux = x.new_zeros(())
        for block in self.blocks:
            x = block(x, key_padding_mask=mask)
            aux = aux + block.aux_loss
        self.aux_loss = aux
        return self.norm(x)

    def forward(self, tokens: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        self.check_tokens(tokens, mask)
        return self.encode(self.embed(tokens.long()), mask)
