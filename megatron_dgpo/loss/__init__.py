"""Per-token policy losses of DGPO and its baselines, as pure functions in a registry.

    cfg = PolicyLossConfig(name="dgpo")          # or grpo, cispo, gppo, ce_gppo, aspo, gspo
    loss, metrics = policy_loss(cfg, logp, old_logp, advantages, mask, normalizer=None)
"""
from megatron_dgpo.loss import methods as _methods  # noqa: F401  (registers the built-in losses)
from megatron_dgpo.loss.aggregate import aggregate
from megatron_dgpo.loss.config import AGGREGATIONS, PolicyLossConfig
from megatron_dgpo.loss.core import policy_loss
from megatron_dgpo.loss.registry import TokenContext, TokenTerms, get_loss, register_loss, registered_losses

__all__ = [
    "AGGREGATIONS", "PolicyLossConfig", "TokenContext", "TokenTerms", "aggregate", "get_loss",
    "policy_loss", "register_loss", "registered_losses",
]
