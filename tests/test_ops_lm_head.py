"""fused_lm_head_logprobs (ops/lm_head.py), one process: against a float64 full-vocabulary
reference and against the materialised path (matmul + vocab_parallel_logprobs), for values and
the gradients of hidden and weight, every registry loss, DDP's main_grad convention, and memory.
TP 2 with and without sequence parallelism, and the model wiring: tests/test_lm_head_dist.py."""
from __future__ import annotations

import pytest
import torch

from megatron_dgpo.loss import PolicyLossConfig, policy_loss
from megatron_dgpo.loss.registry import registered_losses
from megatron_dgpo.ops import fused_lm_head_logprobs, vocab_parallel_logprobs
from tests.logprob_reference import reference, upstream_loss, value_tol

T, H, V = 37, 24, 64


def make(seed=0, dtype=torch.float32, t=T, v=V, scale=0.4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, H, generator=g).to(dtype)
    w = (torch.randn(v, H, generator=g) * scale).to(dtype)
    tgt = torch.randint(0, v, (t,), generator=g)
    g1 = torch.randn(t, generator=g)
    g2 = torch.randn(t, generator=g)
    return x, w, tgt, g1, g2


def fused(x, w, tgt, g1, g2, **kw):
    want_ent = kw.pop("ent", False) or g2 is not None
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    logp, ent = fused_lm_head_logprobs(xr, wr, tgt, with_entropy=want_ent, **kw)
    loss = upstream_loss(logp, ent, g1, g2)
    loss.backward()
    return logp.detach(), None if ent is None else ent.detach(), xr.grad, wr.grad


def materialised(x, w, tgt, g1, g2, temperature=1.0, vocab_size=None, ent=False):
    """ColumnParallelLinear's math (x @ W^T), the train step's padding mask, then the log-prob op."""
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    logits = xr @ wr.t()
    if vocab_size is not None:
        logits = logits.masked_fill(torch.arange(w.shape[0]) >= vocab_size, float("-inf"))
    logp, e = vocab_parallel_logprobs(logits, tgt, temperature=temperature, with_entropy=g2 is not None or ent)
    upstream_loss(logp, e, g1, g2).backward()
    return logp.detach(), None if e is None else e.detach(), xr.grad, wr.grad


def float64_reference(x, w, tgt, g1, g2, temperature=1.0, vocab_size=None):
    """Float64 values and d/dx, d/dW through the full logits (chain rule by hand from tests'
    reference: d/dx = G W, d/dW = G^T x with G = d loss / d logits)."""
    logits = x.double() @ w.double().t()
    if vocab_size is not None:
        logits[:, vocab_size:] = float("-inf")
    logp, ent, grad = reference(logits, tgt, temperature, g1.double() if g1 is not None else None,
                                g2.double() if g2 is not None else None)
    grad = torch.nan_to_num(grad, nan=0.0)
    return logp, ent, grad @ w.double(), grad.t() @ x.double(), logits


def rel(a, b):
    a, b = a.double(), b.double()
    fin = torch.isfinite(b)
    assert torch.equal(torch.isinf(a), torch.isinf(b)), "inf pattern differs"
    return float((a[fin] - b[fin]).abs().max() / b[fin].abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
# Tiles (tokens, vocabulary columns): 37 tokens and 64 (58 unpadded) columns are divided by none
# of 5, 7, 9, 13; (None, None) is the default tile (all of it here).
@pytest.mark.parametrize("tile", [(1, None), (5, 13), (7, 9), (None, 13), (None, None)],
                         ids=["t1", "t5v13", "t7v9", "v13", "auto"])
@pytest.mark.parametrize("vocab_size", [None, 58], ids=["novpad", "vpad"])
def test_matches_float64_and_materialised(temperature, tile, vocab_size):
    x, w, tgt, g1, g2 = make()
    if vocab_size is not None:
        tgt = tgt % vocab_size
    kw = dict(temperature=temperature, vocab_size=vocab_size)
    lp, en, dx, dw = fused(x, w, tgt, g1, g2, chunk_tokens=tile[0], chunk_vocab=tile[1], **kw)
    r_lp, r_en, r_dx, r_dw, logits = float64_reference(x, w, tgt, g1, g2, **kw)
    tol = value_tol(logits, temperature)
    assert float((lp.double() - r_lp).abs().max()) <= tol
    assert float((en.double() - r_en).abs().max()) <= tol
    assert rel(dx, r_dx) <= 1e-5 and rel(dw, r_dw) <= 1e-5
    m_lp, m_en, m_dx, m_dw = materialised(x, w, tgt, g1, g2, **kw)
    for a, b in ((lp, m_lp), (en, m_en), (dx, m_dx), (dw, m_dw)):
        assert rel(a, b) <= 1e-5


@pytest.mark.parametrize("which", ["logp_only", "entropy_only", "masked_tokens", "target_on_padding"])
def test_partial_gradients_and_masking(which):
    """d logp only / d entropy only; masked tokens (zero upstream gradient, arbitrary targets
    including padding ids) contribute nothing; a target on a padding id gets logp = -inf."""
    x, w, tgt, g1, g2 = make(seed=3)
    vocab_size = 60
    tgt = tgt % vocab_size
    if which == "logp_only":
        g2 = None
    elif which == "entropy_only":
        g1 = None
    elif which == "masked_tokens":
        mask = torch.arange(T) % 3 != 0
        g1, g2 = g1 * mask, g2 * mask
        tgt = torch.where(mask, tgt, torch.full_like(tgt, V - 1))  # padding id under the mask
    kw = dict(temperature=0.8, vocab_size=vocab_size, ent=True)
    if which == "target_on_padding":
        tgt[4] = V - 2
        lp, en = fused_lm_head_logprobs(x, w, tgt, with_entropy=True, chunk_tokens=6, chunk_vocab=11, temperature=0.8,
                                        vocab_size=vocab_size)
        assert lp[4] == float("-inf") and torch.isfinite(lp[torch.arange(T) != 4]).all()
        assert torch.isfinite(en).all()
        return
    lp, en, dx, dw = fused(x, w, tgt, g1, g2, chunk_tokens=6, chunk_vocab=11, **kw)
    m_lp, m_en, m_dx, m_dw = materialised(x, w, tgt, g1, g2, **kw)
    assert rel(lp, m_lp) <= 1e-5 and rel(en, m_en) <= 1e-5
    assert rel(dx, m_dx) <= 1e-5 and rel(dw, m_dw) <= 1e-5
    assert torch.all(dw[vocab_size:] == 0)  # padding rows get exactly no gradient
    if which == "masked_tokens":
        assert torch.all(dx[~mask] == 0)


def test_bf16_matches_materialised_bf16():
    """bf16 hidden/weight: the same logits (one GEMM per chunk vs one for all rows; rows are
    independent) and gradients within bf16 rounding of the materialised path."""
    x, w, tgt, g1, g2 = make(seed=5, dtype=torch.bfloat16)
    lp, en, dx, dw = fused(x, w, tgt, g1, g2, chunk_tokens=8, chunk_vocab=24, temperature=0.7)
    m_lp, m_en, m_dx, m_dw = materialised(x, w, tgt, g1, g2, temperature=0.7)
    assert rel(lp, m_lp) <= 1e-5 and rel(en, m_en) <= 1e-5
    assert dx.dtype == dw.dtype == torch.bfloat16
    assert rel(dx, m_dx) <= 2**-7 and rel(dw, m_dw) <= 2**-6


@pytest.mark.parametrize("name", sorted(registered_losses()))
def test_every_registry_loss(name):
    """The losses are pure functions of log-probs: each one (plus an entropy bonus) gives the same
    loss and the same d hidden, d weight through the fused head as through materialised logits."""
    g = torch.Generator().manual_seed(11)
    b, s = 3, 9
    x, w, _, _, _ = make(seed=7, t=b * s)
    tgt = torch.randint(0, 60, (b, s), generator=g)
    mask = torch.rand(b, s, generator=g) > 0.25
    adv = torch.randn(b, generator=g)
    cfg = PolicyLossConfig.paper_defaults(name)

    def run(use_fused):
        xr, wr = x.clone().view(b, s, H).requires_grad_(True), w.clone().requires_grad_(True)
        if use_fused:
            logp, ent = fused_lm_head_logprobs(xr, wr, tgt, temperature=0.9, with_entropy=True, chunk_tokens=4,
                                               chunk_vocab=17, vocab_size=60)
        else:
            logits = (xr @ wr.t()).masked_fill(torch.arange(V) >= 60, float("-inf"))
            logp, ent = vocab_parallel_logprobs(logits, tgt, temperature=0.9, with_entropy=True)
        old = logp.detach() + 0.5 * torch.randn(b, s, generator=torch.Generator().manual_seed(1))
        loss, _ = policy_loss(cfg, logp, old, adv, mask)
        loss = loss - 0.01 * (ent * mask).sum() / mask.sum()  # entropy bonus
        loss.backward()
        return loss.detach(), xr.grad, wr.grad

    (l0, dx0, dw0), (l1, dx1, dw1) = run(False), run(True)
    assert abs(float(l1 - l0)) <= 1e-5 * max(abs(float(l0)), 1e-6)
    assert rel(dx1, dx0) <= 1e-5 and rel(dw1, dw0) <= 1e-5
    assert float(dw0.abs().max()) > 0


def _ddp_weight(w, zero_out=False):
    """A leaf with Megatron DDP's attributes: a float32 main_grad holding earlier micro-batches."""
    p = torch.nn.Parameter(w.clone())
    p.main_grad = torch.full(w.shape, 0.25, dtype=torch.float32)
    p.grad_added_to_main_grad = False
    if zero_out:
        p.zero_out_wgrad = True
    return p


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_weight_gradient_goes_to_main_grad(dtype):
    """With DDP's main_grad the float32 d weight is added to it (as gradient_accumulation_fusion
    does), grad_added_to_main_grad is set so DDP's hook does not add it again."""
    x, w, tgt, g1, g2 = make(seed=9, dtype=dtype)
    p = _ddp_weight(w)
    xr = x.clone().requires_grad_(True)
    logp, ent = fused_lm_head_logprobs(xr, p, tgt, with_entropy=True, chunk_tokens=5, chunk_vocab=20)
    upstream_loss(logp, ent, g1, g2).backward()
    _, _, _, r_dw, _ = float64_reference(x, w, tgt, g1, g2)
    assert p.grad_added_to_main_grad
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    assert rel(p.main_grad - 0.25, r_dw) <= tol
    assert p.grad is not None and p.grad.shape == p.shape  # the dummy that keeps DDP's hook firing


def test_tied_embedding_gradient_reaches_main_grad():
    """Tied embeddings on one stage (Megatron sets zero_out_wgrad): the returned dummy is zeros, so
    autograd's sum with the embedding's gradient, which DDP's hook adds, is exactly that gradient."""
    x, w, tgt, g1, g2 = make(seed=13)
    p = _ddp_weight(w, zero_out=True)
    ids = torch.randint(0, V, (T,))
    h = torch.nn.functional.embedding(ids, p) + x  # the embedding use of the same weight
    logp, ent = fused_lm_head_logprobs(h, p, tgt, with_entropy=True, chunk_tokens=5, chunk_vocab=20)
    upstream_loss(logp, ent, g1, g2).backward()
    # What DDP's hook does next (grad_added_to_main_grad with zero_out_wgrad): add param.grad.
    main = p.main_grad + p.grad

    q = w.clone().double().requires_grad_(True)
    hq = torch.nn.functional.embedding(ids, q) + x.double()
    lq = hq @ q.t()
    r_lp, r_en = vocab_parallel_logprobs(lq, tgt, with_entropy=True)
    upstream_loss(r_lp, r_en, g1.double(), g2.double()).backward()
    assert rel(main - 0.25, q.grad) <= 1e-5


def test_memory_independent_of_logits():
    """Peak extra memory of forward and backward is the chunk buffers plus O(T x H), far below one
    float32 [T, V] logits tensor (the materialised path needs several)."""
    from megatron_dgpo.ops._memprofile import peak_extra_bytes

    t, v, h, chunk = 2048, 4096, 16, 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(t, h, generator=g).requires_grad_(True)
    w = (torch.randn(v, h, generator=g) * 0.3).requires_grad_(True)
    tgt = torch.randint(0, v, (t,), generator=g)
    (lp, en), fwd = peak_extra_bytes(lambda: fused_lm_head_logprobs(x, w, tgt, temperature=0.7, with_entropy=True,
                                                                    chunk_tokens=chunk, chunk_vocab=v))
    _, bwd = peak_extra_bytes(lambda: (lp.sum() + en.sum()).backward())
    logits_bytes = t * v * 4
    chunk_bytes = 5 * chunk * v * 4  # logits, gradient and three float32 work buffers of one tile
    small = 2 * t * h * 4 + 2 * v * h * 4 + 128 * t  # d hidden, d weight, per-token vectors
    assert chunk_bytes + small < logits_bytes / 8
    assert fwd <= chunk_bytes + small, (fwd, logits_bytes)
    assert bwd <= chunk_bytes + small, (bwd, logits_bytes)


def test_argument_checks():
    x, w, tgt, _, _ = make()
    with pytest.raises(ValueError, match="target shape"):
        fused_lm_head_logprobs(x, w, tgt[:-1])
    with pytest.raises(ValueError, match="chunk_tokens"):
        fused_lm_head_logprobs(x, w, tgt, chunk_tokens=0)
    with pytest.raises(ValueError, match="chunk_vocab"):
        fused_lm_head_logprobs(x, w, tgt, chunk_vocab=0)
    with pytest.raises(TypeError, match="dtype"):
        fused_lm_head_logprobs(x, w.double(), tgt)
    with pytest.raises(ValueError, match="weight"):
        fused_lm_head_logprobs(x, w[:, :-1], tgt)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_cuda_matches_float64_and_bf16_materialised(temperature):
    """On CUDA: float32 against the float64 reference; bf16 against the materialised bf16 path
    (its log-prob op on CUDA is the Triton backend); peak memory far below one [T, V] logits."""
    from megatron_dgpo.ops._memprofile import peak_extra_bytes

    x, w, tgt, g1, g2 = make(seed=17, t=300, v=1000)
    r_lp, r_en, r_dx, r_dw, logits = float64_reference(x, w, tgt, g1, g2, temperature=temperature, vocab_size=990)
    cu = [a.cuda() for a in (x, w, tgt % 990, g1, g2)]
    lp, en, dx, dw = fused(*cu, temperature=temperature, chunk_tokens=64, chunk_vocab=300, vocab_size=990)
    tol = value_tol(logits, temperature)
    assert float((lp.double().cpu() - r_lp).abs().max()) <= tol
    assert float((en.double().cpu() - r_en).abs().max()) <= tol
    assert rel(dx.cpu(), r_dx) <= 1e-5 and rel(dw.cpu(), r_dw) <= 1e-5

    xb, wb, tb, g1b, g2b = make(seed=19, dtype=torch.bfloat16, t=4096, v=32768)
    cu = [a.cuda() for a in (xb, wb, tb, g1b, g2b)]
    lp, en, dx, dw = fused(*cu, temperature=temperature)
    m_lp, m_en, m_dx, m_dw = materialised(*cu, temperature=temperature)
    assert rel(lp, m_lp) <= 1e-5 and rel(en, m_en) <= 1e-5
    assert rel(dx, m_dx) <= 2**-7 and rel(dw, m_dw) <= 2**-6

    xr, wr = cu[0].clone().requires_grad_(True), cu[1].clone().requires_grad_(True)
    (lp, en), fwd = peak_extra_bytes(lambda: fused_lm_head_logprobs(
        xr, wr, cu[2], temperature=temperature, with_entropy=True, chunk_tokens=256, chunk_vocab=32768), "cuda")
    _, bwd = peak_extra_bytes(lambda: upstream_loss(lp, en, cu[3], cu[4]).backward(), "cuda")
    logits_bytes = 4096 * 32768 * 2  # bf16; chunk buffers: 256 x 32768 x (2 + 2 + 4 + 4) bytes = 96 MiB
    assert fwd < logits_bytes / 2 and bwd < logits_bytes / 2, (fwd, bwd, logits_bytes)


def test_default_tiles():
    """Square-ish float32 tiles of the budget; a short side is used whole and the other grows."""
    from megatron_dgpo.ops import lm_head_tile

    c, vb = lm_head_tile(100_000, 151_936, device="cpu")
    assert c == vb == 2896 and c * vb * 4 <= 32 * 2**20
    assert lm_head_tile(512, 151_936, device="cpu") == (512, 16384)
    assert lm_head_tile(100_000, 256, device="cpu") == (32768, 256)
    c, vb = lm_head_tile(65_536, 75_968, device="cuda")
    assert c == vb == 8192
    assert lm_head_tile(37, 64, chunk_tokens=5) == (5, 64)
    assert lm_head_tile(37, 64, chunk_vocab=9) == (37, 9)
