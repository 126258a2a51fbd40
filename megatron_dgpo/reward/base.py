"""The reward interface and the exact-match reward of the synthetic task."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable


@runtime_checkable
class RewardFn(Protocol):
    def score(self, responses: list[str], ground_truths: list[str]) -> tuple[list[float], dict]:
        """One reward per response (same order) and a flat dict of scalar stats for logging."""
        ...


@dataclass
class RewardConfig:
    kind: Literal["exact", "math"] = "exact"
    num_workers: int = 2  # math: checker processes
    timeout_s: float = 5.0  # math: hard wall-clock limit per answer; the worker is killed past it
    start_method: Literal["spawn", "forkserver"] = "spawn"

    def __post_init__(self):
        if self.num_workers <= 0 or self.timeout_s <= 0:
            raise ValueError("RewardConfig: num_workers and timeout_s must be positive")


class ExactMatchReward:
    """1.0 when the response, stripped of surrounding whitespace, equals the ground truth.

    Meant for the synthetic arithmetic task, where the policy must emit exactly the digits and
    then eos; the response text should be decoded with special tokens skipped.
    """

    def score(self, responses: list[str], ground_truths: list[str]) -> tuple[list[float], dict]:
        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
        rewards = [1.0 if r.strip() == g.strip() else 0.0 for r, g in zip(responses, ground_truths)]
        return rewards, {"reward/mean": sum(rewards) / max(len(rewards), 1)}

    def close(self) -> None:
        pass


def make_reward_fn(cfg: RewardConfig):
    if cfg.kind == "exact":
        return ExactMatchReward()
    from .math_pool import MathVerifyReward

    return MathVerifyReward(num_workers=cfg.num_workers, timeout_s=cfg.timeout_s,
                            start_method=cfg.start_method)
