"""Tensor rules between HF tensors and Megatron tensor-parallel shards.

Megatron (TP size t, shard r):

* ``qkv``: ``linear_qkv`` rows are grouped per query group g: ``[q heads of g (q_per_group*hd rows),
  k_g (hd rows), v_g (hd rows)]``; shard r holds rows ``[r*S, (r+1)*S)`` of that TP=1 tensor,
  S = rows / t (bias the same). With ng % t == 0 these are the groups ``[r*ng/t, (r+1)*ng/t)``;
  with fewer KV heads than TP (t % ng == 0) the t/ng ranks of a group hold equal row blocks of
  it, which Megatron-Core all-gathers in the forward to give each rank its q heads and a copy of
  the group's k/v (see `megatron.core.transformer.attention.get_query_key_value_tensors`).
* ``gate_up``: ``linear_fc1`` shard r is ``[gate[r*F/t:(r+1)*F/t]; up[r*F/t:(r+1)*F/t]]``: the
  gathered tensor is *not* ``[gate; up]`` unless t == 1.
* ``vocab``: the vocabulary is padded to ``cfg.padded_vocab_size(t)`` rows (zeros) and split in t
  equal row blocks; padding is stripped when streaming to HF.
* ``copy`` with ``tp_dim`` d: equal split along d; ``tp_dim`` None: replicated.

Streaming works on *pieces*: `hf_pieces` turns the list of gathered Megatron shards into, for each
HF tensor, a list of `Piece(dim, start, src)` views (no copies) that `copy_pieces` writes into any
destination region (the whole HF tensor, or one inference-TP shard of it) with one copy per byte,
casting dtype on the way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from megatron_dgpo.model.config import ModelConfig
from megatron_dgpo.weight_sync.layouts import TensorRule, hf_shapes


# ----------------------------------------------------------------------------- whole-tensor rules
def qkv_interleave(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int) -> torch.Tensor:
    """HF q/k/v (weights [rows, H] or biases [rows]) -> Megatron ``linear_qkv`` (TP=1 layout)."""
    ng = num_query_groups
    rest = tuple(q.shape[1:])
    if q.shape[0] % ng or k.shape[0] % ng or k.shape != v.shape:
        raise ValueError(f"qkv shapes q={tuple(q.shape)} k={tuple(k.shape)} v={tuple(v.shape)} "
                         f"do not split into {ng} query groups")
    return torch.cat([q.reshape(ng, -1, *rest), k.reshape(ng, -1, *rest), v.reshape(ng, -1, *rest)],
                     dim=1).reshape(-1, *rest)


def qkv_deinterleave(qkv: torch.Tensor, num_heads: int, num_query_groups: int, head_dim: int):
    """Megatron ``linear_qkv`` (any whole number of groups) -> (q, k, v) contiguous tensors."""
    qpg = num_heads // num_query_groups
    rest = tuple(qkv.shape[1:])
    x = qkv.reshape(-1, qpg + 2, head_dim, *rest)
    return (x[:, :qpg].reshape(-1, *rest), x[:, qpg].reshape(-1, *rest), x[:, qpg + 1].reshape(-1, *rest))


def gate_up_merge(gate: torch.Tensor, up: torch.Tensor, tp: int = 1) -> torch.Tensor:
    """HF gate/up -> the concatenation of the t Megatron ``linear_fc1`` shards."""
    return torch.cat([torch.cat([g, u]) for g, u in zip(gate.chunk(tp), up.chunk(tp))])


def gate_up_split(fc1: torch.Tensor, tp: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated Megatron ``linear_fc1`` shards (TP size t) -> (gate, up)."""
    shards = fc1.chunk(tp)
    halves = [s.chunk(2) for s in shards]
    return torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])


def vocab_pad(t: torch.Tensor, padded_rows: int) -> torch.Tensor:
    if t.shape[0] > padded_rows:
        raise ValueError(f"vocab rows {t.shape[0]} > padded size {padded_rows}")
    if t.shape[0] == padded_rows:
        return t
    return torch.cat([t, t.new_zeros(padded_rows - t.shape[0], *t.shape[1:])])


def vocab_strip(t: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return t[:vocab_size]


# ----------------------------------------------------------------------------- HF -> Megatron shard
Reader = Callable[[str, "int | None", int, int], torch.Tensor]
"""read(hf_name, dim, start, stop) -> the slice [start, stop) of the HF tensor along dim (dim None: all)."""


def megatron_shard_from_hf(rule: TensorRule, layer: int | None, cfg: ModelConfig, tp: int, rank: int,
                           read: Reader) -> torch.Tensor:
    """Build Megatron TP shard `rank` of `rule` reading only the needed HF slices."""
    names = rule.hf_names(layer)
    shapes = hf_shapes(cfg, rule)
    if rule.rule == "copy":
        if rule.tp_dim is None:
            return read(names[0], None, 0, 0)
        n = shapes[0][rule.tp_dim]
        _check_div(n, tp, names[0])
        c = n // tp
        return read(names[0], rule.tp_dim, rank * c, (rank + 1) * c)
    if rule.rule == "vocab":
        rows = cfg.padded_vocab_size(tp) // tp
        lo, hi = rank * rows, min((rank + 1) * rows, cfg.vocab_size)
        part = read(names[0], 0, lo, hi) if hi > lo else None
        out = torch.zeros(rows, cfg.hidden_size, dtype=part.dtype if part is not None else torch.float32)
        if part is not None:
            out[: hi - lo] = part
        return out
    if rule.rule == "qkv":
        ng, hd = cfg.num_query_groups, cfg.head_dim
        qpg = cfg.num_attention_heads // ng
        block, lo, hi = qkv_shard_rows(cfg, tp, rank)
        g0, g1 = lo // block, -(-hi // block)  # the groups this shard's rows overlap
        q = read(names[0], 0, g0 * qpg * hd, g1 * qpg * hd)
        k = read(names[1], 0, g0 * hd, g1 * hd)
        v = read(names[2], 0, g0 * hd, g1 * hd)
        return qkv_interleave(q, k, v, g1 - g0)[lo - g0 * block: hi - g0 * block]
    if rule.rule == "gate_up":
        F = cfg.ffn_hidden_size
        _check_div(F, tp, "ffn_hidden_size")
        c = F // tp
        return torch.cat([read(names[0], 0, rank * c, (rank + 1) * c), read(names[1], 0, rank * c, (rank + 1) * c)])
    raise AssertionError(rule.rule)


def qkv_shard_rows(cfg: ModelConfig, tp: int, rank: int) -> tuple[int, int, int]:
    """(rows per query group, first row, end row) of Megatron ``linear_qkv`` TP shard `rank`.

    Megatron-Core needs t | ng or ng | t (fewer KV heads than TP) and t | num_attention_heads.
    """
    ng, hd, nq = cfg.num_query_groups, cfg.head_dim, cfg.num_attention_heads
    if ng % tp and tp % ng:
        raise ValueError(f"num_query_groups {ng} and tensor-parallel size {tp}: one must divide the other")
    _check_div(nq, tp, "num_attention_heads")
    block = (nq // ng + 2) * hd
    size = ng * block // tp
    return block, rank * size, (rank + 1) * size


def _check_div(n: int, tp: int, what: str):
    if n % tp:
        raise ValueError(f"{what}: size {n} is not divisible by tensor-parallel size {tp}")


# ----------------------------------------------------------------------------- Megatron shards -> HF
@dataclass
class Piece:
    """`src` covers [start, start + src.shape[dim]) of the HF tensor along `dim` (dim None: all)."""
    dim: int | None
    start: int
    src: torch.Tensor


def hf_pieces(rule: TensorRule, cfg: ModelConfig, shards: Sequence[torch.Tensor]) -> list[list[Piece]]:
    """Gathered Megatron TP shards (rank order) -> for each HF tensor of the rule, its pieces (views)."""
    tp = len(shards)
    if rule.rule == "copy":
        if rule.tp_dim is None:
            return [[Piece(None, 0, shards[0])]]
        d = rule.tp_dim
        c = shards[0].shape[d]
        return [[Piece(d, r * c, s) for r, s in enumerate(shards)]]
    if rule.rule == "vocab":
        rows = shards[0].shape[0]
        out = []
        for r, s in enumerate(shards):
            lo, hi = r * rows, min((r + 1) * rows, cfg.vocab_size)
            if hi > lo:
                out.append(Piece(0, lo, s[: hi - lo]))
        return [out]
    if rule.rule == "gate_up":
        c = shards[0].shape[0] // 2
        return [[Piece(0, r * c, s[:c]) for r, s in enumerate(shards)],
                [Piece(0, r * c, s[c:]) for r, s in enumerate(shards)]]
    if rule.rule == "qkv":
        ng, hd = cfg.num_query_groups, cfg.head_dim
        qpg = cfg.num_attention_heads // ng
        out: list[list[Piece]] = [[], [], []]
        for r, s in enumerate(shards):
            block, lo, hi = qkv_shard_rows(cfg, tp, r)
            for g in range(lo // block, -(-hi // block)):
                # the group's q, k, v segments in interleaved rows, and where each starts in HF q/k/v
                segs = ((g * block, qpg * hd, 0, g * qpg * hd), (g * block + qpg * hd, hd, 1, g * hd),
                        (g * block + (qpg + 1) * hd, hd, 2, g * hd))
                for a, n, which, hf_start in segs:
                    a0, a1 = max(a, lo), min(a + n, hi)
                    if a0 < a1:
                        out[which].append(Piece(0, hf_start + a0 - a, s[a0 - lo: a1 - lo]))
        return out
    raise AssertionError(rule.rule)


@dataclass(frozen=True)
class Region:
    """A box [start, stop) along `dim` of an HF tensor of shape `shape` (dim None: all of it)."""
    shape: tuple[int, ...]
    dim: int | None = None
    start: int = 0
    stop: int = 0

    @property
    def out_shape(self) -> tuple[int, ...]:
        if self.dim is None:
            return self.shape
        s = list(self.shape)
        s[self.dim] = self.stop - self.start
        return tuple(s)

    def numel(self) -> int:
        n = 1
        for x in self.out_shape:
            n *= x
        return n

    def box(self) -> list[tuple[int, int]]:
        b = [(0, n) for n in self.shape]
        if self.dim is not None:
            b[self.dim] = (self.start, self.stop)
        return b


def copy_pieces(dst: torch.Tensor, region: Region, pieces: Sequence[Piece]) -> int:
    """Write the parts of `pieces` inside `region` into `dst` (shape region.out_shape). Returns elements written."""
    rbox = region.box()
    written = 0
    for p in pieces:
        pbox = [(0, n) for n in region.shape]
        if p.dim is not None:
            pbox[p.dim] = (p.start, p.start + p.src.shape[p.dim])
        inter = [(max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(pbox, rbox)]
        if any(lo >= hi for lo, hi in inter):
            continue
        s, d = p.src, dst
        for dim, (lo, hi) in enumerate(inter):
            if (lo, hi) != pbox[dim]:
                s = s.narrow(dim, lo - pbox[dim][0], hi - lo)
            if (lo, hi) != rbox[dim]:
                d = d.narrow(dim, lo - rbox[dim][0], hi - lo)
        d.copy_(s)
        written += s.numel()
    return written


# ----------------------------------------------------------------------------- inference TP sharding
def inference_region(rule: TensorRule, index: int, cfg: ModelConfig, tp: int, rank: int) -> Region:
    """Region of HF tensor `index` of `rule` held by inference-engine TP rank `rank` of `tp`.

    Convention (vLLM / SGLang style for the projections; their vocabulary split pads V to a multiple
    of 64 first, which this does not): q/k/v/gate/up (and q/k/v biases) split along dim 0,
    o_proj/down_proj along dim 1, embed_tokens/lm_head along the vocab (dim 0) in blocks of
    ceil(V / tp) rows (the last block may be shorter; the engine pads), norms replicated.
    When tp > num_key_value_heads (tp % num_kv_heads == 0) each rank gets the whole kv head
    ``rank * num_kv_heads // tp`` (replicated kv heads).
    """
    shape = hf_shapes(cfg, rule)[index]
    d = rule.tp_dim
    if d is None or tp == 1:
        return Region(shape)
    n = shape[d]
    if rule.rule == "vocab":
        c = -(-n // tp)
        return Region(shape, d, min(rank * c, n), min((rank + 1) * c, n))
    if rule.rule == "qkv" and index > 0:
        ng, hd = cfg.num_query_groups, cfg.head_dim
        if ng % tp == 0:
            c = n // tp
            return Region(shape, d, rank * c, (rank + 1) * c)
        if tp % ng == 0:
            h = rank * ng // tp
            return Region(shape, d, h * hd, (h + 1) * hd)
        raise ValueError(f"inference TP {tp} vs num_key_value_heads {ng}: one must divide the other")
    if rule.rule == "qkv" and cfg.num_attention_heads % tp:
        raise ValueError(f"num_attention_heads {cfg.num_attention_heads} not divisible by inference TP {tp}")
    _check_div(n, tp, rule.hf[index])
    c = n // tp
    return Region(shape, d, rank * c, (rank + 1) * c)


def shard_hf_tensor(rule: TensorRule, index: int, tensor: torch.Tensor, cfg: ModelConfig, tp: int,
                    rank: int) -> torch.Tensor:
    """Reference: the inference-TP shard of one whole HF tensor (a view)."""
    reg = inference_region(rule, index, cfg, tp, rank)
    if reg.dim is None:
        return tensor
    return tensor.narrow(reg.dim, reg.start, reg.stop - reg.start)
