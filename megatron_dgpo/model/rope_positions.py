"""RoPE at explicit positions for one forward: the shared-prefix packed row (train/microbatch.py).

Megatron's GPTModel computes its rotary frequencies for positions 0..S-1 of the row
(`RotaryEmbedding.forward(max_seq_len)`, lru-cached) and ignores `position_ids`; a row whose
positions are not 0..S-1 (a prompt's branches continue its position, not the packed index) needs
the frequencies of its own positions. `next_forward_positions(model, pos)` makes the next call of
the model's RotaryEmbedding module return `freqs[pos]` (a forward hook, one call only), so
Megatron's own `apply_rotary_pos_emb` then rotates every token by its position. Every pipeline stage
computes the frequencies itself, so every stage's forward step sets them for its micro-batch.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["next_forward_positions"]


def _rope_module(model):
    from megatron_dgpo.model.builder import unwrap_model

    return getattr(unwrap_model(model), "rotary_pos_emb", None)


def _hook(module, args, output):
    pos = module.__dict__.pop("_dgpo_positions", None)
    if pos is None:
        return None
    if not torch.is_tensor(output) or output.dim() != 4:  # [S, 1, 1, dim] from RotaryEmbedding
        raise NotImplementedError(f"explicit RoPE positions need Megatron's RotaryEmbedding output "
                                  f"[S, 1, 1, dim], got {type(output).__name__}")
    if int(pos.max()) >= output.shape[0]:
        raise ValueError(f"RoPE position {int(pos.max())} beyond the {output.shape[0]} computed")
    return output.index_select(0, pos.to(output.device))


def next_forward_positions(model, positions: Optional[torch.Tensor]) -> None:
    """`positions` [S] int64: the RoPE position of each token of the next forward's row (None:
    the usual 0..S-1, and a stale setting of a failed forward is dropped)."""
    rope = _rope_module(model)
    if rope is None:
        if positions is not None:
            raise NotImplementedError("explicit RoPE positions need a model with rotary embeddings")
        return
    if not getattr(rope, "_dgpo_hooked", False):
        rope.register_forward_hook(_hook)
        rope._dgpo_hooked = True
    if positions is None:
        rope.__dict__.pop("_dgpo_positions", None)
    else:
        rope._dgpo_positions = positions
