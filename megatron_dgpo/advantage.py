"""Group-relative advantages (GRPO, Dr.GRPO) and truncated importance-sampling weights.

Rewards arrive flat, prompt-major: the G responses of prompt p sit at [p*G, (p+1)*G).
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch


def group_advantages(
    rewards: torch.Tensor | Sequence[float],
    group_size: int,
    *,
    scale: Literal["std", "none"] = "std",
    eps: float = 1e-6,
    unbiased_std: bool = True,
    filter_zero_variance: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Return (advantages [N], keep_mask [N] bool, stats).

    scale="std":  A = (R - mean_G) / (std_G + eps)   (GRPO; std with Bessel's correction by
                  default, as torch.std and most GRPO implementations use)
    scale="none": A = R - mean_G                     (Dr.GRPO: no per-group std normalisation)

    A group whose rewards are all equal carries no learning signal (A = 0 for every member).
    With filter_zero_variance those samples get keep_mask False, so the trainer can drop them
    from the batch and the loss normaliser, rather than only zeroing them.
    """
    r = torch.as_tensor(rewards, dtype=torch.float64).flatten()
    n = r.numel()
    if group_size <= 0 or n % group_size:
        raise ValueError(f"{n} rewards do not split into groups of {group_size}")
    if scale == "std" and unbiased_std and group_size < 2:
        raise ValueError("scale='std' with unbiased_std needs group_size >= 2")
    if scale not in ("std", "none"):
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    g = r.view(-1, group_size)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale == "std":
        adv = centred / (g.std(dim=1, unbiased=unbiased_std, keepdim=True) + eps)
    else:
        adv = centred
    # exact comparison: rewards are typically 0/1, and any real difference is signal
    zero_var = (g == g[:, :1]).all(dim=1)
    keep = ~zero_var if filter_zero_variance else torch.ones_like(zero_var)
    keep = keep.repeat_interleave(group_size)
    num_groups = g.shape[0]
    stats = {
        "adv/num_groups": float(num_groups),
        "adv/zero_variance_groups": float(zero_var.sum()),
        "adv/zero_variance_frac": float(zero_var.sum()) / max(num_groups, 1),
        "adv/kept_samples": float(keep.sum()),
        "adv/reward_mean": float(r.mean()) if n else 0.0,
    }
    return adv.flatten().to(dtype), keep, stats


def tis_weights(train_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float | None = 2.0) -> torch.Tensor:
    """Truncated importance-sampling weights min(exp(train - rollout), cap), detached.

    Corrects for the rollout engine sampling from a slightly different distribution than the
    trainer's (kernels, precision). Both log-probs must be of the same tokens under the same
    sampling temperature. Computed in float32 at least, since exp of bf16 differences is coarse.
    """
    if train_logp.shape != rollout_logp.shape:
        raise ValueError(f"shape mismatch {tuple(train_logp.shape)} vs {tuple(rollout_logp.shape)}")
    dt = torch.promote_types(train_logp.dtype, torch.float32)
    w = torch.exp(train_logp.detach().to(dt) - rollout_logp.detach().to(dt))
    if cap is not None:
        if cap <= 0:
            raise ValueError("TIS cap must be positive")
        w = w.clamp(max=cap)
    return w
