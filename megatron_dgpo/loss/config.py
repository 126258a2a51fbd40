"""Typed configuration of the policy losses, with the paper's per-method defaults."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

# `dual_clip_c="default"` resolves per method: GRPO/DAPO 3 (PPO dual clip), GPPO 10, CE-GPPO 3,
# ASPO 3 (its c), and off for DGPO (the reference code applies none), CISPO and GSPO.
_DEFAULT_C = {"grpo": 3.0, "gppo": 10.0, "ce_gppo": 3.0, "aspo": 3.0}
_NO_DUAL_CLIP = ("cispo", "gspo")


@dataclass
class PolicyLossConfig:
    name: str = "dgpo"
    eps_low: float = 0.2
    eps_high: float = 0.2
    dgpo_n: float = 1.0
    dgpo_m: float = 2.0
    dual_clip_c: Optional[Union[float, str]] = "default"
    ce_beta1: float = 0.5
    ce_beta2: float = 1.0
    aggregation: str = "token-mean"
    # Divisor of seq-mean-token-sum-norm (Dr.GRPO's constant length); None = the padded sequence
    # length of the batch, which is only split-invariant when every micro-batch has the same length.
    norm_length: Optional[int] = None
    # Check that advantages/log-probs are finite on valid tokens (one host sync per call on GPU).
    check_finite: bool = True

    def __post_init__(self):
        from megatron_dgpo.loss.registry import registered_losses

        names = registered_losses()
        if self.name not in names:
            raise ValueError(f"PolicyLossConfig.name={self.name!r} is not a registered loss; known: {sorted(names)}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"PolicyLossConfig.aggregation={self.aggregation!r}; expected one of {AGGREGATIONS}")
        # CISPO's one-sided variant uses a large eps_low (no lower clip), so only it may reach 1.
        max_low = float("inf") if self.name == "cispo" else 1.0
        if not (0.0 <= self.eps_low < max_low):
            raise ValueError(f"PolicyLossConfig.eps_low={self.eps_low} must be in [0, {max_low}) for {self.name}")
        if not self.eps_high > 0.0:
            raise ValueError(f"PolicyLossConfig.eps_high={self.eps_high} must be > 0")
        if self.dgpo_n < 0:
            raise ValueError(f"PolicyLossConfig.dgpo_n={self.dgpo_n} must be >= 0")
        if self.dgpo_m <= 0:
            raise ValueError(f"PolicyLossConfig.dgpo_m={self.dgpo_m} must be > 0")
        if self.ce_beta1 <= 0 or self.ce_beta2 <= 0:
            raise ValueError("PolicyLossConfig.ce_beta1 and ce_beta2 must be > 0")
        if self.norm_length is not None and self.norm_length <= 0:
            raise ValueError(f"PolicyLossConfig.norm_length={self.norm_length} must be positive")
        if self.dual_clip_c == "default":
            self.dual_clip_c = _DEFAULT_C.get(self.name)
        elif isinstance(self.dual_clip_c, str):
            raise ValueError(f"PolicyLossConfig.dual_clip_c={self.dual_clip_c!r}: use a number, None or 'default'")
        if self.dual_clip_c is not None:
            self.dual_clip_c = float(self.dual_clip_c)
            if self.name in _NO_DUAL_CLIP:
                raise ValueError(f"PolicyLossConfig.dual_clip_c is not used by {self.name}; set it to None")
            if not self.dual_clip_c > self.upper:
                raise ValueError(f"PolicyLossConfig.dual_clip_c={self.dual_clip_c} must exceed 1 + eps_high = {self.upper}")
        elif self.name == "aspo":
            raise ValueError("PolicyLossConfig.dual_clip_c is ASPO's c and cannot be None")

    @property
    def lower(self) -> float:
        return 1.0 - self.eps_low

    @property
    def upper(self) -> float:
        return 1.0 + self.eps_high

    @classmethod
    def paper_defaults(cls, name: str, **overrides) -> "PolicyLossConfig":
        """The settings dgpo-math.md lists for each method (DAPO = GRPO with clip-higher 0.28)."""
        presets = {
            "dgpo": {},
            "grpo": {},
            "dapo": {"name": "grpo", "eps_high": 0.28},
            "cispo": {"eps_low": 0.2, "eps_high": 0.2},
            "gppo": {"eps_high": 0.28},
            "ce_gppo": {"ce_beta1": 0.5, "ce_beta2": 1.0},
            "aspo": {},
            "gspo": {"eps_low": 3e-4, "eps_high": 4e-4, "aggregation": "seq-mean-token-mean"},
        }
        if name not in presets:
            raise ValueError(f"no paper preset for {name!r}; known: {sorted(presets)}")
        kwargs = {"name": name, **presets[name], **overrides}
        return cls(**kwargs)
