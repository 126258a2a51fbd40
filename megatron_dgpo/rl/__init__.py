"""The stages of one RL step, each a module; `megatron_dgpo.trainer` strings them together:

prompts (data) -> rollout_stage.collect (rollout engines + reward) -> advantages (advantage)
-> policy.old_logprobs -> policy.update (DGPO loss on vocab-parallel logits, optimizer)
-> policy.sync_weights (weight_sync stream -> engine)
"""
