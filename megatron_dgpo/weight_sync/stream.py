"""Stream a Megatron model of any TP/PP layout as HF-layout tensors, in checksummed buckets.

Usage (every rank of the job calls it, in lockstep; only receivers get buckets)::

    streamer = WeightStreamer(model, model_cfg, receivers=None, bucket_bytes=256 << 20,
                              dtype=torch.bfloat16)           # collective, once
    for bucket in streamer.stream():                          # collective, per sync
        engine.load(bucket.named_tensors())                   # receivers only

or, for a one-off, ``for name, t in iter_hf_weights(model, model_cfg): ...``.

What happens per bucket (all ranks iterate the same plan, computed once from the model config
and an all_gather of which rank holds which parameter):

1. On the owning pipeline stage (data-parallel/context-parallel rank 0 replica), the TP ranks
   `gather` their shards of the bucket's parameters to their TP rank 0 (the bucket's *source*),
   in one flat buffer per bucket.
2. The source turns the shards into HF tensors (QKV un-interleaved per query group, gate/up split
   per shard, vocab padding stripped, cast to `dtype`) written straight into the bucket's flat byte
   buffer: one copy per byte, no whole-model staging. With ``target_tp=k`` it writes k buffers, the
   j-th holding inference TP rank j's shards (see `transforms.inference_region`).
3. The source appends a checksum (two int64 words over the payload bytes, seeded by the bucket
   index, the receiver slot and the weight version: see `payload_checksum`) and sends the buffer:
   a broadcast to {source} + receivers (``target_tp=None``), or point-to-point to receiver j
   (``target_tp=k``).
4. Each receiver verifies the checksum (`WeightSyncIntegrityError` on mismatch) and gets a
   `WeightBucket` whose tensors are views into the received buffer.

Memory: per rank, the streamer holds at most one bucket (k buffers of ~bucket_bytes/k each with
``target_tp``) plus, on sources with TP > 1, the gathered shards of that bucket (TP x its local
shards: about one more bucket). A tensor
larger than `bucket_bytes` travels alone in an oversize bucket.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

from megatron_dgpo.model.config import ModelConfig
from megatron_dgpo.weight_sync.layouts import (
    TIED_OUTPUT, TensorRule, hf_shapes, iter_rule_instances, megatron_matcher, get_layout,
)
from megatron_dgpo.weight_sync.transforms import Region, copy_pieces, hf_pieces, inference_region

ALIGN = 64  # byte alignment of each tensor inside a bucket
CHECK_ROW_WORDS = 1024  # int64 words per checksum row; payload is padded to a whole row
TAIL = 16  # two int64 checksum words after the payload
CHECK_CHUNK_ROWS = 64  # rows per checksum step (512 KiB, cache-sized): bounds its temporary


class WeightSyncIntegrityError(RuntimeError):
    """A received bucket's bytes do not match the sender's checksum."""


class WeightSyncError(ValueError):
    """The model does not match the layout table (names the parameter)."""


# ----------------------------------------------------------------------------- checksum
_M64 = (1 << 64) - 1


def _i64(x: int) -> int:
    x &= _M64
    return x - (1 << 64) if x >> 63 else x


def _splitmix(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def bucket_seed(index: int, version: int = 0, slot: int = 0) -> int:
    """The checksum seed of bucket `index` for receiver slot `slot` of weight version `version`."""
    h = _splitmix(int(index) & _M64)
    h = _splitmix(h ^ (int(version) & _M64))
    return _splitmix(h ^ (int(slot) & _M64))


def _position_weighted(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """sum_j (2j + 1) * x_j over words x_j = x[r, c], j = r * W + c, from the row sums and the
    column sums of x (modulo 2**64): two fast reductions instead of a multiply per word."""
    r = torch.arange(rows.numel(), dtype=torch.int64, device=rows.device)
    c = torch.arange(cols.numel(), dtype=torch.int64, device=cols.device)
    return (2 * cols.numel()) * (r * rows).sum() + 2 * (c * cols).sum() + rows.sum()


def payload_checksum(payload: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """int64[2] over a uint8 payload whose size is a multiple of 8 * CHECK_ROW_WORDS.

    With x_j the payload's int64 words and f(x) = x ^ (x >> 32) (the high half folded onto the
    low half), modulo 2**64:
      word 0 = h0(seed) + sum_j (2j + 1) * x_j
      word 1 = h1(seed) + sum_j (2j + 1) * f(x_j)
    Every word has its own odd weight, so a changed word, swapped words or tensors (inside a row
    or not) and swapped rows change word 0, unless the two words differ only in their top bits
    (a linear sum modulo 2**64 is blind to (x - y) * (w_p - w_q) = 0 mod 2**64, e.g. a swap of two
    words that differ only in a sign bit): their folded values differ in the low half, which word
    1 sees. The seed (bucket index, receiver slot, weight version: `bucket_seed`) makes an
    all-zero buffer and a stale bucket of the same size fail. Integer sums modulo 2**64 do not
    depend on reduction order, so CPU and GPU agree; the fold runs in chunks of
    CHECK_CHUNK_ROWS rows to bound its temporary.
    """
    x = payload.view(torch.int64).view(-1, CHECK_ROW_WORDS)
    dev = x.device
    rows = torch.empty((2, x.shape[0]), dtype=torch.int64, device=dev)  # plain, folded
    cols = torch.zeros((2, CHECK_ROW_WORDS), dtype=torch.int64, device=dev)
    tmp = torch.empty((min(CHECK_CHUNK_ROWS, x.shape[0]), CHECK_ROW_WORDS), dtype=torch.int64, device=dev)
    for start in range(0, x.shape[0], CHECK_CHUNK_ROWS):  # one pass; each chunk stays in cache
        c = x[start:start + CHECK_CHUNK_ROWS]
        end = start + c.shape[0]
        rows[0, start:end] = c.sum(dim=1)
        cols[0] += c.sum(dim=0)
        f = tmp[:c.shape[0]]
        torch.bitwise_right_shift(c, 32, out=f)
        f ^= c
        rows[1, start:end] = f.sum(dim=1)
        cols[1] += f.sum(dim=0)
    words = torch.stack([_position_weighted(rows[0], cols[0]), _position_weighted(rows[1], cols[1])])
    return words + torch.tensor([_i64(_splitmix(seed)), _i64(_splitmix(seed ^ 0x5BD1E995))],
                                dtype=torch.int64, device=x.device)


def _storage_uses(t: torch.Tensor) -> int | None:
    """Reference count of t's storage (None where torch does not expose it)."""
    fn = getattr(torch._C, "_storage_Use_Count", None)
    if fn is None:
        return None
    return fn(t.untyped_storage()._cdata)


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


# ----------------------------------------------------------------------------- parallel info
@dataclass
class _Par:
    rank: int = 0
    world: int = 1
    tp: int = 1
    tp_rank: int = 0
    tp_group: object = None
    tp_src: int = 0
    pp_rank: int = 0
    pp: int = 1
    dp_cp_rank: int = 0
    distributed: bool = False


def _parallel_info() -> _Par:
    if not (dist.is_available() and dist.is_initialized()):
        return _Par()
    p = _Par(rank=dist.get_rank(), world=dist.get_world_size(), distributed=True)
    try:
        from megatron.core import parallel_state as ps
        initialized = ps.model_parallel_is_initialized()
    except ImportError:  # pragma: no cover
        initialized = False
    if initialized:
        p.tp = ps.get_tensor_model_parallel_world_size()
        p.tp_rank = ps.get_tensor_model_parallel_rank()
        p.tp_group = ps.get_tensor_model_parallel_group()
        p.tp_src = ps.get_tensor_model_parallel_src_rank()
        p.pp_rank = ps.get_pipeline_model_parallel_rank()
        p.pp = ps.get_pipeline_model_parallel_world_size()
        p.dp_cp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
    else:
        p.tp_src = p.rank
        p.dp_cp_rank = p.rank
    return p


# ----------------------------------------------------------------------------- local parameters
def _unwrap(m):
    while hasattr(m, "module") and isinstance(getattr(m, "module"), torch.nn.Module):
        m = m.module
    return m


def local_megatron_params(model, cfg: ModelConfig) -> dict[tuple[int, int | None], torch.Tensor]:
    """{(rule index, global layer | None): local TP shard} for the parameters this rank holds.

    `model` is a GPTModel (possibly DDP/Float16Module-wrapped), a list of virtual-pipeline chunks,
    or a mapping {megatron name: tensor} whose layer indices are global.
    """
    rules = get_layout(cfg)
    index = {id(r): n for n, r in enumerate(rules)}
    matcher = megatron_matcher(rules)
    out: dict[tuple[int, int | None], torch.Tensor] = {}

    def add(name: str, t: torch.Tensor, offsets):
        m = matcher.match(name)
        if m is None:
            if cfg.tie_word_embeddings and name == TIED_OUTPUT[0]:
                return  # last-stage copy of the tied embedding: HF has no lm_head
            if name.endswith("_extra_state"):
                return
            raise WeightSyncError(f"Megatron parameter {name!r} has no rule in the {cfg.arch} layout table")
        rule, local = m
        layer = None if local is None else offsets(local)
        key = (index[id(rule)], layer)
        if key in out:
            raise WeightSyncError(f"Megatron parameter {name!r} matched twice (layer {layer})")
        out[key] = t.detach()

    if isinstance(model, Mapping):
        for name, t in model.items():
            add(name, t, lambda i: i)
        return out
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        chunk = _unwrap(chunk)
        layers = getattr(getattr(chunk, "decoder", None), "layers", None)

        def offsets(i, layers=layers):
            if layers is None:
                return i
            return int(layers[i].layer_number) - 1

        for name, p in chunk.named_parameters():
            add(name, p, offsets)
    return out


# ----------------------------------------------------------------------------- plan
@dataclass
class _Entry:
    rule_idx: int
    rule: TensorRule
    layer: int | None
    src: int
    names: tuple[str, ...]
    regions: list[list[Region]]  # [slot][hf index]
    offsets: list[list[int]] = field(default_factory=list)  # [slot][hf index] byte offsets


@dataclass
class _Bucket:
    src: int
    entries: list[_Entry]
    sizes: list[int]  # per slot: padded payload bytes (without checksum tail)


@dataclass
class StreamStats:
    buckets: int = 0
    tensors: int = 0
    payload_bytes: int = 0  # HF tensor bytes received (sum over receivers' slots on this rank)
    sent_bytes: int = 0  # bytes this rank sent as a source
    peak_buffer_bytes: int = 0  # largest bucket buffers + gather staging held at once on this rank
    seconds: float = 0.0


@dataclass
class WeightBucket:
    """Tensors received in one bucket: views into `buffer` (uint8 payload + checksum tail)."""
    index: int
    names: list[str]
    tensors: list[torch.Tensor]
    buffer: torch.Tensor
    payload_bytes: int
    inference_rank: int | None = None
    version: int = 0  # the weight version this bucket belongs to (enters the checksum seed)

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return list(zip(self.names, self.tensors))

    @property
    def seed(self) -> int:
        return bucket_seed(self.index, self.version, self.inference_rank or 0)

    def verify(self):
        """Raise WeightSyncIntegrityError when the payload does not match the checksum tail (which
        also covers this bucket's index, receiver slot and weight version)."""
        p = self.payload_bytes
        got = payload_checksum(self.buffer[:p], self.seed)
        want = self.buffer[p:p + TAIL].view(torch.int64)
        if not torch.equal(got.cpu(), want.cpu()):
            raise WeightSyncIntegrityError(
                f"weight bucket {self.index} of version {self.version} ({len(self.names)} tensors, first "
                f"{self.names[0]!r}) failed its integrity check: checksum {got.tolist()} != sent {want.tolist()}")

    def seal(self):
        """Write the checksum tail (sender side)."""
        p = self.payload_bytes
        self.buffer[p:p + TAIL].view(torch.int64).copy_(payload_checksum(self.buffer[:p], self.seed))


class WeightStreamer:
    """Reusable HF-layout weight stream of a Megatron model (see the module docstring).

    Constructing it is collective over the default process group (all_gather of parameter
    ownership, process-group creation); so is each `stream()` pass.

    Args:
      model: GPTModel, list of virtual-pipeline chunks, or {megatron name: tensor}.
      model_cfg: the architecture (selects the layout table; vocab size for padding).
      receivers: global ranks that receive the weights; None: all ranks. With `target_tp=k` a
        list of exactly k ranks: receivers[j] gets inference TP rank j's shards.
      bucket_bytes: target bucket payload size (per receiver slot).
      dtype: cast to this dtype (None: keep the parameter dtype).
      target_tp: produce inference-engine TP shards instead of whole tensors.
      integrity: "transfer" (checksum buckets that cross processes), "always", or "off".
      reuse_buffers: keep one buffer per slot across buckets and passes (no allocation; a bucket's
        tensors are then valid only until the next bucket is pulled). Without it, buffers are still
        recycled (within and across passes; at most two per slot are kept, `release_buffers()` frees
        them), but only once no reference to them or to their tensors remains.
      device: where buckets live (default: the parameters' device).
      local: this rank streams its own complete replica (TP = PP = 1) to itself, with no
        collective at all: data-parallel ranks that each feed their own embedded engine hold the
        same weights, so nothing has to travel (construction and `stream()` are then local too).
    """

    def __init__(self, model, model_cfg: ModelConfig, *, receivers: Sequence[int] | None = None,
                 bucket_bytes: int = 256 << 20, dtype: torch.dtype | None = None,
                 target_tp: int | None = None, integrity: str = "transfer", reuse_buffers: bool = False,
                 device: torch.device | str | None = None, local: bool = False):
        par = _parallel_info()
        if local and (par.tp > 1 or par.pp > 1 or receivers is not None or target_tp is not None):
            raise ValueError("local=True streams a whole replica to this rank: it needs TP = PP = 1 "
                             "and no receivers / target_tp")
        if integrity not in ("transfer", "always", "off"):
            raise ValueError(f"integrity={integrity!r}: use 'transfer', 'always' or 'off'")
        if bucket_bytes <= 0:
            raise ValueError("bucket_bytes must be positive")
        self.model = model
        self.cfg = model_cfg
        self.rules = get_layout(model_cfg)
        self.par = _Par() if local else par  # local: a world of one, this rank
        self.bucket_bytes = int(bucket_bytes)
        self.dtype = dtype
        self.integrity = integrity
        self.reuse_buffers = reuse_buffers
        self.target_tp = target_tp
        self.params = local_megatron_params(model, model_cfg)
        if not self.params:
            raise WeightSyncError("this rank holds no parameter of the model")
        first = next(iter(self.params.values()))
        self.device = torch.device(device) if device is not None else first.device
        world = self.par.world
        if receivers is None:
            if target_tp is not None:
                raise ValueError("target_tp needs an explicit receivers list of length target_tp")
            receivers = list(range(world))
        receivers = [int(r) for r in receivers]
        if any(r < 0 or r >= world for r in receivers):
            raise ValueError(f"receivers {receivers} outside world size {world}")
        if target_tp is not None and len(receivers) != target_tp:
            raise ValueError(f"target_tp={target_tp} needs exactly {target_tp} receivers, got {receivers}")
        if target_tp is None and len(set(receivers)) != len(receivers):
            raise ValueError(f"duplicate receivers {receivers}")
        self.receivers = receivers
        self.n_slots = 1 if target_tp is None else target_tp
        self._plan()
        self._groups()
        self._pool: dict[int, torch.Tensor] = {}
        self._recycle: dict[int, list] = {}
        self.stats = StreamStats()

    # ------------------------------------------------------------------ planning
    def _plan(self):
        par, cfg = self.par, self.cfg
        mine = sorted(self.params) if par.dp_cp_rank == 0 else []
        info = (par.rank, par.tp_rank, [k for k in mine])
        if par.distributed:
            allinfo = [None] * par.world
            dist.all_gather_object(allinfo, info)
        else:
            allinfo = [info]
        src_of: dict[tuple, int] = {}
        for rank, tp_rank, keys in allinfo:
            if tp_rank != 0:
                continue
            for k in keys:
                k = tuple(k)
                src_of.setdefault(k, rank)
        elem = (torch.empty((), dtype=self.dtype).element_size() if self.dtype is not None
                else next(iter(self.params.values())).element_size())
        if par.distributed:  # params of other ranks may differ in dtype only if dtype is None: agree on it
            sizes = [None] * par.world
            dist.all_gather_object(sizes, elem)
            if len(set(sizes)) != 1:
                raise WeightSyncError(f"parameter element sizes differ across ranks {sizes}: pass dtype=")
        self.elem = elem
        self.out_dtype = self.dtype if self.dtype is not None else next(iter(self.params.values())).dtype
        rule_index = {id(r): n for n, r in enumerate(self.rules)}
        entries: list[_Entry] = []
        for layer, rule in iter_rule_instances(cfg):
            key = (rule_index[id(rule)], layer)
            if key not in src_of:
                raise WeightSyncError(
                    f"no rank holds Megatron tensor {rule.megatron.format(i=layer)} (HF {rule.hf_names(layer)[0]})")
            regions = []
            for slot in range(self.n_slots):
                if self.target_tp is None:
                    regions.append([Region(s) for s in hf_shapes(cfg, rule)])
                else:
                    regions.append([inference_region(rule, i, cfg, self.target_tp, slot)
                                    for i in range(len(rule.hf))])
            entries.append(_Entry(key[0], rule, layer, src_of[key], rule.hf_names(layer), regions))
        self.buckets: list[_Bucket] = []
        cur: list[_Entry] = []
        cur_sizes = [0] * self.n_slots

        def close():
            nonlocal cur, cur_sizes
            if cur:
                row = 8 * CHECK_ROW_WORDS
                self.buckets.append(_Bucket(cur[0].src, cur, [_round_up(max(s, 1), row) for s in cur_sizes]))
            cur, cur_sizes = [], [0] * self.n_slots

        for e in entries:
            nb = [sum(_round_up(r.numel() * elem, ALIGN) for r in e.regions[s]) for s in range(self.n_slots)]
            if cur and (e.src != cur[0].src or max(a + b for a, b in zip(cur_sizes, nb)) > self.bucket_bytes):
                close()
            e.offsets = []
            for s in range(self.n_slots):
                offs, o = [], cur_sizes[s]
                for r in e.regions[s]:
                    offs.append(o)
                    o += _round_up(r.numel() * elem, ALIGN)
                e.offsets.append(offs)
                cur_sizes[s] = o
            cur.append(e)
        close()

    def _groups(self):
        self._bcast_group: dict[int, object] = {}
        if self.target_tp is not None or not self.par.distributed:
            return
        world = self.par.world
        for src in sorted({b.src for b in self.buckets}):
            ranks = sorted(set(self.receivers) | {src})
            if len(ranks) == 1:
                self._bcast_group[src] = None
            elif len(ranks) == world:
                self._bcast_group[src] = dist.group.WORLD
            else:
                self._bcast_group[src] = dist.new_group(ranks=ranks)  # collective: all ranks, same order

    # ------------------------------------------------------------------ streaming
    def _buffer(self, slot: int, nbytes: int) -> torch.Tensor:
        if self.reuse_buffers:
            buf = self._pool.get(slot)
            if buf is None or buf.numel() < nbytes:
                buf = torch.empty(max(nbytes, self.max_bucket_bytes()), dtype=torch.uint8, device=self.device)
                self._pool[slot] = buf
            return buf[:nbytes]
        # Recycle a buffer of this pass once nobody (consumer included) references it any more: fresh
        # allocations of large buffers cost page faults (CPU) or allocator work on every bucket.
        pool = self._recycle.setdefault(slot, [])
        for i, (buf, base) in enumerate(pool):
            if buf.numel() >= nbytes and _storage_uses(buf) == base:
                return buf[:nbytes]
        # Size regular buckets' buffers for the largest regular bucket so any of them fits later.
        cap = self._regular_cap()
        buf = torch.empty(max(nbytes, cap) if nbytes <= cap else nbytes, dtype=torch.uint8, device=self.device)
        base = _storage_uses(buf)
        if base is not None:
            if len(pool) >= 2:
                free = [i for i, (b, n) in enumerate(pool) if _storage_uses(b) == n]
                # forget a free (too small) one, else the oldest (a consumer using it keeps it alive)
                pool.pop(free[0] if free else 0)
            pool.append((buf, base))
        return buf[:nbytes]  # a view: holding it (or its tensors) keeps the storage marked as in use

    def _regular_cap(self) -> int:
        limit = _round_up(self.bucket_bytes, 8 * CHECK_ROW_WORDS)
        sizes = [x for b in self.buckets for x in b.sizes if x <= limit]
        return (max(sizes) + TAIL) if sizes else 0

    def max_bucket_bytes(self) -> int:
        return max(max(b.sizes) for b in self.buckets) + TAIL

    def _gather(self, e: _Entry) -> list[torch.Tensor] | None:
        """Collect the TP shards of e's parameter on its source; None on other ranks."""
        par = self.par
        key = (e.rule_idx, e.layer)
        if par.dp_cp_rank != 0 or key not in self.params:
            return None
        t = self.params[key]
        if par.tp == 1:
            return [t] if par.rank == e.src else None
        if self.dtype is not None and t.dtype != self.dtype:
            t = t.to(self.dtype)  # gather in the output dtype: fewer bytes on the wire
        t = t.contiguous()
        if par.rank == e.src:
            shards = [torch.empty_like(t) for _ in range(par.tp)]
            dist.gather(t, gather_list=shards, dst=e.src, group=par.tp_group)
            return shards
        dist.gather(t, gather_list=None, dst=e.src, group=par.tp_group)
        return None

    def _gather_bucket(self, b: _Bucket) -> list | None:
        """The TP shards of every entry of bucket b on its source, in one gather of one flat
        buffer (not one per parameter: each collective costs a round trip); None elsewhere and
        with TP=1, where `_gather` hands out the local tensors."""
        par = self.par
        if par.tp == 1 or par.dp_cp_rank != 0:
            return None
        mine = [self.params.get((e.rule_idx, e.layer)) for e in b.entries]
        if any(t is None for t in mine):  # not this pipeline stage's bucket
            return None
        dtype = self.dtype if self.dtype is not None else mine[0].dtype
        if any(t.dtype != dtype for t in mine):
            return [self._gather(e) for e in b.entries]  # mixed dtypes without a cast: per tensor
        flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in mine])
        if par.rank != b.src:
            dist.gather(flat, gather_list=None, dst=b.src, group=par.tp_group)
            return [None] * len(mine)
        parts = [torch.empty_like(flat) for _ in range(par.tp)]
        dist.gather(flat, gather_list=parts, dst=b.src, group=par.tp_group)
        out, off = [], 0
        for t in mine:
            n = t.numel()
            out.append([p[off:off + n].view(t.shape) for p in parts])
            off += n
        return out

    def stream(self, *, version: int = 0, fault_injector: Callable[[int, torch.Tensor], None] | None = None
               ) -> Iterator[WeightBucket]:
        """Yield this rank's buckets (none on non-receivers). Every rank must exhaust it.

        `version` (the weight version being synced, the same on every rank) enters each bucket's
        checksum, so a receiver never accepts a bucket of an earlier sync.

        `fault_injector(bucket_index, buffer)` (tests) may modify a received buffer before it is
        verified, to simulate a garbled transfer.
        """
        par = self.par
        t0 = time.perf_counter()
        st = self.stats = StreamStats()
        # Re-read the parameters: wrappers (DDP param buffers, optimizers) may have re-pointed them.
        fresh = local_megatron_params(self.model, self.cfg)
        if fresh.keys() != self.params.keys():
            raise WeightSyncError("the model's parameters changed since the WeightStreamer was built")
        self.params = fresh
        for bi, b in enumerate(self.buckets):
            is_src = par.rank == b.src
            if self.target_tp is not None:
                my_slots = [s for s, r in enumerate(self.receivers) if r == par.rank]
            else:
                my_slots = [0] if par.rank in self.receivers else []
            bufs: dict[int, torch.Tensor] = {}
            held = 0
            if is_src:
                for s in range(self.n_slots):
                    bufs[s] = self._buffer(s, b.sizes[s] + TAIL)
                held = sum(x.numel() for x in bufs.values())
            gathered = self._gather_bucket(b)
            for ei, e in enumerate(b.entries):
                shards = self._gather(e) if gathered is None else gathered[ei]
                if shards is None:
                    continue
                staged = (sum(x.numel() * x.element_size() for sh in gathered if sh for x in sh)
                          if gathered is not None else
                          sum(x.numel() * x.element_size() for x in shards) if par.tp > 1 else 0)
                st.peak_buffer_bytes = max(st.peak_buffer_bytes, held + staged)
                pieces = hf_pieces(e.rule, self.cfg, shards)
                for s in range(self.n_slots):
                    for i, reg in enumerate(e.regions[s]):
                        dst = self._view(bufs[s], e.offsets[s][i], reg.out_shape)
                        copy_pieces(dst, reg, pieces[i])
                del shards, pieces
            del gathered
            transferred = set()
            if self.target_tp is None:
                group = self._bcast_group.get(b.src)
                if is_src or my_slots:
                    if not is_src:
                        bufs[0] = self._buffer(0, b.sizes[0] + TAIL)
                    members = set(self.receivers) | {b.src}
                    if len(members) > 1:
                        if is_src and self.integrity != "off":
                            self._seal(bufs[0], b.sizes[0], bucket_seed(bi, version, 0))
                        dist.broadcast(bufs[0], src=b.src, group=group)
                        if is_src:
                            st.sent_bytes += bufs[0].numel() * (len(members) - 1)
                        else:
                            transferred.add(0)
            else:
                for s, r in enumerate(self.receivers):
                    if is_src and r == par.rank:
                        continue
                    if is_src:
                        if self.integrity != "off":
                            self._seal(bufs[s], b.sizes[s], bucket_seed(bi, version, s))
                        dist.send(bufs[s], dst=r)
                        st.sent_bytes += bufs[s].numel()
                    elif r == par.rank:
                        bufs[s] = self._buffer(s, b.sizes[s] + TAIL)
                        dist.recv(bufs[s], src=b.src)
                        transferred.add(s)
            for s in my_slots:
                buf = bufs[s]
                st.peak_buffer_bytes = max(st.peak_buffer_bytes, sum(x.numel() for x in bufs.values()))
                wb = self._make_bucket(bi, b, s, buf, version)
                if s in transferred and fault_injector is not None:
                    fault_injector(bi, buf)
                if self.integrity == "always" and s not in transferred:
                    wb.seal()
                if self.integrity == "always" or (self.integrity == "transfer" and s in transferred):
                    wb.verify()
                st.buckets += 1
                st.tensors += len(wb.names)
                st.payload_bytes += sum(t.numel() * t.element_size() for t in wb.tensors)
                yield wb
                del wb, buf
            del bufs
        st.seconds = time.perf_counter() - t0

    def release_buffers(self) -> None:
        """Free the buffers kept for reuse between passes (up to two per receiver slot)."""
        self._pool.clear()
        self._recycle.clear()

    def _seal(self, buf: torch.Tensor, payload: int, seed: int):
        buf[payload:payload + TAIL].view(torch.int64).copy_(payload_checksum(buf[:payload], seed))

    def _view(self, buf: torch.Tensor, off: int, shape) -> torch.Tensor:
        n = 1
        for x in shape:
            n *= x
        return buf[off:off + n * self.elem].view(self.out_dtype).view(shape)

    def _make_bucket(self, bi: int, b: _Bucket, slot: int, buf: torch.Tensor, version: int = 0) -> WeightBucket:
        names, tensors = [], []
        for e in b.entries:
            for i, reg in enumerate(e.regions[slot]):
                names.append(e.names[i])
                tensors.append(self._view(buf, e.offsets[slot][i], reg.out_shape))
        return WeightBucket(bi, names, tensors, buf, b.sizes[slot],
                            inference_rank=slot if self.target_tp is not None else None, version=version)

    def iter_named_tensors(self, **kw) -> Iterator[tuple[str, torch.Tensor]]:
        for b in self.stream(**kw):
            yield from b.named_tensors()


def iter_hf_weights(model, model_cfg: ModelConfig, **kw) -> Iterator[tuple[str, torch.Tensor]]:
    """One-off (name, tensor) stream of the whole model in HF layout (collective; see WeightStreamer)."""
    yield from WeightStreamer(model, model_cfg, **kw).iter_named_tensors()


def drain(it: Iterable) -> None:
    """Exhaust a stream on ranks that receive nothing (they still take part in the collectives)."""
    for _ in it:
        pass
