"""Numerical ops on vocab-parallel logits."""

from megatron_dgpo.ops.lm_head import lm_head_tile, fused_lm_head_logprobs
from megatron_dgpo.ops.logprobs import default_chunk_size, vocab_parallel_logprobs

__all__ = ["default_chunk_size", "vocab_parallel_logprobs", "lm_head_tile", "fused_lm_head_logprobs"]
