"""megatron_dgpo: DGPO and RLVR baselines on Megatron-Core."""

__version__ = "0.1.0"
