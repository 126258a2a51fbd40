"""LM head + log-prob + entropy in one autograd function: no `[T, V/TP]` logits tensor, ever.

`fused_lm_head_logprobs(hidden, weight, target, ...)` takes the final hidden states of this rank
(`[S, B, H]` or `[T, H]`, what Megatron's output layer receives: sequence-sharded when sequence
parallelism is on), this rank's output-layer weight shard `[V/TP, H]` (rank r owns ids
[r*V/TP, (r+1)*V/TP)) and the global target ids, and returns per-token `log softmax(z)[target]`
and the entropy of softmax(z), z = hidden @ weight.T / temperature, float32, replicated on
every TP rank: the same values as `ColumnParallelLinear` followed by `vocab_parallel_logprobs`.

Tiles. The logits shard is never stored: it is computed one tile of `chunk_tokens` tokens x
`chunk_vocab` vocabulary columns at a time (one GEMM `[c, H] x [H, vb]` into a reusable buffer)
and discarded. Tiles are square-ish by default (`lm_head_tile`: ~32 MiB of float32 on CPU,
~256 MiB on CUDA): the weight is read, and its float32 gradient updated, once per token chunk;
the hidden states are read once per vocabulary block; square tiles minimise that traffic.

Forward: per tile, `row_sums` of `logprobs.py` gives each token's (sum of exp, sum of exp * x)
relative to the tile's row max; the blocks of a token chunk are merged online with the rescaling
of the TP combine (`rescale_stats`), and the target logit is picked from the block that holds it.
This rank's per-token statistics are then combined across TP exactly as the Triton backend does
(`combine_partial_stats`: one MAX all-reduce, rescaling, one SUM all-reduce of the stacked
`[3, T]` statistics): two collectives for the whole forward. Saved for backward: the hidden
states (a reference, no copy) and per token lse, H and the target.

Backward recomputes each tile's logits, forms d loss / d logits from the incoming d logp and
d entropy (`grad_coefs` / `grad_rows` of `logprobs.py`: the same formulas and rounding as the
materialised path), and accumulates
  * d hidden = dlogits @ W over the vocabulary blocks (float32), then, as Megatron's
    ColumnParallelLinear backward: all-reduce over TP, or reduce-scatter along the sequence with SP
    (the forward all-gathers the sequence-sharded input; backward gathers it again rather than
    keeping the gathered copy alive, as Megatron does);
  * d weight = dlogits^T @ hidden in float32 over the token chunks. When the weight carries
    Megatron DDP's `main_grad` (fp32 buffer) the sum goes straight into it,
    `grad_added_to_main_grad` is set and a dummy gradient is returned (zeros when
    `zero_out_wgrad`, i.e. tied embeddings on one pipeline stage, where autograd adds the
    embedding's own gradient to it), as LinearWithGradAccumulationAndAsyncCommunication does with
    `gradient_accumulation_fusion`; DDP's hook then skips the add. Without `main_grad` the float32
    sum is returned in the weight's dtype.
Peak extra memory: a few tile buffers + O(T x H) for d hidden (+ the gathered input with SP)
+ a float32 `[V/TP, H]` accumulator only when the weight has no `main_grad` (fixed, independent
of T). Nothing of size T x V.

Vocabulary padding: columns of ids >= `vocab_size` (Megatron pads the vocabulary to a TP
multiple) are skipped: probability 0 and gradient exactly 0, as the train step's masking of
materialised logits to -inf; a target there gets logp = -inf.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron_dgpo.ops.logprobs import (_resolve_group, combine_partial_stats, grad_coefs, grad_rows,
                                        logp_entropy_from_stats, rescale_stats, row_sums)

__all__ = ["fused_lm_head_logprobs", "lm_head_tile"]

# Bytes of one float32 work tile [tokens, vocab] (three or four such buffers are live at once).
# Tiles are square-ish by default: each tile's GEMM is [c, H] x [H, vb], the weight is read once
# per token chunk and d weight (float32) updated once per token chunk, the hidden states read
# once per vocabulary block, so square tiles minimise that traffic (~2 T V H / sqrt(tile) elements).
_TILE_BYTES_CUDA = 256 * 2**20
_TILE_BYTES_CPU = 32 * 2**20


def lm_head_tile(n_tokens: int, vocab_local: int, chunk_tokens: int | None = None, chunk_vocab: int | None = None,
                 device: torch.device | str | None = None) -> tuple[int, int]:
    """(tokens, vocabulary columns) per tile: ~32 MiB (CPU) or ~256 MiB (CUDA) of float32, square
    unless one side is short, or as given."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    elems = (_TILE_BYTES_CUDA if device.type == "cuda" else _TILE_BYTES_CPU) // 4
    n, v = max(1, n_tokens), max(1, vocab_local)
    if chunk_tokens is not None:
        c = chunk_tokens
    elif chunk_vocab is not None:
        c = elems // chunk_vocab
    else:
        c = max(math.isqrt(elems), elems // v)
    c = max(1, min(c, n))
    vb = chunk_vocab if chunk_vocab is not None else elems // c
    return c, max(1, min(vb, v))


def _gather_seq(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """All-gather along dim 0 (Megatron's sequence-parallel gather)."""
    out = torch.empty((x.shape[0] * world,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _logits_chunk(x, weight, out, pad_from):
    """out = x @ weight.T (this rank's logits of these rows), padding columns set to -inf."""
    torch.mm(x, weight.t(), out=out)
    if pad_from is not None:
        out[:, pad_from:] = -math.inf
    return out


def _accumulate_wgrad(acc, g, x, tmp):
    """acc (float32) += g^T @ x. Mixed precision: Apex's fused fp32-accumulating GEMM when present
    (what Megatron uses for gradient_accumulation_fusion), else the chunk's product in the inputs'
    dtype (fp32 accumulation inside the GEMM, one rounding per chunk) added in float32."""
    if g.dtype == acc.dtype:
        acc.addmm_(g.t(), x)
        return
    fused = _apex_wgrad() if acc.is_cuda else None
    if fused is not None:
        fused.wgrad_gemm_accum_fp32(x, g, acc)
        return
    acc.add_(torch.mm(g.t(), x, out=tmp))


_APEX = []


def _apex_wgrad():
    """Apex's fused_weight_gradient_mlp_cuda (as in megatron.core.tensor_parallel.layers) or None;
    looked up once (a failed import is not cached by Python)."""
    if not _APEX:
        try:
            import fused_weight_gradient_mlp_cuda
        except ImportError:
            fused_weight_gradient_mlp_cuda = None
        _APEX.append(fused_weight_gradient_mlp_cuda)
    return _APEX[0]


def _masked(m):
    return m.masked_fill(m == -math.inf, 0.0)


class _FusedLMHeadLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, group, world, rank, temperature, with_entropy, chunks,
                vocab_size, sequence_parallel):
        ctx.set_materialize_grads(False)
        f32 = torch.float32
        dev = hidden.device
        h = hidden.shape[-1]
        vl = weight.shape[0]
        sp = sequence_parallel and world > 1
        total = _gather_seq(hidden, group, world) if sp else hidden
        lead = total.shape[:-1]
        x = total.reshape(-1, h)
        n = x.shape[0]
        if tuple(target.shape) != tuple(lead):
            raise ValueError(f"target shape {tuple(target.shape)} != hidden tokens {tuple(lead)} "
                             f"(after the sequence-parallel gather)")

        tgt = target.reshape(-1).to(device=dev, dtype=torch.long)
        local_t = tgt - rank * vl
        owned = (local_t >= 0) & (local_t < vl)
        local_t = torch.where(owned, local_t, torch.zeros_like(local_t))
        valid = vl if vocab_size is None else min(max(vocab_size - rank * vl, 0), vl)  # columns before the padding
        t_div = None if temperature == 1.0 else torch.full((1, 1), temperature, dtype=f32, device=dev)
        c, vb = lm_head_tile(n, valid, *chunks, device=dev)

        # Per token, this rank's max m of z and (S, E) relative to r = m (0 where m = -inf), merged
        # over vocabulary blocks with the TP combine's rescaling; zt = z[target] where owned.
        m = torch.full((n,), -math.inf, dtype=f32, device=dev)
        s_sum = torch.zeros(n, dtype=f32, device=dev)
        e_sum = torch.zeros(n, dtype=f32, device=dev) if with_entropy else None
        zt = torch.zeros(n, dtype=f32, device=dev)
        blog = torch.empty(c, vb, dtype=weight.dtype, device=dev)
        bx = torch.empty(c, vb, dtype=f32, device=dev)
        be = torch.empty(c, vb, dtype=f32, device=dev)
        part = torch.empty(3 if with_entropy else 2, c, dtype=f32, device=dev)
        for s in range(0, n, c):
            e = min(s + c, n)
            k = e - s
            xs = x[s:e]
            for v0 in range(0, valid, vb):
                v1 = min(v0 + vb, valid)
                lg = torch.mm(xs, weight[v0:v1].t(), out=blog[:k, :v1 - v0])
                mb = torch.amax(lg, dim=-1).to(f32)
                if t_div is not None:
                    mb = mb / t_div.view(1)
                rb = _masked(mb)
                pt = part[:, :k]
                row_sums(lg, rb, t_div, bx[:, :v1 - v0], be[:, :v1 - v0], pt)
                m_new = torch.maximum(m[s:e], mb)
                r_new = _masked(m_new)
                s_old, e_old = rescale_stats(s_sum[s:e], e_sum[s:e] if with_entropy else None, _masked(m[s:e]), r_new)
                s_blk, e_blk = rescale_stats(pt[0], pt[2] if with_entropy else None, rb, r_new)
                s_sum[s:e] = s_old + s_blk
                if with_entropy:
                    e_sum[s:e] = e_old + e_blk
                m[s:e] = m_new
                lt = local_t[s:e]
                inb = owned[s:e] & (lt >= v0) & (lt < v1)
                z = lg.gather(1, torch.where(inb, lt - v0, torch.zeros_like(lt)).unsqueeze(1)).squeeze(1).to(f32)
                z = z / t_div.view(1) if t_div is not None else z  # (no `if inb.any()`: a host sync per tile)
                zt[s:e] = torch.where(inb, z, zt[s:e])
        del blog, bx, be, part
        # Padding columns (ids >= vocab_size) are -inf logits: exp = 0, no contribution; a target
        # there has z = -inf.
        zt = torch.where(owned & (local_t >= valid), torch.full_like(zt, -math.inf), zt)
        ref, s_sum, e_sum = combine_partial_stats(m, s_sum, e_sum, group, world)
        xt = torch.where(owned, zt - ref, torch.zeros_like(ref))
        stats = torch.stack([s_sum, xt, e_sum]) if with_entropy else torch.stack([s_sum, xt])
        if world > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
        logp, ent, lse = logp_entropy_from_stats(stats, ref, with_entropy)

        ctx.save_for_backward(hidden, weight, local_t, owned, lse, ent)
        ctx.meta = (group, world, temperature, (c, vb), valid, sp)
        return logp.view(lead), (ent.view(lead) if ent is not None else None)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, local_t, owned, lse, ent = ctx.saved_tensors
        group, world, temperature, (c, vb), valid, sp = ctx.meta
        if g_logp is None and g_ent is None:
            return (None,) * 11
        f32 = torch.float32
        dev = hidden.device
        h = hidden.shape[-1]
        total = _gather_seq(hidden, group, world) if sp else hidden
        x = total.reshape(-1, h)
        n = x.shape[0]
        t_div = None if temperature == 1.0 else torch.full((1, 1), temperature, dtype=f32, device=dev)
        coef_c, coef_y, onehot = grad_coefs(g_logp, g_ent, ent, owned, temperature, n, dev)

        # Where d weight goes: Megatron DDP's float32 main_grad when the weight has one (see the
        # module docstring), else a float32 accumulator returned in the weight's dtype.
        main_grad = getattr(weight, "main_grad", None)
        into_main = main_grad is not None and main_grad.dtype == f32 and hasattr(weight, "grad_added_to_main_grad")
        if not ctx.needs_input_grad[1]:
            acc = None
        elif into_main:
            acc = main_grad
        else:
            acc = torch.zeros(weight.shape, dtype=f32, device=dev)
        low = weight.dtype != f32
        tmp_w = torch.empty(vb, h, dtype=weight.dtype, device=dev) if acc is not None and low else None

        # d hidden of a token chunk is summed over vocabulary blocks in float32 (directly in the
        # result when that is float32); padding columns have zero gradient and are skipped.
        dx = torch.zeros((n, h), dtype=hidden.dtype, device=dev)
        dx_acc = torch.empty(c, h, dtype=f32, device=dev) if low else None
        tmp_x = torch.empty(c, h, dtype=weight.dtype, device=dev) if low else None
        blog = torch.empty(c, vb, dtype=weight.dtype, device=dev)
        bg = torch.empty(c, vb, dtype=weight.dtype, device=dev)
        by = torch.empty(c, vb, dtype=f32, device=dev) if (low and coef_y is not None) else None
        bp = torch.empty(c, vb, dtype=f32, device=dev)
        for s in range(0, n, c):
            e = min(s + c, n)
            k = e - s
            xs = x[s:e]
            acc_x = dx_acc[:k].zero_() if low else dx[s:e]
            lt = local_t[s:e]
            for v0 in range(0, valid, vb):
                v1 = min(v0 + vb, valid)
                wb = weight[v0:v1]
                lg = torch.mm(xs, wb.t(), out=blog[:k, :v1 - v0])
                inb = (lt >= v0) & (lt < v1)
                oh = None if onehot is None else torch.where(inb, onehot[s:e], torch.zeros_like(onehot[s:e]))
                g = bg[:k, :v1 - v0]
                grad_rows(g, lg, lse[s:e], t_div, coef_c[s:e], None if coef_y is None else coef_y[s:e], oh,
                          torch.where(inb, lt - v0, torch.zeros_like(lt)).unsqueeze(1),
                          None if by is None else by[:, :v1 - v0], bp[:, :v1 - v0])
                if low:
                    acc_x.add_(torch.mm(g, wb, out=tmp_x[:k]))
                else:
                    acc_x.addmm_(g, wb)
                if acc is not None:
                    _accumulate_wgrad(acc[v0:v1], g, xs, None if tmp_w is None else tmp_w[:v1 - v0])
            if low:
                dx[s:e].copy_(acc_x)
        del blog, bg, by, bp, tmp_w, tmp_x, dx_acc

        if sp:
            dh = torch.empty(hidden.shape, dtype=dx.dtype, device=dev)
            dist.reduce_scatter_tensor(dh, dx.view(total.shape), group=group)
        else:
            if world > 1:
                dist.all_reduce(dx, group=group)
            dh = dx.view(hidden.shape)

        if acc is None:
            dw = None
        elif into_main:
            # As LinearWithGradAccumulationAndAsyncCommunication: a dummy gradient keeps DDP's
            # post-accumulate hook firing (overlap_grad_reduce counts on it) without a second add.
            dw = (torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty)(
                weight.shape, dtype=weight.dtype, device=dev)
            weight.grad_added_to_main_grad = True
        else:
            dw = acc if weight.dtype == f32 else acc.to(weight.dtype)
        return (dh if ctx.needs_input_grad[0] else None, dw) + (None,) * 9


def fused_lm_head_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    tp_group=None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int | None = None,
    chunk_vocab: int | None = None,
    vocab_size: int | None = None,
    sequence_parallel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-prob of `target` (and entropy) under softmax(hidden @ weight.T / temperature).

    Args:
        hidden: `[..., H]` final hidden states (after the final norm) of this rank, the output
            layer's input. With `sequence_parallel`, dim 0 is this rank's slice of the sequence
            (Megatron's `[S/TP, B, H]`) and is all-gathered over the TP group.
        weight: this rank's vocabulary shard of the output layer `[V/TP, H]` (or of the tied
            embedding). Its gradient goes to `weight.main_grad` when Megatron DDP set one.
        target: global token ids of shape `hidden.shape[:-1]` (after the gather with SP).
        tp_group: the TP ProcessGroup; None: Megatron's when initialised, else no parallelism.
        temperature: logits are divided by it. Must be > 0.
        with_entropy: also return the entropy.
        chunk_tokens, chunk_vocab: the tile of tokens x vocabulary columns processed at once;
            None picks them (`lm_head_tile`): ~32 MiB (CPU) / 256 MiB (CUDA) of float32, square-ish.
        vocab_size: the real vocabulary; ids >= vocab_size (padding rows of `weight`) are masked.
        sequence_parallel: `hidden` is sequence-sharded (gather forward, reduce-scatter backward).

    Returns:
        `(logp, entropy)`, float32 of shape `target.shape`, identical on every TP rank; `entropy`
        is None unless `with_entropy`. Differentiable w.r.t. `hidden` and `weight`.
    """
    if hidden.dim() < 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"expected hidden [..., H] and weight [V/TP, H], got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    temperature = float(temperature)
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    for name, val in (("chunk_tokens", chunk_tokens), ("chunk_vocab", chunk_vocab)):
        if val is not None and int(val) < 1:
            raise ValueError(f"{name} must be >= 1, got {val}")
    group = _resolve_group(tp_group)
    if group is None:
        world, rank = 1, 0
    else:
        world, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
    chunks = (None if chunk_tokens is None else int(chunk_tokens), None if chunk_vocab is None else int(chunk_vocab))
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have one dtype")
    logp, ent = _FusedLMHeadLogprobs.apply(hidden, weight, target, group, world, rank, temperature,
                                          bool(with_entropy), chunks, vocab_size, bool(sequence_parallel))
    return logp, (ent if with_entropy else None)
