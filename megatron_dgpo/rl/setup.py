"""Tokenizer and prompt data of a run (the first stage of the RL data flow)."""
from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from megatron_dgpo.data import (PromptSampler, arithmetic_datasets, build_char_tokenizer,
                                load_prompt_dataset, load_tokenizer)


def load_tokenizer_for(cfg, out_dir: Path):
    if cfg.data.tokenizer:
        tok = load_tokenizer(cfg.data.tokenizer)
    else:
        # The arithmetic task's character tokenizer is deterministic: every rank builds its own,
        # rank 0 saves it next to the run so the outputs are self-contained.
        save = out_dir / "tokenizer" if (not dist.is_initialized() or dist.get_rank() == 0) else None
        if save is not None:
            save.mkdir(parents=True, exist_ok=True)
        tok = build_char_tokenizer(save_dir=save)
    if len(tok) > cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {len(tok)} tokens")
    return tok


def load_data(cfg, tokenizer, log=print):
    d = cfg.data
    if d.task == "arithmetic":
        train, held_out = arithmetic_datasets(d.arithmetic, tokenizer)
    else:
        train = load_prompt_dataset(d.train, tokenizer)
        held_out = load_prompt_dataset(d.eval, tokenizer) if d.eval is not None else train
    for name, ds in (("train", train), ("held-out", held_out)):
        if ds.stats:
            log(f"{name} prompts: " + ", ".join(f"{k} {v}" for k, v in ds.stats.items()))
    if len(train) == 0:
        raise ValueError("no training prompts left after filtering (see the counts above)")
    sampler = PromptSampler(train, batch_size=cfg.algo.prompts_per_step, seed=cfg.seed + 7919 * cfg.algo.seed)
    return train, held_out, sampler
