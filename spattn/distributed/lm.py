"""Sequence-parallel causal LM: each rank runs a :class:`~spattn.models.CausalLM` on its contiguous
shard of every sequence; attention layers exchange keys through :func:`sequence_parallel_attention`.

Everything else in a decoder is per token (embeddings, norms, MLPs, the head), so a shard needs
only its global position offset: RoPE angles and learned positions start at the shard's first
token. The parameters are the model's own; after ``backward`` the ranks hold partial gradients
(each from its own tokens), summed over the group by :meth:`SequenceParallelLM.reduce_gradients`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..models.lm import CausalLM
from ..nn.positions import RotaryProjection, apply_rotary
from ..patterns import Pattern
from . import _comm
from .sequence import sequence_parallel_attention

__all__ = ["SequenceParallelLM"]


def _rotated_heads(proj: nn.Module, h: Tensor, heads: int, offset: int) -> Tensor:
    """``proj(h)`` as ``[B, H, N, D]``, RoPE angles of positions ``offset .. offset+N-1``."""
    if isinstance(proj, RotaryProjection):
        n = h.shape[1]
        y = proj.proj(h).unflatten(-1, (proj.heads, proj.head_dim))
        y = apply_rotary(y, proj.cos[offset : offset + n], proj.sin[offset : offset + n]).flatten(-2)
    else:
        y = proj(h)
    return rearrange(y, "b n (h d) -> b h n d", h=heads)


class SequenceParallelLM(nn.Module):
    """``tokens [B, N_r]`` (this rank's shard) -> logits ``[B, N_r, vocab]`` of the whole-sequence model.

    Supports decoders whose layers are dense or a pattern (static or a supported block selector),
    with RoPE, learned or no positions; short convolutions, approximations and layer-level
    mechanisms mix tokens across the shard edge in ways this wrapper does not replicate, and raise.
    """

    def __init__(self, model: CausalLM, group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        if not isinstance(model, CausalLM):
            raise TypeError(f"SequenceParallelLM wraps a spattn.models.CausalLM, got {type(model).__name__}")
        bb = model.backbone
        if bb.short_conv is not None:
            raise ValueError("SequenceParallelLM: short_conv mixes tokens across shard edges; not supported")
        for i, block in enumerate(bb.blocks):
            mech = block.attn.mechanism
            if mech is not None and not isinstance(mech, Pattern):
                raise ValueError(
                    f"SequenceParallelLM: layer {i} uses {block.attn.spec}, which is not a sparse "
                    "pattern; sequence parallelism supports dense and pattern layers"
                )
            if getattr(mech, "selects_before_rope", False):
                raise ValueError(f"SequenceParallelLM: layer {i} ({block.attn.spec}) selects per token; not supported")
        self.model, self.group = model, group

    def offsets(self, n_local: int, device) -> tuple[int, int]:
        """(this rank's first global position, global length) from the all-gathered shard lengths."""
        rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        sizes = _comm.all_gather_ints([n_local], self.group, world, device)[:, 0].tolist()
        return sum(sizes[:rank]), sum(sizes)

    def forward(self, tokens: Tensor) -> Tensor:
        bb = self.model.backbone
        bb.check_tokens(tokens, None)
        offset, total = self.offsets(tokens.shape[1], tokens.device)
        if total > bb.max_len:
            raise ValueError(f"global sequence length {total} exceeds the model's max_len={bb.max_len}")
        x = bb.embed(tokens.long())
        if bb.pos is not None:
            x = x + bb.pos.table.weight[offset : offset + tokens.shape[1]].to(x.dtype)
        x = bb.embed_drop(x)
        for block in bb.blocks:
            a = block.attn
            h = block.norm1(x)
            q = _rotated_heads(a.q_proj, h, a.heads, offset)
            k = _rotated_heads(a.k_proj, h, a.kv_heads, offset)
            v = rearrange(a.v_proj(h), "b n (h d) -> b h n d", h=a.kv_heads)
            out = sequence_parallel_attention(
                q, k, v, a.mechanism, causal=a.causal, group=self.group, backend=a.backend
            )
            x = x + block.drop(a.dropout(a.out_proj(rearrange(out, "b h n d -> b n (h d)"))))
            if block.mlp is not None:
                x = x + block.drop(block.mlp(block.norm2(x)))
        return self.model.head(bb.norm(x))

    def loss(self, tokens: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy over the *whole* sequence's targets (``-100`` ignored).

        Differentiable on each rank for its own tokens; the value is the same on every rank.
        """
        logits = self(tokens)
        local_sum = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
        counts = torch.stack([(targets != -100).sum().to(local_sum.dtype), local_sum.detach()])
        dist.all_reduce(counts, group=self.group)
        # the gradient is this rank's share; the value is the global mean
        return local_sum / counts[0] + (counts[1] - local_sum.detach()) / counts[0]

    def reduce_gradients(self) -> None:
        """Sum every parameter's gradient over the group (each rank holds its tokens' share)."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat, group=self.group)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))
