"""Rollout engines: an embedded `transformers` engine and SGLang clients (imported lazily)."""
from .base import RolloutEngine, RolloutSample, SamplingParams
from .hf_engine import HFRolloutEngine, filter_logits

__all__ = ["RolloutEngine", "RolloutSample", "SamplingParams", "HFRolloutEngine", "filter_logits"]
