"""Triton kernels behind `vocab_parallel_logprobs(..., backend="triton")` (the default on CUDA).

The torch implementation makes several elementwise passes per chunk (~36 bytes of memory traffic
per logit in each direction for bf16). These two kernels reach the floor: the forward reads every
logit once (an online softmax: running max, rescaled sum of exponentials and, for the entropy, the
rescaled sum of exp(x) * x), and the backward reads every logit once and writes its gradient once.
Nothing of size [T, V/TP] is allocated besides the gradient itself.

One Triton program handles one token row, looping over this rank's vocabulary shard in blocks.
Forward per row (z = logits / temperature, in float32):
    m = max_j z_j,   S = sum_j exp(z_j - r),   E = sum_j exp(z_j - r) * (z_j - r),   r = m or 0 if m = -inf
(accumulated block by block and rescaled when the running max grows: with d = r_old - r_new,
S <- S e^d + ..., E <- e^d (E + d S) + ...). Terms with exp(x) = 0 (masked -inf padding) add 0 to E,
not 0 * -inf. Tensor parallelism combines the per-rank (m, S, E) in `combine_partial_stats`
(MAX all-reduce of m, then rescaling to the global reference before the SUM all-reduce).
Backward per element, with per-row coefficients prepared by the caller (they include 1/temperature):
    grad_j = p_j * (c + b * y_j) + [j == target] * g,   y_j = z_j - lse,   p_j = exp(y_j)
and 0 where p_j = 0 (masked entries: their gradient is exactly 0; degenerate rows with NaN lse also
give 0). The target entry is computed in float32 and rounded once to the logits' dtype.

Row offsets are int64 (T * V exceeds 2^31 for T = 16384, V = 151936). On CPU the kernels run in
Triton's interpreter when TRITON_INTERPRET=1 is set before triton is imported (tests use this).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from megatron_dgpo.ops.logprobs import combine_partial_stats  # noqa: F401  (shared with the fused LM head)

__all__ = ["row_stats", "combine_partial_stats", "row_grad", "block_size"]

_MAX_BLOCK = 4096


def block_size(vocab_local: int) -> int:
    """Vocabulary block per loop iteration: the next power of two up to 4096 (16 elements/thread at 8 warps)."""
    return min(_MAX_BLOCK, max(16, triton.next_power_of_2(max(1, vocab_local))))


@triton.jit
def _row_stats_kernel(logits_ptr, row_stride, m_ptr, s_ptr, e_ptr, n_cols, temperature,
                      HAS_TEMP: tl.constexpr, WITH_ENT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    m = float("-inf")
    s = 0.0
    e = 0.0
    for start in range(0, n_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        z = tl.load(base + offs, mask=offs < n_cols, other=float("-inf")).to(tl.float32)
        if HAS_TEMP:
            z = tl.div_rn(z, temperature)
        m_new = tl.maximum(m, tl.max(z, 0))
        r_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        r_old = tl.where(m == float("-inf"), 0.0, m)
        # d <= 0 except right after an all -inf prefix (r_old = 0 > r_new), where s = e = 0 and the
        # clamp keeps exp(d) finite (0 * inf would be NaN).
        d = tl.minimum(r_old - r_new, 0.0)
        alpha = tl.exp(d)
        x = z - r_new
        ex = tl.exp(x)
        if WITH_ENT:
            carried = tl.where(s > 0.0, e + d * s, 0.0)
            e = alpha * carried + tl.sum(tl.where(ex > 0.0, ex * x, 0.0), 0)
        s = s * alpha + tl.sum(ex, 0)
        m = m_new
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    if WITH_ENT:
        tl.store(e_ptr + row, e)


@triton.jit
def _row_grad_kernel(logits_ptr, row_stride, grad_ptr, lse_ptr, c_ptr, b_ptr, g_ptr, tgt_ptr, n_cols,
                     temperature, HAS_TEMP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    out = grad_ptr + row * n_cols
    lse = tl.load(lse_ptr + row)
    c = tl.load(c_ptr + row)
    b = tl.load(b_ptr + row)
    g = tl.load(g_ptr + row)
    tgt = tl.load(tgt_ptr + row)
    for start in range(0, n_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n_cols
        z = tl.load(base + offs, mask=mask, other=float("-inf")).to(tl.float32)
        if HAS_TEMP:
            z = tl.div_rn(z, temperature)
        y = z - lse
        p = tl.exp(y)
        gr = tl.where(p > 0.0, p * (c + b * y), 0.0)
        gr = tl.where(offs == tgt, gr + g, gr)
        tl.store(out + offs, gr.to(grad_ptr.dtype.element_ty), mask=mask)


def _launch_args(flat: torch.Tensor, temperature: float, block=None, num_warps=None, default_warps=8):
    """Kernel meta-parameters; `block` / `num_warps` override the defaults (tools/sweep_triton_logprob.py)."""
    blk = block or block_size(flat.shape[1])
    warps = num_warps or (default_warps if blk >= 2048 else 4)
    return dict(HAS_TEMP=temperature != 1.0, BLOCK=blk, num_warps=warps)


def row_stats(flat: torch.Tensor, temperature: float, with_entropy: bool, block=None, num_warps=None):
    """Per-row (m, S, E) of this rank's shard `flat` [n, V/TP] (unit stride along V); float32 [n] each.

    S and E are relative to r = m (0 where m = -inf); E is None without entropy.
    """
    n = flat.shape[0]
    f32 = torch.float32
    m = torch.empty(n, dtype=f32, device=flat.device)
    s = torch.empty(n, dtype=f32, device=flat.device)
    e = torch.empty(n, dtype=f32, device=flat.device) if with_entropy else s
    if n == 0:
        return m, s, (e if with_entropy else None)
    # H100, T=16384, V=151936 bf16 (tools/sweep_triton_logprob.py, docs/benchmarks.md): 4096-wide
    # blocks; the forward is fastest with 4 warps per row (2.70 ms vs 3.03 with 8), the backward with
    # 8 (3.46 ms vs 3.75 with 4). A variant keeping per-lane running stats (one exp per element, no
    # reduction inside the loop) measured slower (3.2-6.9 ms) and was dropped.
    vl = flat.shape[1]
    kw = _launch_args(flat, temperature, block, num_warps, default_warps=4)
    if vl == 0:
        m.fill_(-math.inf), s.zero_(), e.zero_()
        return m, s, (e if with_entropy else None)
    _row_stats_kernel[(n,)](flat, flat.stride(0), m, s, e, vl, float(temperature), WITH_ENT=with_entropy, **kw)
    return m, s, (e if with_entropy else None)


def row_grad(flat, lse, coef_c, coef_y, onehot, target_local, temperature, out_dtype, block=None, num_warps=None):
    """Gradient [n, V/TP] in `out_dtype`: p * (coef_c + coef_y * y) + [j == target_local] * onehot."""
    n, vl = flat.shape
    grad = torch.empty((n, vl), dtype=out_dtype, device=flat.device)
    if n == 0 or vl == 0:
        return grad
    kw = _launch_args(flat, temperature, block, num_warps)
    _row_grad_kernel[(n,)](flat, flat.stride(0), grad, lse, coef_c, coef_y, onehot, target_local, vl,
                           float(temperature), **kw)
    return grad
