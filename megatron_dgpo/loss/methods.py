"""The per-token surrogates of DGPO and its baselines (dgpo-math.md, tables 1 and 2).

Each function returns the per-token loss `-A * s` and, detached, the gradient weight W_logp the
surrogate was built to have. Surrogates are written in log space with stop-gradients, e.g.
`exp(lr + n * (sg(lr) - log L))` for DGPO's `r * sg(r)^n / L^n`, so no branch ever evaluates a
power of an overflowing ratio; branches are computed on inputs that are safe where unselected.
"""
from __future__ import annotations

import math

import torch

from megatron_dgpo.loss.registry import TokenContext, TokenTerms, register_loss

sg = torch.Tensor.detach
LOG_RATIO_CLAMP = 20.0


def _unit(lr: torch.Tensor) -> torch.Tensor:
    """Value 1, gradient 1 w.r.t. logp at any log-ratio: the `r / sg(r)` factor of soft clipping."""
    return torch.exp(lr - sg(lr))


def _clamp_passes(ctx: TokenContext) -> torch.Tensor:
    """Where the reference's clamped ratio still carries gradient (|log r| <= 20)."""
    return ctx.log_ratio.abs() <= LOG_RATIO_CLAMP


def _dual_set(cfg, ctx: TokenContext) -> torch.Tensor:
    if cfg.dual_clip_c is None:
        return torch.zeros_like(ctx.mask)
    return (ctx.adv < 0) & (ctx.ratio > cfg.dual_clip_c) & ctx.mask


def _apply_dual(cfg, ctx, loss, w, dual):
    """PPO dual clip: for A < 0 and r > c the loss is the constant -A * c."""
    if cfg.dual_clip_c is None:
        return loss, w
    return torch.where(dual, -ctx.adv * cfg.dual_clip_c, loss), torch.where(dual, 0.0, w)


def _ratio_weight(ctx: TokenContext) -> torch.Tensor:
    return torch.where(_clamp_passes(ctx), sg(ctx.ratio), 0.0)


@register_loss("dgpo")
def dgpo(cfg, ctx: TokenContext) -> TokenTerms:
    n, m = cfg.dgpo_n, cfg.dgpo_m
    log_l, log_u = math.log(cfg.lower), math.log(cfg.upper)
    # LN: the unclamped log-ratio is below log L < 0, so its powers cannot overflow (the
    # reference also uses it unclamped); elsewhere 0 is substituted so exp stays finite.
    lr_ln = torch.where(ctx.ln, ctx.log_ratio, 0.0)
    s_ln = torch.exp(lr_ln + n * (sg(lr_ln) - log_l))  # value and W_logp: r^(n+1) / L^n
    # HP: on the clamped log-ratio (<= 20), like every ratio of the reference outside LN.
    lr_hp = torch.where(ctx.hp, ctx.clamped_log_ratio, 0.0)
    s_hp = torch.exp(lr_hp - sg(lr_hp) / m + log_u / m)  # value and W_logp: U^(1/m) r^(1-1/m)
    s = torch.where(ctx.ln, s_ln, torch.where(ctx.hp, s_hp, ctx.ratio))
    # Beyond the clamp the HP branch carries no gradient, so its weight is 0 there.
    w_hp = torch.where(_clamp_passes(ctx), sg(s_hp), 0.0)
    w = torch.where(ctx.ln, sg(s_ln), torch.where(ctx.hp, w_hp, _ratio_weight(ctx)))
    dual = _dual_set(cfg, ctx)
    loss, w = _apply_dual(cfg, ctx, -ctx.adv * s, w, dual)
    return TokenTerms(loss=loss, w_logp=w, dual=dual)


@register_loss("grpo")
def grpo(cfg, ctx: TokenContext) -> TokenTerms:
    # Hard clip: min(r A, clip(r) A) is the clipped constant exactly on LN ∪ HP.
    hard = ctx.ln | ctx.hp
    clipped = sg(ctx.ratio.clamp(cfg.lower, cfg.upper))
    loss = torch.where(hard, -ctx.adv * clipped, -ctx.adv * ctx.ratio)
    w = torch.where(hard, 0.0, _ratio_weight(ctx))
    dual = _dual_set(cfg, ctx)
    loss, w = _apply_dual(cfg, ctx, loss, w, dual)
    return TokenTerms(loss=loss, w_logp=w, dual=dual)


@register_loss("cispo")
def cispo(cfg, ctx: TokenContext) -> TokenTerms:
    # eps_low >= 1 is the one-sided variant: no lower bound.
    low = cfg.lower if cfg.lower > 0 else None
    w = sg(ctx.ratio).clamp(min=low, max=cfg.upper)
    loss = -ctx.adv * w * ctx.logp
    return TokenTerms(loss=loss, w_logp=w, dual=torch.zeros_like(ctx.mask))


def _soft_clip(cfg, ctx: TokenContext, w_ln: float, w_hp: float) -> TokenTerms:
    """GPPO family: PPO's clipped branches keep a constant gradient weight (w_ln on LN, w_hp on HP)."""
    unit = _unit(ctx.log_ratio)
    s = torch.where(ctx.ln, w_ln * unit, torch.where(ctx.hp, w_hp * unit, ctx.ratio))
    w = torch.where(ctx.ln, w_ln, torch.where(ctx.hp, w_hp, _ratio_weight(ctx)))
    dual = _dual_set(cfg, ctx)
    loss, w = _apply_dual(cfg, ctx, -ctx.adv * s, w, dual)
    return TokenTerms(loss=loss, w_logp=w, dual=dual)


@register_loss("gppo")
def gppo(cfg, ctx: TokenContext) -> TokenTerms:
    return _soft_clip(cfg, ctx, cfg.lower, cfg.upper)


@register_loss("ce_gppo")
def ce_gppo(cfg, ctx: TokenContext) -> TokenTerms:
    return _soft_clip(cfg, ctx, cfg.ce_beta1 * cfg.lower, cfg.ce_beta2 * cfg.upper)


@register_loss("aspo")
def aspo(cfg, ctx: TokenContext) -> TokenTerms:
    c, L, U = cfg.dual_clip_c, cfg.lower, cfg.upper
    r, pos, neg = ctx.ratio, ctx.adv > 0, ctx.adv < 0
    unit = _unit(ctx.log_ratio)
    # A > 0: flipped ratio. Value 1/r with W_logp 1/r on [1/c, U] (r * sg(1/r)^2), a hard clip
    # (constant 1/U) above U, and sg(c) * logp (value c) below 1/c.
    flipped = r * sg(1.0 / r) ** 2
    s_pos = torch.where(r > U, torch.full_like(r, 1.0 / U), torch.where(r < 1.0 / c, c * unit, flipped))
    w_pos = torch.where(r > U, 0.0, torch.where(r < 1.0 / c, c, sg(1.0 / r)))
    # A < 0: hard clip below L (constant L), plain ratio on [L, c], sg(c) * logp (value c) above c.
    s_neg = torch.where(r < L, torch.full_like(r, L), torch.where(r > c, c * unit, r))
    w_neg = torch.where(r < L, 0.0, torch.where(r > c, c, _ratio_weight(ctx)))
    s = torch.where(pos, s_pos, torch.where(neg, s_neg, r))
    w = torch.where(pos, w_pos, torch.where(neg, w_neg, _ratio_weight(ctx)))
    return TokenTerms(loss=-ctx.adv * s, w_logp=w, dual=torch.zeros_like(ctx.mask))


@register_loss("gspo")
def gspo(cfg, ctx: TokenContext) -> TokenTerms:
    # Sequence ratio s_i = exp(mean_t log r); the token-level surrogate sg(s_i) * r_t / sg(r_t)
    # has value s_i and W_logp s_i, and PPO's clip is applied to s_i.
    maskf = ctx.mask.to(ctx.log_ratio.dtype)
    seq_lr = (ctx.log_ratio * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0)
    seq_ratio = torch.exp(sg(seq_lr).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).unsqueeze(-1)
    s = seq_ratio * _unit(ctx.log_ratio)
    ln = (seq_ratio < cfg.lower) & (ctx.adv < 0) & ctx.mask
    hp = (seq_ratio > cfg.upper) & (ctx.adv > 0) & ctx.mask
    hard = ln | hp
    clipped = seq_ratio.clamp(cfg.lower, cfg.upper).expand_as(s)
    loss = torch.where(hard, -ctx.adv * clipped, -ctx.adv * s)
    w = torch.where(hard, 0.0, seq_ratio.expand_as(s))
    return TokenTerms(loss=loss, w_logp=w, dual=torch.zeros_like(ctx.mask), ln=ln, hp=hp)
