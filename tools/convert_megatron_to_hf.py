#!/usr/bin/env python
"""Megatron distributed checkpoint -> HF safetensors folder (loadable by AutoModelForCausalLM).

    torchrun --nproc_per_node=N tools/convert_megatron_to_hf.py --ckpt ROOT_OR_STEP_DIR --out HF_DIR \
        [--tp T --pp P] [--dtype bfloat16] [--hf-files DIR] [--overwrite] \
        [--decoder-first-pipeline-num-layers A] [--decoder-last-pipeline-num-layers B]

The checkpoint (a `megatron_dgpo.checkpoint` root or step directory, e.g. written by
convert_hf_to_megatron.py or by training) loads into the TP/PP layout given here, whatever
layout it was saved with; the weights are streamed to rank 0 in HF layout and written
atomically (temporary folder + rename). Non-weight files (config.json, tokenizer, ...) come
from --hf-files, else ROOT/hf_files, else config.json is generated from the model config
stored in the checkpoint.

A user error (not a checkpoint, a layout that cannot hold the model, an existing --out without
--overwrite, --hf-files without config.json) is one line `error: ...` from rank 0 and exit code
2, found before any model is built or checkpoint loaded.
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


def checkpoint_model_config(step_dir: Path):
    from megatron_dgpo.checkpoint import read_meta
    from megatron_dgpo.model.config import ModelConfig
    from megatron_dgpo.weight_sync import CheckpointError

    meta = read_meta(str(step_dir))
    if not meta.get("model_config"):
        raise CheckpointError(f"{step_dir / 'dgpo_meta.json'}: no model_config recorded")
    try:
        return ModelConfig(**meta["model_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{step_dir / 'dgpo_meta.json'}: model_config: {e}") from None


def convert_megatron_to_hf(ckpt, out_dir, *, dtype=None, hf_files=None, max_shard_bytes: int = 2 << 30,
                           overwrite: bool = False, params_dtype=None, num_layers_in_first_pipeline_stage=None,
                           num_layers_in_last_pipeline_stage=None):
    """Load checkpoint `ckpt` into the current (initialised) TP/PP layout and write `out_dir` (HF) from
    rank 0. Collective. Returns the folder on rank 0, None elsewhere."""
    from megatron_dgpo.checkpoint import load_checkpoint
    from megatron_dgpo.weight_sync import save_megatron_as_hf
    from megatron_dgpo.model.builder import build_model_chunks as build_chunks

    step_dir = resolve_checkpoint(ckpt)
    cfg = checkpoint_model_config(step_dir)
    side = Path(hf_files) if hf_files else step_dir.parent / "hf_files"
    if not (side / "config.json").is_file():
        side = None
    import torch

    chunks = build_chunks(cfg, params_dtype=params_dtype or torch.float32,
                          num_layers_in_first_pipeline_stage=num_layers_in_first_pipeline_stage,
                          num_layers_in_last_pipeline_stage=num_layers_in_last_pipeline_stage)
    load_checkpoint(str(step_dir), chunks, load_rng=False)
    return save_megatron_as_hf(chunks, cfg, out_dir, source_dir=side, dtype=dtype,
                               max_shard_bytes=max_shard_bytes, overwrite=overwrite)


def precheck(args) -> Path:
    """Every input check that needs no model (same result on every rank). Returns the step directory."""
    from megatron_dgpo.tool_cli import UsageError, check_tool_layout

    step_dir = resolve_checkpoint(args.ckpt)
    cfg = checkpoint_model_config(step_dir)
    check_tool_layout(cfg, args.tp, args.pp, args.first_stage_layers, args.last_stage_layers,
                      what=f"{step_dir / 'dgpo_meta.json'}")
    if args.hf_files and not (Path(args.hf_files) / "config.json").is_file():
        raise UsageError(f"--hf-files {args.hf_files}: no config.json there")
    if Path(args.out).exists() and not args.overwrite:
        raise UsageError(f"--out {args.out} exists; pass --overwrite to replace it")
    return step_dir


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
    ap.add_argument("--decoder-first-pipeline-num-layers", dest="first_stage_layers", type=int, default=None,
                    help="layers on the first pipeline stage (uneven stages; default: num_layers / PP)")
    ap.add_argument("--decoder-last-pipeline-num-layers", dest="last_stage_layers", type=int, default=None,
                    help="layers on the last pipeline stage")
    args = ap.parse_args(argv)

    import torch
    import torch.distributed as dist

    from megatron_dgpo import distributed as mdist

    step_dir = precheck(args)  # before anything is built or loaded
    mdist.initialize(args.tp, args.pp)
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    out = convert_megatron_to_hf(step_dir, args.out, dtype=dtype, hf_files=args.hf_files,
                                 max_shard_bytes=args.max_shard_bytes, overwrite=args.overwrite,
                                 params_dtype=getattr(torch, DTYPES[args.params_dtype]),
                                 num_layers_in_first_pipeline_stage=args.first_stage_layers,
                                 num_layers_in_last_pipeline_stage=args.last_stage_layers)
    if dist.get_rank() == 0:
        print(f"wrote {out} from {step_dir} (loaded at TP={args.tp} PP={args.pp})")
    mdist.destroy()
    return 0


if __name__ == "__main__":
    from megatron_dgpo.tool_cli import run_tool

    sys.exit(run_tool(main))
