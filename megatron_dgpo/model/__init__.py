from megatron_dgpo.model.config import ModelConfig

__all__ = ["ModelConfig"]
