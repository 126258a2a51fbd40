"""Megatron model (any TP/PP layout) -> HF safetensors folder, written atomically by one rank."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_dgpo.model.config import ModelConfig
from megatron_dgpo.weight_sync.hf_io import write_hf_folder
from megatron_dgpo.weight_sync.stream import WeightStreamer, drain


def save_megatron_as_hf(model, model_cfg: ModelConfig, out_dir: str | os.PathLike, *,
                        source_dir: str | os.PathLike | None = None, dtype: torch.dtype | None = None,
                        writer_rank: int = 0, bucket_bytes: int = 256 << 20, max_shard_bytes: int = 2 << 30,
                        overwrite: bool = False) -> Path | None:
    """Collective: stream the model to `writer_rank`, which writes `out_dir` (temp dir + rename).

    `source_dir` (the HF folder the model came from) supplies config.json, tokenizer and other
    non-weight files; without it config.json is written from `model_cfg`. Returns the folder on
    the writer, None elsewhere.
    """
    streamer = WeightStreamer(model, model_cfg, receivers=[writer_rank], bucket_bytes=bucket_bytes, dtype=dtype)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    out = None
    if rank == writer_rank:
        out = write_hf_folder(out_dir, streamer.iter_named_tensors(), model_cfg=model_cfg, source_dir=source_dir,
                              max_shard_bytes=max_shard_bytes, overwrite=overwrite)
    else:
        drain(streamer.stream())
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return out
