"""Token log-probabilities and entropies from vocab-parallel logits, chunked over tokens.

`vocab_parallel_logprobs(logits, target, ...)` takes this tensor-parallel rank's vocabulary shard
`[..., V/TP]` (rank r owns ids [r*V/TP, (r+1)*V/TP), Megatron's layout) and returns, for every
token, `log softmax(logits / temperature)[target]` and optionally the entropy of
`softmax(logits / temperature)`, both float32 and replicated on every rank of the TP group.

Memory. No float32 copy of the `[T, V/TP]` shard is ever made: tokens are processed `chunk_size`
rows at a time through two reusable float32 work buffers of `[chunk_size, V/TP]` (one in backward
for float32 logits, whose gradient buffer doubles as the work buffer). Backward recomputes the
softmax chunk by chunk from the saved logits (kept in their own dtype; autograd saves a
reference, not a copy) and two saved float32 numbers per token (logsumexp and entropy), and
writes the gradient straight into a tensor of the logits' dtype. Extra memory beyond the gradient
itself is the chunk buffers plus O(T) per-token vectors. The caller's logits are never written to
(unlike megatron's vocab_parallel_cross_entropy, which overwrites float32 inputs).

Communication (forward only; backward needs none): one MAX all-reduce of the per-token max and
one SUM all-reduce of a stacked `[2 or 3, T]` float32 tensor holding the partial sum of
exponentials, the target logit (exactly one rank owns each id, the others contribute 0) and, with
entropy, the partial sum of `exp(z - max) * (z - max)`. (That is the brief's max / sum-exp /
target / entropy all-reduces with the three SUMs fused into one call.)

Gradient convention (Megatron's): each rank receives the gradient of the one replicated scalar loss
with respect to its own shard, not a sum over ranks. With z = logits / temperature, p = softmax(z):
    d logp / d z_j = 1[j == target] - p_j
    d H / d z_j    = -p_j * (z_j - sum_k p_k z_k) = -p_j * (log p_j + H)
and d/d logits = (d/d z) / temperature. Backward evaluates, per chunk,
    grad_j = (p_j * (c + b * log p_j) + 1[j == target] * g_logp) / T,   c = -(g_logp + g_H * H), b = -g_H
as four elementwise passes (log p = z - lse, p = exp, the affine map, the product written in the
logits' dtype); the target entry is computed in float32 and rounded once.

Temperature: z = logits / T is computed as a true division (addcdiv), so the row max divided by T
is exactly the max of z and the argmax has log-weight exactly 0.

Masked vocabulary padding (-inf logits) is supported: exp gives exactly 0 there, 0 * -inf is
treated as 0 in the entropy (nansum), and the gradient on those entries is exactly 0 (the NaN that
0 * inf produces there is zeroed). A target on a -inf entry gets logp = -inf. Degenerate rows (all
logits -inf, or +inf/NaN logits) give NaN/inf logp like torch.log_softmax (their gradient entries
are zeroed rather than NaN). Targets outside [0, V) (e.g. an ignore index) give a finite but
meaningless logp and no one-hot gradient: mask such tokens in the loss.

Backends (`backend=`, default "auto"):
* "triton" (auto on CUDA when triton imports): `logprobs_triton.py`, one online-softmax pass per
  row in forward (reads each logit once) and one fused pass in backward (reads each logit once,
  writes its gradient once): the memory-traffic floor, no work buffers, `chunk_size` unused. With
  TP the per-rank (max, sum, entropy sum) are rescaled to the group max between the MAX and the SUM
  all-reduce (same two collectives).
* "torch": a torch.autograd.Function built from plain torch ops, so it runs unchanged on CPU and
  CUDA. On CUDA the bf16 -> float32 upcast and the float32 -> bf16 store are fused into the
  elementwise kernels; on CPU they go through the reusable buffers (CPU kernels would otherwise
  allocate a temporary per chunk). Approximate memory traffic for bf16 logits: forward
  ~36 bytes/element (max pass, shift, exp, two row sums, product), backward ~36 bytes/element; the
  floor is ~6 (read twice, write the grad).
Both compute in float32 with the same formulas; they agree to float32 rounding, not bitwise.
"""
from __future__ import annotations

import math
import os
import sys

import torch
import torch.distributed as dist

__all__ = ["vocab_parallel_logprobs", "default_chunk_size", "resolve_backend", "BACKENDS"]

# Bytes of one float32 work buffer of [chunk, V/TP] (two are live at once). On CUDA a larger chunk
# keeps the number of kernel launches low (~38 chunks of ~0.2 ms kernels for T=16384, V=151936,
# 512 MiB of buffers vs ~14 GiB for megatron's cross entropy); on CPU 16 MiB keeps parallel
# regions long enough (tiny chunks are slow when cores are oversubscribed).
_CHUNK_BYTES_CUDA = 256 * 2**20
_CHUNK_BYTES_CPU = 16 * 2**20


def default_chunk_size(vocab_local: int, device: torch.device | str | None = None) -> int:
    """Rows per chunk so that one float32 [rows, vocab_local] work buffer is ~16 MiB (CPU) or ~256 MiB (CUDA)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    budget = _CHUNK_BYTES_CUDA if device.type == "cuda" else _CHUNK_BYTES_CPU
    return max(1, budget // (4 * max(1, vocab_local)))


def _resolve_group(tp_group):
    """Explicit group, else Megatron's TP group when initialised, else None (no parallelism)."""
    if tp_group is not None:
        return tp_group
    # Not imported yet means not initialised: skip the ~5 s `import megatron.core`.
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None


def _shifted(chunk: torch.Tensor, shift: torch.Tensor, t: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """out = chunk / temperature - shift[:, None] in float32, one elementwise pass (addcdiv).

    The quotient is rounded before the subtraction (no FMA contraction is possible around a
    division), so with shift = max(chunk) / temperature the argmax maps to exactly 0.
    `chunk` (the caller's logits, any float dtype) is only read. `t` is a float32 [1, 1] tensor
    rather than a Python scalar, so type promotion runs the arithmetic in float32 even for bf16
    inputs. CUDA kernels fuse that upcast; CPU kernels would allocate a fresh float32 temporary per
    chunk for it (slow page faults), so on CPU a bf16/fp16 chunk is first copied into `out` and
    the same arithmetic (division, then subtraction; identical rounding) is done in place.
    """
    if chunk.dtype != out.dtype and not _fuses_casts(chunk.device):
        out.copy_(chunk)
        if t is not None:
            out.div_(t)
        return out.sub_(shift.unsqueeze(1))
    if t is None:
        return torch.sub(chunk, shift.unsqueeze(1), out=out)
    return torch.addcdiv(shift.neg().unsqueeze(1), chunk, t, out=out)


def _fuses_casts(device: torch.device) -> bool:
    """Whether elementwise kernels on `device` convert mixed input/output dtypes on the fly."""
    return device.type == "cuda"


def _store_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a * b, rounded once to out's dtype. `a` (a float32 scratch buffer) may be clobbered."""
    if out.dtype == a.dtype or _fuses_casts(out.device):
        torch.mul(a, b, out=out)
    else:  # CPU: avoid a per-chunk temporary for the float32 -> bf16 conversion
        out.copy_(a.mul_(b))


def row_sums(chunk, shift, t_div, bx, be, out, local_t=None) -> None:
    """For rows `chunk` [k, V/TP]: out[0] = sum exp(x), out[1] = x[target] (if local_t is given),
    out[-1] = sum exp(x) * x (if out has 3 rows), x = chunk / temperature - shift, in float32
    through the work buffers bx, be ([>= k, V/TP]). Where x = -inf (masked padding) exp(x) = 0 and
    0 * -inf = NaN: nansum drops exactly those terms (0 * -inf := 0)."""
    k = chunk.shape[0]
    x = _shifted(chunk, shift, t_div, bx[:k])
    if local_t is not None:
        out[1] = x.gather(1, local_t.unsqueeze(1)).squeeze(1)
    ex = torch.exp(x, out=be[:k])
    out[0] = ex.sum(dim=-1)
    if out.shape[0] == 3:
        out[2] = torch.nansum(ex.mul_(x), dim=-1)


def grad_coefs(g_logp, g_ent, ent, owned, temperature, n, dev):
    """Per-token coefficients of d loss / d logits (see the module docstring):
    grad_j = p_j * (coef_c + coef_y * y_j) + [j == target] * onehot, y_j = log p_j, all including
    the 1 / temperature factor. Returns (coef_c [n, 1], coef_y [n, 1] or None, onehot [n] or None)."""
    f32 = torch.float32
    it = 1.0 / temperature
    g1 = g_logp.reshape(-1).to(f32) if g_logp is not None else None
    g2 = g_ent.reshape(-1).to(f32) if g_ent is not None else None
    coef_c = torch.zeros(n, dtype=f32, device=dev)
    coef_y = None
    if g1 is not None:
        coef_c -= g1
    if g2 is not None:
        coef_c -= g2 * ent
        coef_y = ((-it) * g2).unsqueeze(1)
    coef_c = (coef_c * it).unsqueeze(1)
    onehot = torch.where(owned, g1 * it, torch.zeros_like(g1)) if g1 is not None else None
    return coef_c, coef_y, onehot


def grad_rows(out, chunk, lse, t_div, coef_c, coef_y, onehot, idx, by, bp) -> None:
    """Write d loss / d logits of rows `chunk` [k, V/TP] into `out` (same shape, any float dtype),
    from per-row lse, coefficients (grad_coefs, sliced to these rows) and local target ids `idx`
    [k, 1]. Work buffers: bp [>= k, V/TP] float32 always; by likewise unless `out` is float32
    (then `out` itself is the work buffer) or there is no entropy term (coef_y None)."""
    k = chunk.shape[0]
    dev = out.device
    direct = out.dtype == torch.float32
    if coef_y is None:
        # grad = p * coef_c (+ one-hot): y and p share one buffer.
        p = _shifted(chunk, lse, t_div, bp[:k]).exp_()
        w_t = coef_c
        p_t = p.gather(1, idx)
        _store_product(out, p, w_t)
    else:
        y = _shifted(chunk, lse, t_div, out if direct else by[:k])
        p = torch.exp(y, out=bp[:k])
        w = torch.addcmul(coef_c, y, coef_y, out=y)  # coef_c + coef_y * y, in place
        w_t = w.gather(1, idx)
        p_t = p.gather(1, idx)
        if direct:
            w.mul_(p)  # w is `out` itself
        else:
            _store_product(out, w, p)
    if onehot is not None:
        # Target entry computed in float32 and rounded once (not bf16 + one-hot).
        pw_t = torch.where(p_t > 0, p_t * w_t, torch.zeros_like(p_t))
        # (index_put_, not scatter_: CPU scatter_ on bf16 makes a float32 copy of `out`.)
        rows = torch.arange(k, device=dev)
        out.index_put_((rows, idx.squeeze(1)), (pw_t + onehot.unsqueeze(1)).squeeze(1).to(out.dtype))
    # Masked (-inf) entries: p = 0 but y = -inf gives 0 * inf = NaN; their gradient is 0.
    out.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def _forward_triton(ctx, logits, flat, local_t, owned, group, world, temperature, with_entropy, lead):
    """Forward through the Triton kernels: one read of the logits, per-rank stats rescaled to the TP max."""
    from megatron_dgpo.ops import logprobs_triton as tk

    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    f32 = torch.float32
    m, s, e = tk.row_stats(flat, temperature, with_entropy)
    ref, s, e = tk.combine_partial_stats(m, s, e, group, world)
    zt = flat.gather(1, local_t.unsqueeze(1)).squeeze(1).to(f32) if flat.shape[1] else torch.zeros_like(ref)
    if temperature != 1.0:
        # A float32 tensor divisor: CUDA divides by a Python scalar as a multiplication by its
        # reciprocal (1 ulp off the kernel's div_rn), which would break logp(argmax) <= 0 exactly.
        zt = zt / torch.full((1,), temperature, dtype=f32, device=zt.device)
    xt = torch.where(owned, zt - ref, torch.zeros_like(ref))
    stats = torch.stack([s, xt, e]) if e is not None else torch.stack([s, xt])
    if world > 1:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    return _finish_forward(ctx, stats, ref, logits, local_t, owned, with_entropy, lead)


def combine_partial_stats(m, s, e, group, world):
    """Rescale one rank's (m, S, E) to the TP group's max and return (ref, S, E) before the SUM all-reduce.

    ref is the global max (0 where it is -inf), identical on all ranks. With d = r_rank - ref:
    S' = S e^d and E' = e^d (E + d S); a rank whose shard is all -inf has S = 0 and contributes 0.
    """
    r_local = m.masked_fill(m == -math.inf, 0.0)
    if world == 1:
        return r_local, s, e
    mg = m.clone()
    dist.all_reduce(mg, op=dist.ReduceOp.MAX, group=group)
    ref = mg.masked_fill(mg == -math.inf, 0.0)
    s, e = rescale_stats(s, e, r_local, ref)
    return ref, s, e


def rescale_stats(s, e, r_from, r_to):
    """(S, E) relative to reference r_from -> relative to r_to >= r_from: with d = r_from - r_to,
    S' = S e^d and E' = e^d (E + d S) (sum_j e^(x_j - d') (x_j - d') expanded). d > 0 only where
    the old part was all -inf (r_from = 0, S = E = 0): clamped to keep e^d finite."""
    d = (r_from - r_to).clamp(max=0.0)
    a = torch.exp(d)
    if e is not None:
        e = a * torch.where(s > 0, e + d * s, torch.zeros_like(e))
    return s * a, e


def logp_entropy_from_stats(stats, shift, with_entropy):
    """From the TP-summed per-token [S, x_t(, E)] relative to `shift` (S = sum of exp(z - shift),
    x_t = z_target - shift, E = sum exp(z - shift) (z - shift)) to (logp, entropy or None, lse):
    log p = z - lse with lse = shift + log S per token."""
    log_s = stats[0].log()
    logp = stats[1] - log_s
    ent = (log_s - stats[2] / stats[0]) if with_entropy else None  # log S - sum_k p_k (z_k - shift)
    return logp, ent, shift + log_s


def _finish_forward(ctx, stats, shift, logits, local_t, owned, with_entropy, lead):
    """Both backends: logp and entropy from the summed stats, saving what backward needs (the
    logits, lse and H per token)."""
    logp, ent, lse = logp_entropy_from_stats(stats, shift, with_entropy)
    ctx.save_for_backward(logits, local_t, owned, lse, ent)
    return logp.view(lead), (ent.view(lead) if ent is not None else None)


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, world, rank, temperature, with_entropy, chunk, backend):
        ctx.set_materialize_grads(False)
        vl = logits.shape[-1]
        lead = logits.shape[:-1]
        flat = logits.reshape(-1, vl)  # a view for contiguous logits; never written to
        n = flat.shape[0]
        dev = logits.device
        f32 = torch.float32

        tgt = target.reshape(-1).to(device=dev, dtype=torch.long)
        local_t = tgt - rank * vl
        owned = (local_t >= 0) & (local_t < vl)
        local_t = torch.where(owned, local_t, torch.zeros_like(local_t))

        ctx.backend = backend
        ctx.temperature = temperature
        ctx.vl = vl
        if backend == "triton":
            return _forward_triton(ctx, logits, flat, local_t, owned, group, world, temperature, with_entropy, lead)

        t_div = None if temperature == 1.0 else torch.full((1, 1), temperature, dtype=f32, device=dev)

        # 1. Global per-token max of z = logits / T. Rounding is monotone, so max(l) / T is exactly
        #    the max of the rounded z and the shifted argmax is exactly 0.
        m = torch.amax(flat, dim=-1).to(f32) if vl > 0 else torch.full((n,), -math.inf, dtype=f32, device=dev)
        if t_div is not None:
            m = m / t_div.view(1)
        if world > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        m = m.masked_fill(m == -math.inf, 0.0)  # all-(-inf) row: avoid -inf - -inf = NaN in the shift

        # 2. Chunked pass over tokens: partial sum of exp(x), x = z - m; target's x; partial sum of
        #    exp(x) * x. Where x = -inf (masked padding) exp(x) = 0 and 0 * -inf = NaN: nansum drops
        #    exactly those terms (0 * -inf := 0).
        stats = torch.zeros(3 if with_entropy else 2, n, dtype=f32, device=dev)
        c = max(1, min(chunk, n))
        bx = torch.empty(c, vl, dtype=f32, device=dev)
        be = torch.empty(c, vl, dtype=f32, device=dev)
        for s in range(0, n, c):
            e = min(s + c, n)
            row_sums(flat[s:e], m[s:e], t_div, bx, be, stats[:, s:e], local_t[s:e])
        del bx, be
        stats[1] = torch.where(owned, stats[1], torch.zeros_like(stats[1]))
        if world > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)

        ctx.chunk = c
        return _finish_forward(ctx, stats, m, logits, local_t, owned, with_entropy, lead)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, local_t, owned, lse, ent = ctx.saved_tensors
        if g_logp is None and g_ent is None:
            return (None,) * 9
        vl, temperature = ctx.vl, ctx.temperature
        flat = logits.reshape(-1, vl)
        n = flat.shape[0]
        dev = logits.device
        f32 = torch.float32
        t_div = None if temperature == 1.0 else torch.full((1, 1), temperature, dtype=f32, device=dev)

        # With y_j = log p_j = z_j - lse and H = -sum p log p:
        #   d logp / d z_j = 1[j=t] - p_j
        #   d H / d z_j    = -p_j (z_j - sum_k p_k z_k) = -p_j (y_j + H)
        # so dL/d logits_j = (p_j * (coef_c + coef_y * y_j) + 1[j=t] * g1) / T with per-token
        #   coef_c = -(g1 + g2 H),  coef_y = -g2.
        coef_c, coef_y, onehot = grad_coefs(g_logp, g_ent, ent, owned, temperature, n, dev)
        if ctx.backend == "triton":
            from megatron_dgpo.ops import logprobs_triton as tk

            if flat.stride(-1) != 1:
                flat = flat.contiguous()
            grad = tk.row_grad(flat, lse, coef_c.squeeze(1).contiguous(),
                               coef_y.squeeze(1).contiguous() if coef_y is not None else torch.zeros_like(lse),
                               onehot if onehot is not None else torch.zeros_like(lse),
                               torch.where(owned, local_t, torch.full_like(local_t, -1)), temperature, logits.dtype)
            return (grad.view(logits.shape),) + (None,) * 8
        c = ctx.chunk

        grad = torch.empty((n, vl), dtype=logits.dtype, device=dev)
        cc = max(1, min(c, n))
        direct = grad.dtype == f32  # float32: work inside the gradient itself, one buffer fewer
        by = None if (direct or coef_y is None) else torch.empty(cc, vl, dtype=f32, device=dev)
        bp = torch.empty(cc, vl, dtype=f32, device=dev)
        for s in range(0, n, cc):
            e = min(s + cc, n)
            grad_rows(grad[s:e], flat[s:e], lse[s:e], t_div, coef_c[s:e],
                      None if coef_y is None else coef_y[s:e], None if onehot is None else onehot[s:e],
                      local_t[s:e].unsqueeze(1), by, bp)
        return (grad.view(logits.shape),) + (None,) * 8


BACKENDS = ("auto", "torch", "triton")
BACKEND_ENV = "MEGATRON_DGPO_LOGPROB_BACKEND"


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str | None, logits: torch.Tensor) -> str:
    """The implementation that runs for these logits: "torch" or "triton" (see vocab_parallel_logprobs)."""
    choice = backend if backend is not None else os.environ.get(BACKEND_ENV, "auto")
    if choice not in BACKENDS:
        src = "backend" if backend is not None else f"${BACKEND_ENV}"
        raise ValueError(f"{src} must be one of {BACKENDS}, got {choice!r}")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if choice == "auto":
        return "triton" if logits.is_cuda and _triton_available() else "torch"
    if choice == "triton":
        if not _triton_available():
            raise ImportError("the Triton log-prob backend needs triton: pip install 'megatron-dgpo[triton]'")
        if not logits.is_cuda and not interpreted:
            raise ValueError(f"the Triton log-prob backend needs CUDA logits (got {logits.device}); "
                             "set TRITON_INTERPRET=1 before importing triton to run it in Triton's interpreter")
    return choice


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    tp_group=None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-prob of `target` (and entropy) under softmax(logits / temperature).

    Args:
        logits: this rank's vocab shard `[..., V/TP]`, float32/bfloat16/float16. Not modified.
        target: global token ids, shape `logits.shape[:-1]`.
        tp_group: the tensor-parallel ProcessGroup. None: Megatron's TP group if
            `parallel_state.model_parallel_is_initialized()`, else no parallelism.
        temperature: logits are divided by it (match the sampler's temperature). Must be > 0.
        with_entropy: also return the entropy of the (tempered) distribution.
        chunk_size: tokens per chunk of the torch backend; None picks `default_chunk_size(V/TP, device)`.
            The Triton backend has no work buffers and ignores it.
        backend: "torch", "triton" or "auto" (None: $MEGATRON_DGPO_LOGPROB_BACKEND, else "auto").
            "auto" is Triton for CUDA logits when triton imports, torch otherwise. "triton" on CPU
            tensors needs TRITON_INTERPRET=1 (Triton's interpreter, for tests).

    Returns:
        `(logp, entropy)`: float32 tensors of shape `logits.shape[:-1]`, identical on every TP
        rank; `entropy` is None unless `with_entropy`. Both are differentiable w.r.t. `logits`
        (each rank gets the gradient w.r.t. its own shard, as in megatron's
        vocab_parallel_cross_entropy).
    """
    if logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dimension")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"target shape {tuple(target.shape)} != logits.shape[:-1] {tuple(logits.shape[:-1])}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    temperature = float(temperature)
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    group = _resolve_group(tp_group)
    if group is None:
        world, rank = 1, 0
    else:
        world, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
    chunk = int(chunk_size) if chunk_size is not None else default_chunk_size(logits.shape[-1], logits.device)
    logp, ent = _VocabParallelLogprobs.apply(
        logits, target, group, world, rank, temperature, bool(with_entropy), chunk, resolve_backend(backend, logits)
    )
    return logp, (ent if with_entropy else None)
