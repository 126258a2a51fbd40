"""float64 reference for the vocab-parallel log-prob op: full-vocabulary log_softmax."""
import torch


def reference(logits, target, temperature, g1=None, g2=None):
    """(logp, entropy, d(g1.logp + g2.H)/d logits), all float64 on the full vocabulary."""
    z = (logits.double() / temperature).detach().requires_grad_(True)
    ls = torch.log_softmax(z, dim=-1)
    logp = ls.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    safe = torch.where(torch.isfinite(ls), ls, torch.zeros_like(ls))  # 0 * -inf := 0, NaN-free grad
    ent = -(ls.exp() * safe).sum(-1)
    loss = torch.zeros((), dtype=torch.float64)
    if g1 is not None:
        loss = loss + (logp * g1.double()).sum()
    if g2 is not None:
        loss = loss + (ent * g2.double()).sum()
    if loss.requires_grad:
        loss.backward()
        grad = z.grad / temperature
    else:
        grad = torch.zeros_like(z)
    return logp.detach(), ent.detach(), grad
