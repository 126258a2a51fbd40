"""float64 reference for the vocab-parallel log-prob op (full-vocabulary log_softmax), and the
upstream loss and tolerances shared by tests/test_ops_logprobs.py and tests/workers/ops_worker.py."""
import os

import torch

EPS32 = torch.finfo(torch.float32).eps


def upstream_loss(logp, ent, g1=None, g2=None):
    """g1 . logp + g2 . H (a None weight drops its term) in logp's dtype: the scalar every check
    differentiates."""
    loss = torch.zeros((), dtype=logp.dtype)
    if g1 is not None:
        loss = loss + (logp * g1.to(logp.dtype)).sum()
    if g2 is not None:
        loss = loss + (ent * g2.to(logp.dtype)).sum()
    return loss


def value_tol(logits, temperature):
    """float32 arithmetic on z = logits / T: error ~ a few ulps of max|z| plus summation error."""
    fin = logits[torch.isfinite(logits)].double().abs()
    zmax = float(fin.max()) / temperature if fin.numel() else 0.0
    return 1e-5 + 8 * EPS32 * zmax


def bf16_store_rtol(backend) -> float:
    """Relative error of the float32 -> bfloat16 gradient store: half an ulp, except for the Triton
    backend in Triton's interpreter, whose cast truncates (interpreter.py cast_impl ignores the
    rounding mode): one ulp."""
    interpreted = backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    return 2.0**-7 if interpreted else 2.0**-8


def reference(logits, target, temperature, g1=None, g2=None):
    """(logp, entropy, d(g1.logp + g2.H)/d logits), all float64 on the full vocabulary."""
    z = (logits.double() / temperature).detach().requires_grad_(True)
    ls = torch.log_softmax(z, dim=-1)
    logp = ls.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    safe = torch.where(torch.isfinite(ls), ls, torch.zeros_like(ls))  # 0 * -inf := 0, NaN-free grad
    ent = -(ls.exp() * safe).sum(-1)
    loss = upstream_loss(logp, ent, g1, g2)
    if loss.requires_grad:
        loss.backward()
        grad = z.grad / temperature
    else:
        grad = torch.zeros_like(z)
    return logp.detach(), ent.detach(), grad
