"""Supervised warm start: a few steps of cross-entropy on the task's reference answers, so that
RL starts from a policy with a non-zero success rate. The result is cached on disk as a HF folder
keyed by everything that determines it, so a second run skips it.

Cross-entropy is CISPO evaluated on-policy (old log-probs = current, so r = 1) with A = 1: its
per-token value -sg(clip(r)) * A * logp is then exactly the NLL, and its gradient the NLL's.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_dgpo.configio import config_to_dict
from megatron_dgpo.train import pad_sequences, train_step


def cache_key(cfg) -> str:
    blob = json.dumps({
        "model": config_to_dict(cfg.model), "data": config_to_dict(cfg.data),
        "sft": {k: getattr(cfg.warmstart, k) for k in ("sft_steps", "sft_lr", "sft_batch_size")},
        "seed": cfg.seed, "init": cfg.warmstart.init_hf_path,
    }, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sft_batches(examples, tokenizer, batch_size: int, steps: int, seed: int):
    eos = tokenizer.eos_token_id
    rng = random.Random(seed)
    for _ in range(steps):
        rows = [examples[rng.randrange(len(examples))] for _ in range(batch_size)]
        answers = [tokenizer.encode(e.ground_truth, add_special_tokens=False) + [eos] for e in rows]
        yield pad_sequences([e.prompt_ids for e in rows], answers, torch.ones(len(rows)),
                            pad_token_id=tokenizer.pad_token_id or 0)


def run_sft(policy, examples, tokenizer, cfg, log=print) -> list[float]:
    """Train `policy` in place; returns the token-mean NLL of the answer tokens per step."""
    from megatron_dgpo.loss import PolicyLossConfig

    ws = cfg.warmstart
    nll_loss = PolicyLossConfig(name="cispo")
    losses = []
    bar = tqdm(total=ws.sft_steps, desc="warm start", disable=dist.is_initialized() and dist.get_rank() != 0)
    for i, batch in enumerate(sft_batches(examples, tokenizer, ws.sft_batch_size, ws.sft_steps, cfg.seed)):
        local = batch.dp_shard()
        m = train_step(policy.chunks, policy.optimizer, local, nll_loss, micro_batch_size=policy.micro_batch(local),
                       lr=ws.sft_lr, compute_entropy=False)
        losses.append(m["loss"])
        bar.update(1)
        bar.set_postfix(nll=f"{m['loss']:.3f}")
    bar.close()
    log(f"warm start: answer-token NLL {losses[0]:.3f} -> {losses[-1]:.3f}")
    return losses


def cache_folder(cfg) -> Path:
    return Path(cfg.warmstart.cache_dir) / f"sft-{cache_key(cfg)}"


def is_cached(cfg) -> bool:
    return (cache_folder(cfg) / "config.json").exists()


def warm_start(policy, train_examples, tokenizer, cfg, log=print) -> tuple[str, bool]:
    """The HF folder of the warm start, and whether it was trained now: from the cache, or by
    training `policy` in place and caching the result."""
    folder = cache_folder(cfg)
    if is_cached(cfg):
        log(f"warm start: loading cached {folder}")
        return str(folder), False
    log(f"warm start: {cfg.warmstart.sft_steps} supervised steps (cached to {folder})")
    run_sft(policy, train_examples, tokenizer, cfg, log)
    policy.save_hf(str(folder))
    if dist.is_initialized():
        dist.barrier()
    return str(folder), True
