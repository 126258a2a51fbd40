"""The trained policy on Megatron-Core: model chunks of this rank, the optimizer, old log-probs,
the policy update over mini-batches, and the weight stream to the rollout engine."""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch

from megatron_dgpo.config import TrainConfig
from megatron_dgpo.model.builder import build_model_chunks
from megatron_dgpo.rl.guard import require_finite_weights
from megatron_dgpo.train import RolloutBatch, build_optimizer, forward_logprobs, train_step
from megatron_dgpo.train.step import dp_totals_of, reduce_deferred

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _fp8(cfg: TrainConfig):
    if not cfg.fp8.enabled:
        return None
    from megatron_dgpo.model.fp8 import FP8Config

    return FP8Config(enabled=True, format=cfg.fp8.format, recipe=cfg.fp8.recipe, fp8_param=cfg.fp8.fp8_param)


class Policy:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        par = cfg.parallel
        ddp = dict(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                   use_distributed_optimizer=par.use_distributed_optimizer)
        self.chunks = build_model_chunks(
            cfg.model, transformer_impl=par.transformer_impl, fp8=_fp8(cfg),
            params_dtype=DTYPES[par.params_dtype], sequence_parallel=par.sequence_parallel,
            wrap_ddp=True, ddp_config=ddp, attention_backend=par.attention_backend,
            num_layers_in_first_pipeline_stage=par.num_layers_in_first_pipeline_stage,
            num_layers_in_last_pipeline_stage=par.num_layers_in_last_pipeline_stage)
        o = cfg.optim
        self.optimizer = build_optimizer(
            self.chunks, lr=o.lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad,
            use_distributed_optimizer=par.use_distributed_optimizer)
        self._streamer = None

    # ---- log-probs and updates ------------------------------------------------------------------
    def logprobs(self, batch: RolloutBatch, temperature: float) -> torch.Tensor:
        """[B, S] token-aligned log-probs of the whole batch, identical on every rank: each
        data-parallel rank computes its share, then they are gathered."""
        from megatron.core import parallel_state as ps

        dp = ps.get_data_parallel_world_size()
        rows = self._dp_rows(batch)
        local = batch.select(rows[ps.get_data_parallel_rank()]) if dp > 1 else batch
        logp, _ = forward_logprobs(self.chunks, local, micro_batch_size=self.micro_batch(local),
                                   temperature=temperature, **self._layout(), **self._lm_head())
        if dp > 1:
            parts = [torch.empty_like(logp) for _ in range(dp)]
            torch.distributed.all_gather(parts, logp.contiguous(), group=ps.get_data_parallel_group())
            full = logp.new_empty((batch.batch_size,) + tuple(logp.shape[1:]))
            full[torch.cat(rows).to(full.device)] = torch.cat(parts, 0)  # back to the batch's order
            logp = full
        return logp.cpu()

    def _layout(self) -> dict:
        a = self.cfg.algo
        pack = "prefix" if a.share_prompt_prefix else a.pack_sequences
        return dict(max_tokens_per_micro_batch=a.max_tokens_per_micro_batch, pack_sequences=pack)

    def _dp_rows(self, batch: RolloutBatch) -> List[torch.Tensor]:
        """Each DP rank's rows: contiguous shares, or with token-budget micro-batches shares of
        equal count and near-equal tokens (train.microbatch.dp_partition), or with shared prompt
        prefixes equal counts that keep a prompt's rows together (prompt_group_partition)."""
        from megatron.core import parallel_state as ps

        from megatron_dgpo.train.microbatch import dp_partition, prompt_group_partition

        dp = ps.get_data_parallel_world_size()
        if batch.batch_size % dp:
            raise ValueError(f"batch size {batch.batch_size} is not divisible by the data-parallel size {dp}")
        if self.cfg.algo.share_prompt_prefix:
            return [torch.tensor(r, dtype=torch.long) for r in prompt_group_partition(batch, dp)]
        if self.cfg.algo.max_tokens_per_micro_batch > 0:
            return [torch.tensor(r, dtype=torch.long) for r in dp_partition(batch.lengths.tolist(), dp)]
        return list(torch.arange(batch.batch_size).chunk(dp))

    def update(self, batch: RolloutBatch, *, temperature: float, lr: Optional[float] = None,
               loss_cfg=None) -> List[Dict[str, float]]:
        """One epoch of optimizer steps over `batch` split into `algo.mini_batches` mini-batches
        (each split again over data-parallel ranks and micro-batches)."""
        from megatron.core import parallel_state as ps

        algo = self.cfg.algo
        n_mini = max(1, min(algo.mini_batches, batch.batch_size))
        dp = ps.get_data_parallel_world_size()
        out = []
        for rows in torch.tensor_split(torch.arange(batch.batch_size), n_mini):
            mini = batch.select(rows)
            if not bool(mini.loss_mask.any()):
                continue  # only padding rows: an optimizer step would still move the weights
            if mini.batch_size % dp:
                raise ValueError(f"mini-batch of {mini.batch_size} sequences does not split over "
                                 f"data-parallel size {dp}: make prompts_per_step * group_size / mini_batches a multiple")
            # Every rank holds the whole batch, so the normaliser's counts over all DP shares need
            # no collective; the loss metrics of all mini-batches are reduced at the end, at once.
            shares = [mini.select(r) for r in self._dp_rows(mini)]
            local = shares[ps.get_data_parallel_rank()]
            metrics = train_step(self.chunks, self.optimizer, local, loss_cfg or self.cfg.loss,
                                 micro_batch_size=self.micro_batch(local), temperature=temperature, lr=lr,
                                 dp_totals=dp_totals_of(self.chunks, shares, **self._layout()), defer_stats=True,
                                 **self._layout(), **self._lm_head())
            out.append(metrics)
            # Decided per optimizer step: a step with finite gradients may still overflow the
            # weights (absurd lr); the next mini-batch, the sync and the save must not see them.
            require_finite_weights(self.chunks, f"after optimizer step {len(out)} (lr={metrics['lr']:g}, "
                                                f"grad_norm={metrics['grad_norm']:g})",
                                   group=ps.get_model_parallel_group())
        return reduce_deferred(out)

    def _lm_head(self) -> dict:
        return dict(fused_lm_head=self.cfg.algo.fused_lm_head,
                    lm_head_chunk_tokens=self.cfg.algo.lm_head_chunk_tokens)

    def micro_batch(self, batch: RolloutBatch) -> int:
        """The largest divisor of the batch size not above algo.micro_batch_size."""
        m = max(1, min(self.cfg.algo.micro_batch_size, batch.batch_size))
        while batch.batch_size % m:
            m -= 1
        return m

    # ---- weights -------------------------------------------------------------------------------
    def stream_weights(self, receivers=None, dtype=None, version: int = 0, local: bool = False):
        """(hf_name, tensor) pairs of the current weights, on the receiving ranks (collective).
        `version` enters every bucket's checksum (a stale bucket is never accepted). `local`:
        every rank streams its own replica to itself, no collective (TP = PP = 1 only)."""
        from megatron_dgpo.weight_sync import WeightStreamer

        if self._streamer is None:
            bucket = self.cfg.rollout.weight_sync_bucket_mb << 20
            self._streamer = WeightStreamer(self.chunks, self.cfg.model, receivers=receivers,
                                            bucket_bytes=bucket, dtype=dtype, local=local)
        return self._streamer.iter_named_tensors(version=version)

    def load_hf(self, path: str) -> None:
        from megatron_dgpo.weight_sync import load_hf_into_megatron

        load_hf_into_megatron(self.chunks, path, self.cfg.model)
        # Mixed-precision and distributed optimizers keep fp32 master copies made when they were
        # built: refresh them, or the first step would write the old weights back.
        self.optimizer.reload_model_params()

    def save_hf(self, path: str, source_dir: Optional[str] = None) -> None:
        from megatron_dgpo.weight_sync import save_megatron_as_hf

        save_megatron_as_hf(self.chunks, self.cfg.model, path, source_dir=source_dir)

    # ---- lifetime ------------------------------------------------------------------------------
    def reset_optimizer(self) -> None:
        """Fresh optimizer state in place (as a newly built Policy would have it): see
        train.lifetime.reset_optimizer_state. Used after the warm start instead of a second Policy,
        which would hold a second model, gradients and Adam state while the first is alive."""
        from megatron_dgpo.train.lifetime import reset_optimizer_state

        reset_optimizer_state(self.optimizer)

    def close(self) -> None:
        """Retire the policy: break the reference cycles that Megatron's DDP and the schedule hooks
        create (train.lifetime.release_chunks), so that model, gradient buffers and optimizer state
        are freed by reference counting as soon as the last reference goes, not at a later cyclic
        gc. The policy is unusable afterwards."""
        from megatron_dgpo.train.lifetime import release_chunks

        if self.chunks is None:
            return
        release_chunks(self.chunks)
        self.chunks, self.optimizer, self._streamer = None, None, None


def lr_at(step: int, total: int, base: float, warmup: int = 0) -> float:
    """Constant after a linear warm-up (the reference runs use a constant LR)."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    return base if not math.isnan(base) else 0.0
