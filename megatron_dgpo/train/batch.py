"""The rollout batch the trainer consumes, and its padding.

Layout: every per-token field is `[B, S]` and aligned with `tokens`: `field[:, t]` refers to token
t, i.e. `logp[:, t] = log pi(tokens[:, t] | tokens[:, :t])`. Position 0 is never a response token
(`loss_mask[:, 0]` must be False). `advantages` may be `[B]` (one per sequence, GRPO) or `[B, S]`.

Padding: sequences (prompt + response) are right-padded to one common length, rounded up to
`pad_to_multiple` (TP size with sequence parallelism, 16/32 with FP8). With causal attention,
right padding never changes the outputs at real positions, so no attention mask and no
position-id shift is needed. The train step cuts this batch into micro-batches padded only to
their own longest row, or packed into THD rows (`megatron_dgpo.train.microbatch`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import List, Optional, Sequence

import torch

__all__ = ["RolloutBatch", "pad_sequences", "shift_left"]


@dataclass
class RolloutBatch:
    tokens: torch.Tensor  # [B, S] int64, right-padded
    loss_mask: torch.Tensor  # [B, S] bool, True on response tokens that get a loss
    advantages: torch.Tensor  # [B] or [B, S] float
    old_logp: Optional[torch.Tensor] = None  # [B, S] float, log-probs under the behaviour policy
    rollout_logp: Optional[torch.Tensor] = None  # [B, S] float, from the inference engine (metrics)
    lengths: Optional[torch.Tensor] = None  # [B] int, non-pad tokens per row (None: S)

    def __post_init__(self):
        if self.tokens.dim() != 2:
            raise ValueError(f"RolloutBatch.tokens must be [B, S], got {tuple(self.tokens.shape)}")
        shape = tuple(self.tokens.shape)
        self.loss_mask = self.loss_mask.bool()
        for name in ("loss_mask", "old_logp", "rollout_logp"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"RolloutBatch.{name} has shape {tuple(t.shape)}, expected {shape}")
        if tuple(self.advantages.shape) not in ((shape[0],), shape):
            raise ValueError(f"RolloutBatch.advantages has shape {tuple(self.advantages.shape)}, "
                             f"expected [{shape[0]}] or {shape}")
        if shape[1] > 0 and bool(self.loss_mask[:, 0].any()):
            raise ValueError("RolloutBatch.loss_mask[:, 0] must be False (the first token has no log-prob)")
        if self.lengths is None:
            self.lengths = torch.full((shape[0],), shape[1], dtype=torch.long)

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_length(self) -> int:
        return self.tokens.shape[1]

    def _tensor_fields(self):
        return [f.name for f in fields(self)]

    def select(self, index) -> "RolloutBatch":
        """Rows `index` (a slice, a list or an index tensor) of every field."""
        kw = {}
        for name in self._tensor_fields():
            t = getattr(self, name)
            kw[name] = None if t is None else t[index]
        return RolloutBatch(**kw)

    def to(self, device) -> "RolloutBatch":
        kw = {n: (None if getattr(self, n) is None else getattr(self, n).to(device))
              for n in self._tensor_fields()}
        return RolloutBatch(**kw)

    def with_old_logp(self, old_logp: torch.Tensor) -> "RolloutBatch":
        return replace(self, old_logp=old_logp)

    def dp_shard(self, rank: Optional[int] = None, size: Optional[int] = None) -> "RolloutBatch":
        """This data-parallel rank's contiguous share of a global batch (B must divide evenly)."""
        if rank is None or size is None:
            from megatron.core import parallel_state as ps
            rank = ps.get_data_parallel_rank() if rank is None else rank
            size = ps.get_data_parallel_world_size() if size is None else size
        if self.batch_size % size:
            raise ValueError(f"batch size {self.batch_size} is not divisible by the data-parallel size {size}")
        per = self.batch_size // size
        return self.select(slice(rank * per, (rank + 1) * per))

    def pad_to(self, multiple: int, pad_token_id: int = 0) -> "RolloutBatch":
        """Right-pad the sequence dimension to a multiple of `multiple`."""
        s = self.seq_length
        target = int(math.ceil(s / multiple) * multiple) if multiple > 1 else s
        if target == s:
            return self
        extra = target - s

        def pad(t, value):
            if t is None or t.dim() < 2:
                return t
            return torch.nn.functional.pad(t, (0, extra), value=value)

        return RolloutBatch(tokens=pad(self.tokens, pad_token_id), loss_mask=pad(self.loss_mask, False),
                            advantages=pad(self.advantages, 0.0), old_logp=pad(self.old_logp, 0.0),
                            rollout_logp=pad(self.rollout_logp, 0.0), lengths=self.lengths)

    def columns(self, length: int) -> "RolloutBatch":
        """The first `length` positions of every row (dropping right padding)."""
        kw = {}
        for name in self._tensor_fields():
            t = getattr(self, name)
            kw[name] = t[:, :length] if t is not None and t.dim() == 2 else t
        kw["lengths"] = self.lengths.clamp(max=length)
        return RolloutBatch(**kw)

    def micro_batches(self, micro_batch_size: int) -> List["RolloutBatch"]:
        if micro_batch_size <= 0 or self.batch_size % micro_batch_size:
            raise ValueError(f"batch size {self.batch_size} is not divisible by micro_batch_size {micro_batch_size}")
        return [self.select(slice(i, i + micro_batch_size))
                for i in range(0, self.batch_size, micro_batch_size)]


def pad_sequences(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                  advantages, *, rollout_logp: Optional[Sequence[Sequence[float]]] = None,
                  pad_token_id: int = 0, pad_to_multiple: int = 1,
                  max_length: Optional[int] = None) -> RolloutBatch:
    """Build a RolloutBatch from token lists: row i = prompt_i + response_i, right-padded.

    `rollout_logp[i]` are the engine's log-probs of response_i's tokens. `max_length` truncates
    (the response end first).
    """
    rows, masks, rlps, lengths = [], [], [], []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if len(p) == 0:
            raise ValueError(f"pad_sequences: prompt {i} is empty (the first token needs a context)")
        seq = list(p) + list(r)
        m = [False] * len(p) + [True] * len(r)
        lp = [0.0] * len(p) + (list(rollout_logp[i]) if rollout_logp is not None else [0.0] * len(r))
        if max_length is not None:
            seq, m, lp = seq[:max_length], m[:max_length], lp[:max_length]
        rows.append(seq), masks.append(m), rlps.append(lp), lengths.append(len(seq))
    s = max(lengths)
    if pad_to_multiple > 1:
        s = int(math.ceil(s / pad_to_multiple) * pad_to_multiple)
    # padded Python rows, one tensor conversion per field (per-row tensors cost ~3x more)
    tokens = torch.tensor([x + [pad_token_id] * (s - len(x)) for x in rows], dtype=torch.long)
    mask = torch.tensor([x + [False] * (s - len(x)) for x in masks], dtype=torch.bool)
    rlp = torch.tensor([x + [0.0] * (s - len(x)) for x in rlps], dtype=torch.float32)
    adv = torch.as_tensor(advantages, dtype=torch.float32)
    return RolloutBatch(tokens=tokens, loss_mask=mask, advantages=adv,
                        rollout_logp=rlp if rollout_logp is not None else None,
                        lengths=torch.tensor(lengths, dtype=torch.long))


def shift_left(t: torch.Tensor, fill=0) -> torch.Tensor:
    """`out[:, j] = t[:, j + 1]`, last column `fill`: token-aligned -> prediction-aligned."""
    out = torch.empty_like(t)
    out[:, :-1] = t[:, 1:]
    out[:, -1] = fill
    return out
