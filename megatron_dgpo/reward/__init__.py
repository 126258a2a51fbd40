"""Verifiable rewards: exact match (synthetic task) and math-verify in killable worker processes."""
from .base import ExactMatchReward, RewardConfig, RewardFn, make_reward_fn
from .math_pool import MathVerifyReward, check_answer

__all__ = ["RewardFn", "RewardConfig", "ExactMatchReward", "MathVerifyReward", "check_answer",
           "make_reward_fn"]
