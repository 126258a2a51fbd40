"""policy_loss: validation, the shared ratio/LN/HP context, the registered surrogate, aggregation
and metrics. Everything is computed in float32 (float64 for float64 inputs, which the exactness
tests use), whatever the input dtype."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from megatron_dgpo.loss.aggregate import Number, aggregate
from megatron_dgpo.loss.config import PolicyLossConfig
from megatron_dgpo.loss.diagnostics import token_sums
from megatron_dgpo.loss.methods import LOG_RATIO_CLAMP
from megatron_dgpo.loss.registry import TokenContext, get_loss


def policy_loss(config: PolicyLossConfig, logp: torch.Tensor, old_logp: torch.Tensor,
                advantages: torch.Tensor, mask: torch.Tensor,
                normalizer: Optional[Number] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Aggregated policy loss and its metrics.

    logp, old_logp, mask: [batch, seq]; advantages: [batch] or [batch, seq]; mask marks response
    tokens. normalizer: the global valid-token count (token-mean) or sequence count (seq-* modes)
    when the batch is split across micro-batches or ranks. Metrics are scalar tensors (no sync).
    """
    adv = _check_inputs(logp, old_logp, advantages, mask, normalizer)
    mask = mask.bool()
    if config.check_finite:
        _check_finite(mask, logp=logp, old_logp=old_logp, advantages=adv)
    # Padding may hold anything (-inf log-probs, NaN advantages): zero it before any arithmetic
    # so that no NaN can reach the gradient through 0 * nan.
    dt = torch.float64 if logp.dtype == torch.float64 else torch.float32
    lp = torch.where(mask, logp.to(dt), 0.0)
    old = torch.where(mask, old_logp.detach().to(dt), 0.0)
    adv = torch.where(mask, adv.detach().to(dt), 0.0)
    log_ratio = lp - old
    clamped = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(clamped)
    ctx = TokenContext(
        logp=lp, log_ratio=log_ratio, clamped_log_ratio=clamped, ratio=ratio, adv=adv, mask=mask,
        ln=(ratio < config.lower) & (adv < 0) & mask,
        hp=(ratio > config.upper) & (adv > 0) & mask,
    )
    terms = get_loss(config.name)(config, ctx)
    loss_tok = torch.where(mask, terms.loss, 0.0)
    loss = aggregate(loss_tok, mask, config.aggregation, normalizer, config.norm_length)
    ln = terms.ln if terms.ln is not None else ctx.ln
    hp = terms.hp if terms.hp is not None else ctx.hp
    metrics = _metrics(loss, mask, ln, hp, terms.dual, terms.w_logp, clamped)
    # Summable W_p histograms / gradient-mass sums of LN and HP tokens (loss/diagnostics.py).
    metrics.update(token_sums(lp, old, adv, terms.w_logp, mask, ln, hp))
    return loss, metrics


def _metrics(loss, mask, ln, hp, dual, w, clamped_lr) -> Dict[str, torch.Tensor]:
    n = mask.sum().to(loss.dtype)
    n_ln, n_hp = ln.sum().to(loss.dtype), hp.sum().to(loss.dtype)
    w = w.detach()
    return {
        "loss": loss.detach(),
        "valid_tokens": n,
        "ln_tokens": n_ln,
        "hp_tokens": n_hp,
        "ln_frac": n_ln / n.clamp(min=1.0),
        "hp_frac": n_hp / n.clamp(min=1.0),
        "dual_clip_frac": dual.sum().to(loss.dtype) / n.clamp(min=1.0),
        "w_ln_mean": (w * ln).sum() / n_ln.clamp(min=1.0),
        "w_hp_mean": (w * hp).sum() / n_hp.clamp(min=1.0),
        "approx_kl": (-clamped_lr.detach() * mask).sum() / n.clamp(min=1.0),
    }


def _check_inputs(logp, old_logp, advantages, mask, normalizer) -> torch.Tensor:
    if not torch.is_tensor(logp) or logp.dim() != 2:
        raise ValueError(f"policy_loss: logp must be a [batch, seq] tensor, got shape {tuple(getattr(logp, 'shape', ()))}")
    if not logp.is_floating_point():
        raise ValueError(f"policy_loss: logp must be floating point, got {logp.dtype}")
    for name, t in (("old_logp", old_logp), ("mask", mask)):
        if tuple(t.shape) != tuple(logp.shape):
            raise ValueError(f"policy_loss: {name} has shape {tuple(t.shape)}, expected {tuple(logp.shape)} like logp")
    if advantages.dim() == 1 and advantages.shape[0] == logp.shape[0]:
        advantages = advantages.unsqueeze(-1).expand_as(logp)
    elif tuple(advantages.shape) != tuple(logp.shape):
        raise ValueError(
            f"policy_loss: advantages has shape {tuple(advantages.shape)}, expected [{logp.shape[0]}] or {tuple(logp.shape)}")
    if normalizer is not None and float(normalizer) < 0:
        raise ValueError(f"policy_loss: normalizer must be >= 0, got {float(normalizer)}")
    return advantages


def _check_finite(mask: torch.Tensor, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        bad = (~torch.isfinite(t.detach())) & mask
        if bool(bad.any()):
            idx = bad.nonzero()[0].tolist()
            raise ValueError(f"policy_loss: {name} is not finite at {int(bad.sum())} valid token(s), first at [batch, seq] = {idx}")
