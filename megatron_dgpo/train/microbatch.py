"""How a rank's batch is cut into micro-batches: fixed-size padded, token-budget padded, packed
(THD), packed with shared prompt prefixes.

* fixed (`max_tokens_per_micro_batch=0`, no packing): consecutive groups of `micro_batch_size` rows,
  every row padded to the whole batch's longest sequence (the original layout).
* token budget (`max_tokens_per_micro_batch=N`): sequences are binned by length with first-fit
  decreasing so that a micro-batch computes at most N tokens (rows x its own longest sequence; a
  sequence longer than N gets a micro-batch of its own). Each micro-batch is padded only to its own
  longest sequence, so micro-batches have different shapes (pipeline parallelism then needs
  Megatron's `variable_seq_lengths`). `micro_batch_size` is not used: a mini-batch of short
  responses that fits the budget runs as one micro-batch.
* packed (`pack_sequences=True`): the sequences of a micro-batch are concatenated into one row
  `[1, T]` with `cu_seqlens` (Megatron `PackedSeqParams(qkv_format="thd")`); positions restart per
  sequence and T is padded to the SP/FP8 multiple by one extra padding segment. The budget then
  counts T. Without a budget, each group of `micro_batch_size` sequences becomes one packed row.
* shared prefix (`pack="prefix"`, `algo.share_prompt_prefix`): like packed, but the rows of a
  micro-batch with the same prompt (the G samples of one prompt) hold one copy of it: a group is
  `[prompt without its last token | branch_1 | ... | branch_G]`, branch_i = row i from the prompt's
  last token on, under a tree attention mask (a branch sees the prefix and itself, causally) with
  RoPE at the row's own positions (model/rope_positions.py). Every token sees exactly the tokens,
  at the positions, of its own padded row, so the logits and the loss are the same; the prompt is
  computed once per micro-batch instead of once per sample (GRPO's G x). Bins and DP shares are made
  of whole prompt groups (`prompt_group_partition`).

Exactness: the loss normaliser is computed from the whole batch before it is cut (train/step.py),
each micro-batch's loss is a plain sum over its own sequences, and causal attention never lets a
real position see padding (padded rows) or another sequence (block-diagonal mask, THD; the tree
mask), so every layout gives the same loss and gradients up to float rounding.

Data parallelism: every DP rank must run the same number of micro-batches (the pipeline schedule
and the gradient reduction are collective). `dp_partition` deals a mini-batch's sequences to the
DP ranks with equal counts and near-equal tokens; `split` then adds micro-batches on ranks that
have fewer (splitting the fullest bin, or an empty micro-batch without loss tokens).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import torch

from megatron_dgpo.train.batch import RolloutBatch

# `pack`: False (rows), True (THD packed rows) or "prefix" (packed rows with shared prompt prefixes)
PackMode = Union[bool, str]

__all__ = ["MicroBatch", "Packing", "PackMode", "split", "dp_partition", "prompt_groups", "prompt_group_partition",
           "first_fit_decreasing", "round_up"]


def round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple) if multiple > 1 else n


@dataclass
class Packing:
    """THD layout of a micro-batch: its rows concatenated into one row of T tokens."""
    tokens: torch.Tensor  # [1, T] int64
    position_ids: torch.Tensor  # [1, T], restarting at 0 for every sequence
    cu_seqlens: torch.Tensor  # [segments + 1] int32 (the last segment may be padding)
    max_seqlen: int
    gather: torch.Tensor  # [n, L] int64: packed position of row token (i, t) (0 where invalid)
    valid: torch.Tensor  # [n, L] bool: t < length_i - 1 (positions with a prediction in the row)
    # Shared-prefix packing (`pack="prefix"`): [T, T] bool, True where query i must not see key j
    # (Megatron's mask convention); the row then runs as one padded [1, T] row (sbhd) with this
    # mask and RoPE at `position_ids` (model.rope_positions) instead of THD.
    attention_mask: Optional[torch.Tensor] = None

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """Prediction-aligned packed values `[1, T]` -> row layout `[n, L]` (0 where invalid).

        Packed position p predicts token p + 1, so the row value (i, t), the prediction of token
        t + 1 of sequence i, sits at p = start_i + t for t < length_i - 1; at t = length_i - 1 the
        packed value predicts the next sequence's first token and is dropped (the loss mask there
        is False in every layout)."""
        g, v = self.gather.to(x.device), self.valid.to(x.device)
        return torch.where(v, x[0][g], torch.zeros((), dtype=x.dtype, device=x.device))

    def packed_seq_params(self, device):
        from megatron.core.packed_seq_params import PackedSeqParams

        cu = self.cu_seqlens.to(device=device, dtype=torch.int32)
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                               max_seqlen_q=self.max_seqlen, max_seqlen_kv=self.max_seqlen)


@dataclass
class MicroBatch:
    rows: RolloutBatch  # its sequences, right-padded to [n, L]
    index: torch.Tensor  # [n] positions of the rows in the batch they were cut from
    packing: Optional[Packing] = None

    @property
    def input_ids(self) -> torch.Tensor:
        return self.rows.tokens if self.packing is None else self.packing.tokens

    @property
    def rope_positions(self) -> Optional[torch.Tensor]:
        """[T] RoPE positions of a shared-prefix row (model.rope_positions); None: 0..S-1."""
        p = self.packing
        return None if p is None or p.attention_mask is None else p.position_ids[0]

    @property
    def computed_tokens(self) -> int:
        return self.input_ids.numel()

    def model_inputs(self, device) -> dict:
        """Keyword arguments of GPTModel.forward (by keyword: 0.16 and 0.19 agree on these)."""
        tokens = self.input_ids.to(device, non_blocking=True)
        if self.packing is not None and self.packing.attention_mask is not None:
            return dict(input_ids=tokens, position_ids=self.packing.position_ids.to(device),
                        attention_mask=self.packing.attention_mask.to(device)[None, None])
        if self.packing is None:
            b, s = tokens.shape
            pos = torch.arange(s, device=device).unsqueeze(0).expand(b, -1)
            return dict(input_ids=tokens, position_ids=pos, attention_mask=None)
        return dict(input_ids=tokens, position_ids=self.packing.position_ids.to(device),
                    attention_mask=None, packed_seq_params=self.packing.packed_seq_params(device))


def first_fit_decreasing(lengths: Sequence[int], budget: int,
                         cost: Callable[[int, int], int]) -> List[List[int]]:
    """Bins of indices, longest sequences first; `cost(n, longest, total)` is the tokens a bin of
    n sequences (longest `longest`, `total` tokens together) computes. A sequence alone over budget gets
    its own bin."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: List[List[int]] = []
    longest: List[int] = []
    sums: List[int] = []
    for i in order:
        n = lengths[i]
        for b in range(len(bins)):
            if cost(len(bins[b]) + 1, max(longest[b], n), sums[b] + n) <= budget:
                bins[b].append(i)
                longest[b], sums[b] = max(longest[b], n), sums[b] + n
                break
        else:
            bins.append([i]), longest.append(n), sums.append(n)
    return bins


def dp_partition(lengths: Sequence[int], dp: int) -> List[List[int]]:
    """Equal-count shares of a batch for `dp` ranks with near-equal token totals (greedy: the
    longest remaining sequence goes to the share with the fewest tokens that is not full).
    Deterministic, so every rank computes the same partition. Requires len % dp == 0."""
    if len(lengths) % dp:
        raise ValueError(f"batch size {len(lengths)} is not divisible by the data-parallel size {dp}")
    per = len(lengths) // dp
    shares: List[List[int]] = [[] for _ in range(dp)]
    tokens = [0] * dp
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min((r for r in range(dp) if len(shares[r]) < per), key=lambda r: (tokens[r], r))
        shares[r].append(i)
        tokens[r] += lengths[i]
    return [sorted(s) for s in shares]


def prompt_group_partition(batch: RolloutBatch, dp: int) -> List[List[int]]:
    """Equal-count shares for `dp` ranks that keep a prompt's rows together (shared-prefix
    packing): the rows in prompt-group order, cut into `dp` contiguous pieces (at most dp - 1
    groups are split). Requires len % dp == 0."""
    if batch.batch_size % dp:
        raise ValueError(f"batch size {batch.batch_size} is not divisible by the data-parallel size {dp}")
    order = [i for g in prompt_groups(batch) for i in g]
    per = len(order) // dp
    return [sorted(order[r * per:(r + 1) * per]) for r in range(dp)]


def _dp_max(n: int) -> int:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized() or ps.get_data_parallel_world_size() == 1:
        return n
    from megatron_dgpo.distributed import device

    t = torch.tensor([n], dtype=torch.int64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
    return int(t.item())


def _equalise(bins: List[List[int]], target: int, lengths: Sequence[int]) -> List[List[int]]:
    """Add bins until there are `target`: halve the bin with most sequences, else add empties."""
    bins = [list(b) for b in bins]
    while len(bins) < target:
        k = max(range(len(bins)), key=lambda b: (len(bins[b]), -b)) if bins else None
        if k is None or len(bins[k]) < 2:
            bins.append([])
            continue
        b = bins.pop(k)
        half = len(b) // 2
        bins[k:k] = [b[:half], b[half:]]
    return bins


def _rows(batch: RolloutBatch, idx: List[int], pad_multiple: int, pad_token_id: int) -> RolloutBatch:
    """The rows `idx`, cut to their own longest sequence (rounded up to pad_multiple)."""
    if not idx:  # an empty micro-batch: one row of padding, no loss token
        n = max(pad_multiple, 2)
        return RolloutBatch(tokens=torch.full((1, n), pad_token_id, dtype=torch.long),
                            loss_mask=torch.zeros((1, n), dtype=torch.bool),
                            advantages=torch.zeros((1, n) if batch.advantages.dim() == 2 else (1,)),
                            old_logp=None if batch.old_logp is None else torch.zeros((1, n)),
                            rollout_logp=None if batch.rollout_logp is None else torch.zeros((1, n)),
                            lengths=torch.ones(1, dtype=torch.long))
    sub = batch.select(torch.tensor(idx, dtype=torch.long))
    length = round_up(int(sub.lengths.max()), pad_multiple)
    return sub.columns(length) if length <= batch.seq_length else sub.pad_to(length)


def _pack(rows: RolloutBatch, pad_multiple: int, pad_token_id: int) -> Packing:
    lens = [int(x) for x in rows.lengths.tolist()]
    total = sum(lens)
    t = round_up(total, pad_multiple)
    segs = lens + ([t - total] if t > total else [])
    tokens = torch.full((1, t), pad_token_id, dtype=torch.long)
    pos = torch.zeros((1, t), dtype=torch.long)
    n, width = rows.tokens.shape
    gather = torch.zeros((n, width), dtype=torch.long)
    valid = torch.zeros((n, width), dtype=torch.bool)
    start = 0
    for i, ln in enumerate(lens):
        tokens[0, start:start + ln] = rows.tokens[i, :ln]
        pos[0, start:start + ln] = torch.arange(ln)
        gather[i, :ln] = torch.arange(start, start + ln)
        valid[i, :max(ln - 1, 0)] = True
        start += ln
    if t > total:
        pos[0, total:] = torch.arange(t - total)
    cu = torch.tensor([0] + list(torch.tensor(segs).cumsum(0).tolist()), dtype=torch.int32)
    return Packing(tokens=tokens, position_ids=pos, cu_seqlens=cu, max_seqlen=max(segs),
                   gather=gather, valid=valid)


@dataclass
class _Groups:
    """Rows with the same prompt (the tokens before their first loss token), in order of first
    appearance (a row without a loss token is a group of its own), and the tokens each group shares
    in a packed row: its prompt but the last token (every row's branch starts with that token, so
    each packed position has one next token); 0 for a group of one row."""
    groups: List[List[int]]
    shared: List[int]
    lengths: List[int]
    tokens: List[List[int]]

    @classmethod
    def of(cls, rows: RolloutBatch) -> "_Groups":
        lm = rows.loss_mask
        first = torch.where(lm.any(1), lm.int().argmax(1), rows.lengths).tolist()
        lengths, tokens = rows.lengths.tolist(), rows.tokens.tolist()
        keys: dict = {}
        groups: List[List[int]] = []
        prompt: List[int] = []
        for i, (p, ln) in enumerate(zip(first, lengths)):
            key = tuple(tokens[i][:p]) if p < ln else ("row", i)
            if key not in keys:
                keys[key] = len(groups)
                groups.append([])
                prompt.append(p)
            groups[keys[key]].append(i)
        shared = [max(p - 1, 0) if len(g) > 1 else 0 for g, p in zip(groups, prompt)]
        return cls(groups, shared, lengths, tokens)

    def packed_tokens(self, g: int) -> int:
        return self.shared[g] + sum(self.lengths[i] - self.shared[g] for i in self.groups[g])


def prompt_groups(rows: RolloutBatch) -> List[List[int]]:
    """Row indices of `rows` grouped by prompt, in order of first appearance (see `_Groups`)."""
    return _Groups.of(rows).groups


def _pack_prefix(rows: RolloutBatch, pad_multiple: int, pad_token_id: int) -> Packing:
    """One packed row in which the rows of a prompt group share their prompt: `[prefix | branch_1 |
    ... | branch_k]` per group, branch_i = row i from the prompt's last token on. Query i may see
    key j iff both are in the same group, j is not after i, and j is in the prefix or in i's branch;
    positions restart per group and continue the prefix in each branch. Every row's tokens,
    positions and visible context are those of its own padded row, so the logits are the same."""
    n, width = rows.tokens.shape
    G = _Groups.of(rows)
    tok: List[int] = []
    pos: List[int] = []
    seg: List[int] = []  # group of each packed token
    branch: List[int] = []  # 0: a group's prefix, else its row + 1
    gather = [[0] * width for _ in range(n)]
    for g, members in enumerate(G.groups):
        p, start = G.shared[g], len(tok)
        tok += G.tokens[members[0]][:p]
        pos += range(p)
        seg += [g] * p
        branch += [0] * p
        for i in members:
            ln, at = G.lengths[i], len(tok)
            tok += G.tokens[i][p:ln]
            pos += range(p, ln)
            seg += [g] * (ln - p)
            branch += [i + 1] * (ln - p)
            gather[i][:ln] = list(range(start, start + p)) + list(range(at, at + ln - p))
    total = len(tok)
    t = round_up(max(total, 1), pad_multiple)
    pad = t - total  # the padding tail: a causal segment of its own
    tokens = torch.tensor(tok + [pad_token_id] * pad, dtype=torch.long)
    pos_t = torch.tensor(pos + list(range(pad)), dtype=torch.long)
    seg_t = torch.tensor(seg + [len(G.groups)] * pad, dtype=torch.long)
    branch_t = torch.tensor(branch + [0] * pad, dtype=torch.long)
    idx = torch.arange(t)
    allowed = (seg_t[:, None] == seg_t[None, :]) & (idx[None, :] <= idx[:, None]) & (
        (branch_t[None, :] == 0) | (branch_t[None, :] == branch_t[:, None]))
    valid = torch.arange(width)[None, :] < (rows.lengths - 1)[:, None]
    return Packing(tokens=tokens[None], position_ids=pos_t[None], cu_seqlens=torch.tensor([0, t], dtype=torch.int32),
                   max_seqlen=t, gather=torch.tensor(gather, dtype=torch.long), valid=valid,
                   attention_mask=~allowed)


def _budget_bins(batch: RolloutBatch, max_tokens: int, pack: PackMode, pad_multiple: int) -> List[List[int]]:
    if pack:
        cost = lambda n, longest, total: round_up(total, pad_multiple)  # noqa: E731
    else:
        cost = lambda n, longest, total: n * round_up(longest, pad_multiple)  # noqa: E731
    if pack == "prefix":  # whole prompt groups, costed as packed
        G = _Groups.of(batch)
        bins = first_fit_decreasing([G.packed_tokens(g) for g in range(len(G.groups))], max_tokens, cost)
        return [[i for g in b for i in G.groups[g]] for b in bins]
    return first_fit_decreasing([int(x) for x in batch.lengths.tolist()], max_tokens, cost)


def local_count(batch: RolloutBatch, *, max_tokens: int = 0, pack: PackMode = False, pad_multiple: int = 1) -> int:
    """How many token-budget micro-batches `batch` needs on this rank before the DP ranks are
    equalised (0 for the row layouts, which need no equalising): lets a caller agree on the
    count in a collective it makes anyway (`split(num_bins=...)`)."""
    return len(_budget_bins(batch, max_tokens, pack, pad_multiple)) if max_tokens > 0 else 0


def split(batch: RolloutBatch, *, micro_batch_size: int, max_tokens: int = 0, pack: PackMode = False,
          pad_multiple: int = 1, pad_token_id: int = 0, equalise_over_dp: bool = True,
          num_bins: Optional[int] = None) -> List[MicroBatch]:
    """This rank's micro-batches of `batch` (see the module docstring for the layouts).
    Token-budget micro-batches are equalised to the largest count over the DP ranks: `num_bins`
    when the caller already knows it (the max of `local_count` over DP), else one all-reduce."""
    if isinstance(pack, str) and pack != "prefix":
        raise ValueError(f"pack={pack!r}: expected False, True or 'prefix'")
    if max_tokens <= 0 and not pack:  # the original layout: one common padded length
        padded = batch.pad_to(pad_multiple)
        return [MicroBatch(rows=mb, index=torch.arange(i, i + mb.batch_size))
                for i, mb in zip(range(0, batch.batch_size, max(micro_batch_size, 1)),
                                 padded.micro_batches(micro_batch_size))]
    lengths = [int(x) for x in batch.lengths.tolist()]
    beyond = torch.arange(batch.seq_length)[None, :] >= batch.lengths[:, None]
    if bool((batch.loss_mask & beyond).any()):
        raise ValueError("RolloutBatch: loss_mask is True beyond a row's length")
    if max_tokens > 0:
        bins = _budget_bins(batch, max_tokens, pack, pad_multiple)
        if num_bins is not None:
            if num_bins < len(bins):
                raise ValueError(f"split: num_bins={num_bins} is below this rank's {len(bins)} micro-batches")
            bins = _equalise(bins, num_bins, lengths)
        elif equalise_over_dp:
            bins = _equalise(bins, _dp_max(len(bins)), lengths)
    else:  # packing without a budget: micro_batch_size sequences per packed row
        if micro_batch_size <= 0 or batch.batch_size % micro_batch_size:
            raise ValueError(f"batch size {batch.batch_size} is not divisible by micro_batch_size {micro_batch_size}")
        bins = [list(range(i, i + micro_batch_size)) for i in range(0, batch.batch_size, micro_batch_size)]
    out = []
    for idx in bins:
        rows = _rows(batch, idx, 1 if pack else pad_multiple, pad_token_id)
        packing = (_pack_prefix if pack == "prefix" else _pack)(rows, pad_multiple, pad_token_id) if pack else None
        out.append(MicroBatch(rows=rows, index=torch.tensor(idx, dtype=torch.long), packing=packing))
    return out
