#!/usr/bin/env python
"""Megatron distributed checkpoint -> HF safetensors folder (loadable by AutoModelForCausalLM).

    torchrun --nproc_per_node=N tools/convert_megatron_to_hf.py --ckpt ROOT_OR_STEP_DIR --out HF_DIR \
        [--tp T --pp P] [--dtype bfloat16] [--hf-files DIR] [--overwrite]

The checkpoint (a `megatron_dgpo.checkpoint` root or step directory, e.g. written by
convert_hf_to_megatron.py or by training) loads into the TP/PP layout given here, whatever
layout it was saved with; the weights are streamed to rank 0 in HF layout and written
atomically (temporary folder + rename). Non-weight files (config.json, tokenizer, ...) come
from --hf-files, else ROOT/hf_files, else config.json is generated from the model config
stored in the checkpoint.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def resolve_checkpoint(ckpt) -> Path:
    from megatron_dgpo.checkpoint import latest_checkpoint
    from megatron_dgpo.weight_sync import CheckpointError

    ckpt = Path(ckpt)
    if (ckpt / "dgpo_meta.json").is_file():
        return ckpt
    latest = latest_checkpoint(str(ckpt)) if ckpt.is_dir() else None
    if latest is None:
        raise CheckpointError(f"{ckpt}: not a megatron_dgpo checkpoint (no dgpo_meta.json, no 'latest')")
    return Path(latest)


def convert_megatron_to_hf(ckpt, out_dir, *, dtype=None, hf_files=None, max_shard_bytes: int = 2 << 30,
                           overwrite: bool = False, params_dtype=None):
    """Load checkpoint `ckpt` into the current (initialised) TP/PP layout and write `out_dir` (HF) from
    rank 0. Collective. Returns the folder on rank 0, None elsewhere."""
    from megatron_dgpo.checkpoint import load_checkpoint, read_meta
    from megatron_dgpo.model.config import ModelConfig
    from megatron_dgpo.weight_sync import CheckpointError, save_megatron_as_hf
    from megatron_dgpo.model.builder import build_model_chunks as build_chunks

    step_dir = resolve_checkpoint(ckpt)
    meta = read_meta(str(step_dir))
    if not meta.get("model_config"):
        raise CheckpointError(f"{step_dir / 'dgpo_meta.json'}: no model_config recorded")
    cfg = ModelConfig(**meta["model_config"])
    side = Path(hf_files) if hf_files else step_dir.parent / "hf_files"
    if not (side / "config.json").is_file():
        side = None
    import torch

    chunks = build_chunks(cfg, params_dtype=params_dtype or torch.float32)
    load_checkpoint(str(step_dir), chunks, load_rng=False)
    return save_megatron_as_hf(chunks, cfg, out_dir, source_dir=side, dtype=dtype,
                               max_shard_bytes=max_shard_bytes, overwrite=overwrite)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="checkpoint root (with 'latest') or step directory")
    ap.add_argument("--out", required=True, help="output HF folder")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="output dtype (default: as stored)")
    ap.add_argument("--params-dtype", default="float32", choices=sorted(DTYPES),
                    help="dtype of the model the checkpoint was saved from (bf16 training: bfloat16)")
    ap.add_argument("--hf-files", default=None, help="folder with config.json / tokenizer files to copy")
    ap.add_argument("--max-shard-bytes", type=int, default=2 << 30)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)

    import torch
    import torch.distributed as dist

    from megatron_dgpo import distributed as mdist

    step_dir = resolve_checkpoint(args.ckpt)  # fails early on a non-checkpoint
    mdist.initialize(args.tp, args.pp)
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    out = convert_megatron_to_hf(step_dir, args.out, dtype=dtype, hf_files=args.hf_files,
                                 max_shard_bytes=args.max_shard_bytes, overwrite=args.overwrite,
                                 params_dtype=getattr(torch, DTYPES[args.params_dtype]))
    if dist.get_rank() == 0:
        print(f"wrote {out} from {step_dir} (loaded at TP={args.tp} PP={args.pp})")
    mdist.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
