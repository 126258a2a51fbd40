"""Reduction of per-token losses to the scalar that is differentiated.

`normalizer` replaces the local count (tokens for token-mean, sequences for the seq-* modes) by a
global one, so that the losses of any split of a batch into micro-batches and data-parallel ranks
add up exactly to the loss of the whole batch.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

Number = Union[int, float, torch.Tensor]


def aggregate(loss_tok: torch.Tensor, mask: torch.Tensor, mode: str,
              normalizer: Optional[Number] = None, norm_length: Optional[int] = None) -> torch.Tensor:
    maskf = mask.to(loss_tok.dtype)
    masked = loss_tok * maskf
    if mode == "token-mean":
        denom = maskf.sum() if normalizer is None else normalizer
        return masked.sum() / _at_least_one(denom, masked)
    tokens_per_seq = maskf.sum(-1)
    n_seq = (tokens_per_seq > 0).sum() if normalizer is None else normalizer
    n_seq = _at_least_one(n_seq, masked)
    if mode == "seq-mean-token-mean":
        return (masked.sum(-1) / tokens_per_seq.clamp(min=1.0)).sum() / n_seq
    if mode == "seq-mean-token-sum":
        return masked.sum() / n_seq
    if mode == "seq-mean-token-sum-norm":
        length = norm_length if norm_length is not None else loss_tok.shape[-1]
        return masked.sum() / (n_seq * length)
    raise ValueError(f"unknown aggregation {mode!r}")


def _at_least_one(denom: Number, like: torch.Tensor) -> torch.Tensor:
    # An empty split contributes 0 (its sum is 0); clamping only matters when the count is 0.
    return torch.as_tensor(denom, dtype=like.dtype, device=like.device).clamp(min=1.0)
