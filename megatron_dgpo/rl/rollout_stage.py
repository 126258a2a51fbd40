"""Rollout + reward: G samples per prompt, spread over the ranks that hold an engine, gathered
everywhere, decoded and scored once (on rank 0) so every rank sees the same rewards.

With an engine on rank 0 only (SGLang), the other ranks wait for its rollout and rewards on a
gloo group whose timeout is `wait_timeout_s` (rollout.sglang.wait_timeout_s), not the default
group's 30 minutes: a long rollout of long responses must not kill the job. A sample the engine
aborted (finish reason "abort") gets reward 0 and is counted in `reward_stats["aborted"]`."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from datetime import timedelta
from functools import lru_cache
from typing import Optional, Sequence

import torch.distributed as dist

from megatron_dgpo.rollout import RolloutSample, SamplingParams


@dataclass
class Rollouts:
    samples: list[RolloutSample]  # prompt-major: prompt i's G samples are contiguous
    ground_truths: list[str]  # one per sample
    texts: list[str]  # decoded responses (special tokens skipped)
    rewards: list[float]
    reward_stats: dict
    timings: dict = field(default_factory=dict)  # rollout_s (generation + gather), reward_s

    @property
    def num_response_tokens(self) -> int:
        return sum(len(s.response_ids) for s in self.samples)

    @property
    def num_tokens(self) -> int:
        """Prompt + response tokens of every sample."""
        return sum(len(s.prompt_ids) + len(s.response_ids) for s in self.samples)


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@lru_cache(maxsize=None)
def _wait_group(timeout_s: float):
    """A gloo group of every rank with its own timeout (created collectively on first use)."""
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def _broadcast_from_0(box: list, wait_timeout_s: Optional[float]) -> None:
    group = None if wait_timeout_s is None else _wait_group(float(wait_timeout_s))
    dist.broadcast_object_list(box, src=0, group=group)


def generate(engine, prompt_ids: Sequence[list[int]], sampling: SamplingParams, *,
             distributed: bool, wait_timeout_s: Optional[float] = None) -> list[RolloutSample]:
    """`distributed=True`: every rank has an engine and takes a contiguous share of the prompts
    (the embedded engine on CPU). False: rank 0's engine generates everything (SGLang)."""
    rank, world = _world()
    if world == 1:
        return engine.generate(list(prompt_ids), sampling)
    if distributed:
        per = -(-len(prompt_ids) // world)
        lo = min(rank * per, len(prompt_ids))
        if sampling.seed is not None:  # independent random streams for the ranks' shares
            sampling = dataclasses.replace(sampling, seed=sampling.seed + lo * sampling.n)
        local = engine.generate(list(prompt_ids[lo:lo + per]), sampling) if lo < len(prompt_ids) else []
        for s in local:
            s.prompt_index += lo
        gathered = [None] * world
        dist.all_gather_object(gathered, local)
        return [s for part in gathered for s in part]
    box = [engine.generate(list(prompt_ids), sampling) if rank == 0 else None]
    _broadcast_from_0(box, wait_timeout_s)
    return box[0]


def score(reward_fn, tokenizer, samples: list[RolloutSample], ground_truths: list[str],
          wait_timeout_s: Optional[float] = None):
    """Decode and score on rank 0 (math checking runs in a process pool there), broadcast."""
    rank, world = _world()
    box: list[Optional[tuple]] = [None]
    if rank == 0:
        texts = tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
        rewards, stats = reward_fn.score(texts, ground_truths)
        aborted = [s.finish_reason == "abort" for s in samples]
        rewards = [0.0 if a else float(r) for r, a in zip(rewards, aborted)]
        box[0] = (texts, rewards, {**stats, "aborted": float(sum(aborted))})
    if world > 1:
        _broadcast_from_0(box, wait_timeout_s)
    return box[0]


def collect(engine, reward_fn, tokenizer, examples, sampling: SamplingParams, *, distributed: bool,
            wait_timeout_s: Optional[float] = None) -> Rollouts:
    t0 = time.perf_counter()
    samples = generate(engine, [e.prompt_ids for e in examples], sampling, distributed=distributed,
                       wait_timeout_s=wait_timeout_s)
    t1 = time.perf_counter()
    truths = [examples[s.prompt_index].ground_truth for s in samples]
    texts, rewards, stats = score(reward_fn, tokenizer, samples, truths, wait_timeout_s)
    return Rollouts(samples=samples, ground_truths=truths, texts=texts, rewards=rewards, reward_stats=stats,
                    timings={"rollout_s": t1 - t0, "reward_s": time.perf_counter() - t1})
