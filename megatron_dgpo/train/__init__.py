"""Training on Megatron-Core: rollout batches, the policy-loss train step, the optimizer."""
from megatron_dgpo.train.batch import RolloutBatch, pad_sequences
from megatron_dgpo.train.optimizer import build_optimizer, get_lr, set_lr
from megatron_dgpo.train.step import forward_logprobs, train_step

__all__ = ["RolloutBatch", "pad_sequences", "build_optimizer", "get_lr", "set_lr",
           "forward_logprobs", "train_step"]
