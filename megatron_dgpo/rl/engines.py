"""Which rollout engine a run uses, how new weights reach it, and when it frees GPU memory."""
from __future__ import annotations

import torch
import torch.distributed as dist


def build_engine(cfg, tokenizer, rank: int):
    """(engine or None on ranks without one, distributed): the embedded engine lives on every
    rank (each generates a share of the prompts); SGLang is driven from rank 0."""
    ro = cfg.rollout
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if ro.engine == "embedded":
        from megatron_dgpo.rollout import HFRolloutEngine

        device = "cuda" if torch.cuda.is_available() else "cpu"
        engine = HFRolloutEngine.from_hf_config(cfg.model.to_hf_config(), eos_token_ids=eos, pad_token_id=pad,
                                                device=device, seed=cfg.seed + 1000 * rank,
                                                max_batch_size=ro.embedded_batch_size)
        return engine, True
    if rank != 0:
        return None, False
    from megatron_dgpo.rollout import sglang_engine  # imported lazily: sglang is optional

    return sglang_engine.from_train_config(cfg, tokenizer), False


class EngineMemory:
    """A colocated engine (in-process SGLang, or the embedded engine on a GPU) gives its GPU
    memory back while the trainer computes log-probs and updates, and takes it again around the
    weight sync: weights first (they are being overwritten), the KV cache after. Engines on other
    nodes (SGLang server mode) and CPU engines keep theirs."""

    def __init__(self, cfg, engine):
        ro = cfg.rollout
        sglang = ro.engine == "sglang" and ro.sglang.mode == "colocated"
        colocated = sglang or (ro.engine == "embedded" and torch.cuda.is_available())
        self.engine = engine if colocated else None
        # SGLang also frees its CUDA-graph pool (memory tag "cuda_graph", resumed with the KV cache)
        self.tags = {"weights", "kv_cache", "cuda_graph"} if sglang else {"weights", "kv_cache"}
        self.released: set[str] = set()

    def release(self) -> None:
        if self.engine is not None and not self.released:
            self.released = set(self.tags)
            self.engine.release_memory(sorted(self.released))

    def resume(self, tag: str) -> None:
        tags = [t for t in ([tag, "cuda_graph"] if tag == "kv_cache" else [tag]) if t in self.released]
        if tags:
            self.engine.resume_memory(tags)
            self.released.difference_update(tags)


def sync_weights(policy, engine, version: int, distributed: bool, memory: EngineMemory | None = None) -> None:
    """Stream the trainer's weights in HF layout to the engine(s); every rank takes part."""
    from megatron_dgpo.weight_sync import drain

    if memory is not None:
        memory.resume("weights")
    if distributed:
        # Every rank feeds its own engine; a rank holding a whole replica (TP = PP = 1: pure data
        # parallel) converts its own weights, the same on every replica, with no collective.
        from megatron.core import parallel_state as ps

        local = dist.is_initialized() and dist.get_world_size(ps.get_model_parallel_group()) == 1
        engine.update_weights(policy.stream_weights(receivers=None, version=version, local=local), version=version)
    else:
        rank = dist.get_rank() if dist.is_initialized() else 0
        stream = policy.stream_weights(receivers=[0], version=version)
        if rank == 0:
            engine.update_weights(stream, version=version)
        else:
            drain(stream)
    if memory is not None:
        memory.resume("kv_cache")
