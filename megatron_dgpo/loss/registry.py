"""Registry of per-token policy-loss functions: a new loss is one decorated function."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch


@dataclass
class TokenContext:
    """Inputs every per-token loss needs, already masked so that padding cannot produce NaN.

    log_ratio is logp - old_logp (unclamped, carries grad); ratio is the reference's clamped
    ratio exp(clamped_log_ratio), clamped_log_ratio = clamp(log_ratio, -20, 20) (carries grad inside the clamp range); ln/hp are the
    LN / HP sets decided on the clamped ratio.
    """

    logp: torch.Tensor
    log_ratio: torch.Tensor
    clamped_log_ratio: torch.Tensor
    ratio: torch.Tensor
    adv: torch.Tensor
    mask: torch.Tensor
    ln: torch.Tensor
    hp: torch.Tensor


@dataclass
class TokenTerms:
    """Per-token output of a loss: the loss term (-A * surrogate) and, detached, its gradient weight
    W_logp (so that d loss / d logp = -A * w_logp) and the dual-clip set."""

    loss: torch.Tensor
    w_logp: torch.Tensor
    dual: torch.Tensor
    # Sequence-level methods (GSPO) decide the LN / HP sets on their own ratio.
    ln: Optional[torch.Tensor] = None
    hp: Optional[torch.Tensor] = None


LossFn = Callable[["PolicyLossConfig", TokenContext], TokenTerms]  # noqa: F821
_REGISTRY: Dict[str, LossFn] = {}


def register_loss(name: str):
    def deco(fn: LossFn) -> LossFn:
        if name in _REGISTRY:
            raise ValueError(f"policy loss {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def get_loss(name: str) -> LossFn:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown policy loss {name!r}; known: {sorted(_REGISTRY)}") from None


def registered_losses() -> tuple:
    return tuple(_REGISTRY)
