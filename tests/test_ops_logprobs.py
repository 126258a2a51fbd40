"""vocab_parallel_logprobs: values and gradients against float64 torch.log_softmax.

Single-process tests run the op with no parallelism, once per backend (torch; Triton, compiled on
CUDA and in Triton's interpreter on CPU: tests/conftest.py sets TRITON_INTERPRET=1 there); TP 2 and 4
are in test_ops_logprobs_dist.py.
"""
from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_dgpo.ops import default_chunk_size, vocab_parallel_logprobs
from megatron_dgpo.ops.logprobs import BACKEND_ENV, resolve_backend

from tests.logprob_reference import bf16_store_rtol, reference, upstream_loss, value_tol  # noqa: E402

NEG_INF = float("-inf")
HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture(autouse=True, params=["torch", "triton"])
def backend(request, monkeypatch):
    """Every test of this module runs with each backend, selected through the environment variable."""
    name = request.param
    on_cuda = request.node.get_closest_marker("gpu") is not None
    if name == "triton":
        if not HAS_TRITON:
            pytest.skip("triton is not installed (pip install '.[triton]')")
        if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            # conftest sets it only without CUDA; on a GPU machine the CPU-tensor cases would
            # (rightly) be refused by resolve_backend, and the GPU-marked ones cover Triton.
            pytest.skip("CPU tensors with the Triton backend need TRITON_INTERPRET=1")
    monkeypatch.setenv(BACKEND_ENV, name)
    probe = torch.zeros(1, device="cuda" if on_cuda and torch.cuda.is_available() else "cpu")
    assert resolve_backend(None, probe) == name  # no silent fallback to another backend
    return name


def assert_close(got, ref, atol, rtol=0.0, what=""):
    got = got.detach().double()
    assert not torch.isnan(got).any(), f"{what}: NaN"
    assert torch.equal(torch.isinf(got), torch.isinf(ref)), f"{what}: inf pattern differs"
    fin = torch.isfinite(ref)
    err = (got[fin] - ref[fin]).abs()
    lim = atol + rtol * ref[fin].abs()
    worst = float((err - lim).max()) if err.numel() else -1.0
    assert worst <= 0, f"{what}: max err {float(err.max()):.3g} exceeds tolerance (atol {atol:.3g}, rtol {rtol:.3g})"


def run_and_check(logits, target, temperature, chunk, g1, g2, with_entropy=True):
    """Run the op with upstream grads (g1 for logp, g2 for entropy; None = unused) and compare."""
    x = logits.clone().requires_grad_(True)
    before = logits.clone()
    logp, ent = vocab_parallel_logprobs(x, target, temperature=temperature, with_entropy=with_entropy, chunk_size=chunk)
    assert logp.dtype == torch.float32 and logp.shape == target.shape
    if with_entropy:
        assert ent.dtype == torch.float32 and ent.shape == target.shape
    else:
        assert ent is None
    assert torch.equal(x.detach(), before), "forward modified the input logits"
    upstream_loss(logp, ent, g1, g2).backward()
    assert torch.equal(x.detach(), before), "backward modified the input logits"
    assert x.grad.dtype == logits.dtype and x.grad.shape == logits.shape

    r_logp, r_ent, r_grad = reference(logits, target, temperature, g1, g2)
    tol = value_tol(logits, temperature)
    assert_close(logp, r_logp, tol, what="logp")
    if with_entropy:
        assert_close(ent, r_ent, tol, what="entropy")
    gscale = max([float(g.abs().max()) for g in (g1, g2) if g is not None] + [1e-30])
    store = {torch.bfloat16: bf16_store_rtol(os.environ.get(BACKEND_ENV)), torch.float16: 2.0**-11}
    rtol = 1e-4 + store.get(logits.dtype, 0.0)
    assert_close(x.grad, r_grad, 4 * tol * gscale / temperature, rtol, what="grad")
    masked = torch.isinf(logits)
    if masked.any():
        assert bool((x.grad[masked] == 0).all()), "gradient on -inf entries must be exactly 0"
    return logp, ent, x.grad


def make(shape, dtype, seed=0, scale=3.0, pad=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, generator=g) * scale).to(dtype)
    v = shape[-1]
    if pad:
        logits[..., v - pad:] = NEG_INF
    target = torch.randint(0, v - pad, shape[:-1], generator=g)
    g1 = torch.randn(shape[:-1], generator=g)
    g2 = torch.randn(shape[:-1], generator=g)
    return logits, target, g1, g2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [None, 1, 7, 1000])
def test_matches_float64_reference(dtype, temperature, chunk):
    # [B, S, V] with T = 33 tokens (7 does not divide it) and 5 -inf padding columns.
    seed = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[dtype] * 100 + int(temperature * 10) + (chunk or 0)
    logits, target, g1, g2 = make((3, 11, 101), dtype, seed=seed, pad=5)
    run_and_check(logits, target, temperature, chunk, g1, g2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("mode", ["both", "logp_only"])
def test_cuda_style_fused_cast_path(monkeypatch, dtype, mode, backend):
    """The CUDA code path (mixed-dtype addcdiv/sub/mul with out=) run on CPU: same torch calls."""
    import megatron_dgpo.ops.logprobs as impl

    if backend != "torch":
        pytest.skip("torch backend internals")

    monkeypatch.setattr(impl, "_fuses_casts", lambda device: True)
    for temperature in (1.0, 0.7):
        logits, target, g1, g2 = make((5, 9, 70), dtype, seed=21, pad=4)
        if mode == "both":
            run_and_check(logits, target, temperature, 4, g1, g2)
        else:
            run_and_check(logits, target, temperature, 4, g1, None, with_entropy=False)


@pytest.mark.parametrize("mode", ["logp_only", "entropy_only", "logp_with_entropy_unused"])
def test_single_output_gradients(mode):
    logits, target, g1, g2 = make((4, 9, 64), torch.float32, seed=3, pad=3)
    if mode == "logp_only":
        run_and_check(logits, target, 0.7, 5, g1, None, with_entropy=False)
    elif mode == "entropy_only":
        run_and_check(logits, target, 0.7, 5, None, g2)
    else:
        run_and_check(logits, target, 0.7, 5, g1, None)


@pytest.mark.parametrize("leading", [(), (17,), (2, 3, 5)], ids=["scalar", "1d", "3d"])
def test_arbitrary_leading_dims(leading):
    logits, target, g1, g2 = make((*leading, 40), torch.float32, seed=11)
    run_and_check(logits, target, 1.0, 4, g1, g2)


def test_non_contiguous_logits():
    logits, target, g1, g2 = make((4, 13, 50), torch.float32, seed=5)
    sliced = logits.transpose(0, 1)  # [13, 4, 50], not viewable as [52, 50]
    run_and_check(sliced, target.transpose(0, 1), 0.7, 6, g1.t(), g2.t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ties_exact(dtype):
    v = 64
    logits = torch.zeros(6, v, dtype=dtype)
    logits[1] = 5.0  # all tied, non-zero
    logits[2, :8] = 3.0  # 8-way tie at the max
    logits[3, 10:] = NEG_INF  # uniform over 10 valid entries
    logits[4] = torch.arange(v, dtype=dtype) % 2  # half at 1, half at 0
    logits[5] = 1e4
    target = torch.tensor([0, 63, 3, 9, 1, 7])
    g1 = torch.ones(6)
    g2 = torch.ones(6)
    logp, ent, _ = run_and_check(logits, target, 1.0, 4, g1, g2)
    expect_logp = torch.tensor([-math.log(v), -math.log(v), 3 - math.log(8 * math.exp(3) + 56), -math.log(10),
                                1 - math.log(32 * math.e + 32), -math.log(v)])
    assert torch.allclose(logp.double(), expect_logp.double(), atol=2e-6, rtol=0)
    for row, k in ((0, v), (1, v), (3, 10), (5, v)):
        assert abs(float(ent[row].detach()) - math.log(k)) < 2e-6


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("case", ["huge", "huge_negative", "tiny", "mixed_extremes"])
def test_extreme_values(case, temperature):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(5, 7, 80, generator=g)
    logits = {
        "huge": 1e4 + base,
        "huge_negative": -1e4 + base,
        "tiny": base * 1e-30,
        "mixed_extremes": torch.where(base > 0.5, torch.full_like(base, 1e4), base * 1e-3),
    }[case]
    logits[..., :3] = NEG_INF
    target = torch.randint(3, 80, (5, 7), generator=g)
    g1 = torch.randn(5, 7, generator=g)
    g2 = torch.randn(5, 7, generator=g)
    logp, ent, grad = run_and_check(logits.float(), target, temperature, 6, g1, g2)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all() and torch.isfinite(grad).all()


def test_masked_padding_no_nan_and_target_on_padding():
    logits, target, g1, g2 = make((8, 30), torch.bfloat16, seed=9, pad=12)
    logits[0, 1:] = NEG_INF  # a row with a single valid entry: logp 0, entropy 0
    target[0] = 0
    logp, ent, grad = run_and_check(logits, target, 0.7, 3, g1, g2)
    assert float(logp[0].detach()) == 0.0 and float(ent[0].detach()) == 0.0
    assert not torch.isnan(grad).any()
    # A target on a -inf entry has logp = -inf (and still no NaN anywhere).
    target[1] = 29
    x = logits.clone().requires_grad_(True)
    logp, ent = vocab_parallel_logprobs(x, target, with_entropy=True, chunk_size=3)
    assert logp[1] == NEG_INF and torch.isfinite(ent).all()
    (torch.where(torch.isfinite(logp), logp, 0.0).sum() + ent.sum()).backward()
    assert not torch.isnan(x.grad).any()


@pytest.mark.parametrize("seed", range(6))
def test_rows_spanning_many_blocks(monkeypatch, seed):
    """Triton's running max / sum / entropy rescaling across vocabulary blocks (the default block of
    4096 holds every other CPU case in one block): 16-wide blocks, rows whose first blocks are all
    -inf, rows far below zero, scattered -inf, a growing max; against float64."""
    from megatron_dgpo.ops import logprobs_triton

    if HAS_TRITON:
        monkeypatch.setattr(logprobs_triton, "_MAX_BLOCK", 16)
    g = torch.Generator().manual_seed(100 + seed)
    n, v = 12, 16 * 7 + 5
    logits = torch.randn(n, v, generator=g) * 3
    logits[0, :40] = NEG_INF  # first blocks all -inf
    logits[1] = logits[1] - 1e4  # every logit far below zero
    logits[2, torch.rand(v, generator=g) < 0.5] = NEG_INF  # scattered padding
    logits[3] = torch.linspace(-20, 20, v)  # the max grows in every block
    logits[4, :-1] = NEG_INF  # one valid entry, in the last (partial) block
    target = torch.randint(0, v, (n,), generator=g)
    target[0] = 50
    target[2] = int(torch.nonzero(torch.isfinite(logits[2]))[0])
    target[4] = v - 1
    g1, g2 = torch.randn(n, generator=g), torch.randn(n, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        for temperature in (1.0, 0.7):
            run_and_check(logits.to(dtype), target, temperature, 5, g1, g2)


def test_chunking_does_not_change_results():
    logits, target, g1, g2 = make((37, 200), torch.float32, seed=13, pad=4)
    outs = []
    for chunk in (1, 5, 36, 37, 10**6, None):
        x = logits.clone().requires_grad_(True)
        logp, ent = vocab_parallel_logprobs(x, target, temperature=0.7, with_entropy=True, chunk_size=chunk)
        ((logp * g1).sum() + (ent * g2).sum()).backward()
        outs.append((logp, ent, x.grad))
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-6)


def test_no_grad_and_empty():
    logits, target, _, _ = make((5, 16), torch.float32)
    with torch.no_grad():
        logp, ent = vocab_parallel_logprobs(logits, target, with_entropy=True)
    assert logp.shape == (5,) and ent.shape == (5,)
    empty = torch.zeros(0, 16, requires_grad=True)
    logp, ent = vocab_parallel_logprobs(empty, torch.zeros(0, dtype=torch.long), with_entropy=True)
    (logp.sum() + ent.sum()).backward()
    assert empty.grad.shape == (0, 16)


def test_argument_validation():
    logits = torch.zeros(3, 8)
    with pytest.raises(ValueError):
        vocab_parallel_logprobs(logits, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        vocab_parallel_logprobs(logits, torch.zeros(3, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError):
        vocab_parallel_logprobs(logits, torch.zeros(3, dtype=torch.long), chunk_size=0)
    with pytest.raises(TypeError):
        vocab_parallel_logprobs(torch.zeros(3, 8, dtype=torch.long), torch.zeros(3, dtype=torch.long))


def test_default_chunk_size():
    assert default_chunk_size(151936, "cpu") >= 1
    assert default_chunk_size(151936, "cuda") > default_chunk_size(151936, "cpu")
    assert default_chunk_size(1, "cpu") * 4 <= 16 * 2**20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_memory_bounded_by_chunk(dtype, backend):
    """No float32 copy of the logits: forward extra memory ~ chunk buffers; backward ~ the gradient."""
    from megatron_dgpo.ops._memprofile import peak_extra_bytes

    if backend == "triton":  # the interpreter's numpy buffers are invisible to torch's profiler
        pytest.skip("Triton's memory is measured on CUDA (test_cuda_matches_reference_and_memory)")

    t, v, chunk = 2048, 2048, 32
    logits = (torch.randn(t, v) * 2).to(dtype).requires_grad_(True)
    target = torch.randint(0, v, (t,))
    full_fp32 = t * v * 4
    (logp, ent), fwd = peak_extra_bytes(
        lambda: vocab_parallel_logprobs(logits, target, temperature=0.7, with_entropy=True, chunk_size=chunk)
    )
    _, bwd = peak_extra_bytes(lambda: (logp.sum() + ent.sum()).backward())
    # Two float32 [chunk, V] work buffers and a handful of [T] float32/int64/bool vectors.
    chunk_bytes = 2 * chunk * v * 4
    per_token = 128 * t
    assert chunk_bytes + per_token < full_fp32 / 8
    assert fwd <= chunk_bytes + per_token, (fwd, full_fp32)
    grad_bytes = t * v * logits.element_size()
    assert bwd <= grad_bytes + chunk_bytes + per_token, (bwd, grad_bytes)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_cuda_matches_reference_and_memory(dtype, temperature):
    """Same checks on a CUDA device (skipped without one), plus the peak-memory bound there."""
    from megatron_dgpo.ops._memprofile import peak_extra_bytes

    logits, target, g1, g2 = make((4, 257, 1000), dtype, seed=31, pad=24)
    x = logits.cuda().requires_grad_(True)
    before = x.detach().clone()
    logp, ent = vocab_parallel_logprobs(x, target.cuda(), temperature=temperature, with_entropy=True, chunk_size=100)
    ((logp * g1.cuda()).sum() + (ent * g2.cuda()).sum()).backward()
    assert torch.equal(x.detach(), before)
    r_logp, r_ent, r_grad = reference(logits, target, temperature, g1, g2)
    tol = value_tol(logits, temperature)
    assert_close(logp.cpu(), r_logp, tol, what="logp")
    assert_close(ent.cpu(), r_ent, tol, what="entropy")
    rtol = 1e-4 + (2.0**-8 if dtype == torch.bfloat16 else 0.0)
    gscale = max(float(g1.abs().max()), float(g2.abs().max()))
    assert_close(x.grad.cpu(), r_grad, 4 * tol * gscale / temperature, rtol, what="grad")
    assert bool((x.grad[torch.isinf(x.detach())] == 0).all())

    t, v, chunk = 8192, 8192, 64
    big = (torch.randn(t, v, device="cuda") * 2).to(dtype).requires_grad_(True)
    tgt = torch.randint(0, v, (t,), device="cuda")
    (lp, h), fwd = peak_extra_bytes(
        lambda: vocab_parallel_logprobs(big, tgt, temperature=temperature, with_entropy=True, chunk_size=chunk), "cuda"
    )
    _, bwd = peak_extra_bytes(lambda: (lp.sum() + h.sum()).backward(), "cuda")
    chunk_bytes = 2 * chunk * v * 4 + 128 * t + 2**20
    assert fwd <= chunk_bytes, fwd
    assert bwd <= t * v * big.element_size() + chunk_bytes, bwd


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 20),
    v=st.integers(2, 40),
    chunk=st.integers(1, 25),
    temperature=st.sampled_from([0.3, 0.7, 1.0, 1.9]),
    scale=st.sampled_from([1e-3, 1.0, 10.0, 300.0]),
    pad=st.integers(0, 5),
    seed=st.integers(0, 2**16),
)
def test_property_random(n, v, chunk, temperature, scale, pad, seed):
    pad = min(pad, v - 1)
    logits, target, g1, g2 = make((n, v), torch.float32, seed=seed, scale=scale, pad=pad)
    run_and_check(logits, target, temperature, chunk, g1, g2)


@pytest.mark.gpu
def test_cuda_offsets_beyond_int32():
    """T * V > 2^31 elements (T = 16384, V = 151936, bf16: 4.6 GiB): rows near the end are addressed
    correctly (int64 row offsets) in forward and backward; checked rows against float64."""
    t, v = 16384, 151936
    assert t * v > 2**31
    g = torch.Generator(device="cuda").manual_seed(3)
    x = (torch.randn(t, v, device="cuda", generator=g) * 2).to(torch.bfloat16).requires_grad_(True)
    target = torch.randint(0, v, (t,), device="cuda", generator=g)
    logp, ent = vocab_parallel_logprobs(x, target, temperature=0.7, with_entropy=True)
    rows = torch.tensor([0, 1, t // 2, t - 2, t - 1], device="cuda")
    g1 = torch.zeros(t, device="cuda")
    g1[rows] = 1.0
    (logp * g1).sum().add((ent * g1).sum()).backward()
    sub = x.detach()[rows].cpu()
    r_logp, r_ent, r_grad = reference(sub, target[rows].cpu(), 0.7, torch.ones(len(rows)), torch.ones(len(rows)))
    tol = value_tol(sub, 0.7)
    assert_close(logp[rows].cpu(), r_logp, tol, what="logp")
    assert_close(ent[rows].cpu(), r_ent, tol, what="entropy")
    assert_close(x.grad[rows].cpu(), r_grad, 4 * tol / 0.7, 1e-4 + 2.0**-8, what="grad")
    others = torch.ones(t, dtype=torch.bool, device="cuda")
    others[rows] = False
    assert int(x.grad[others].count_nonzero()) == 0
