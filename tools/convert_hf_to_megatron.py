#!/usr/bin/env python
"""HF safetensors folder -> Megatron distributed checkpoint at a chosen TP/PP layout.

    torchrun --nproc_per_node=N tools/convert_hf_to_megatron.py --hf HF_DIR --out ROOT --tp 2 --pp 1 \
        [--params-dtype float32|bfloat16] [--vpp K] \
        [--decoder-first-pipeline-num-layers A] [--decoder-last-pipeline-num-layers B]

N must be a multiple of TP*PP (the rest is data parallel: replicas load the same weights).
Each rank reads only its slices of the HF tensors. The result is a `megatron_dgpo.checkpoint`
root: ROOT/step_00000000/ (megatron.core.dist_checkpointing, loadable into any TP/PP layout;
dgpo_meta.json holds the model config), ROOT/latest, and ROOT/hf_files/ (config.json, tokenizer
and other non-weight files of the source, used by convert_megatron_to_hf.py). Works on CPU (gloo)
and GPU (NCCL). Only safetensors are read; no remote code. The two --decoder-*-pipeline-num-layers
options (Megatron-LM's names) give uneven pipeline stages, e.g. 28 layers on --pp 3 as 10+9+9.

A user error (bad folder, unsupported architecture, a layout that cannot hold the model, an
output root that already holds a checkpoint) is one line `error: ...` from rank 0 and exit code 2,
found before any model is built.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def copy_side_files(src: Path, dst: Path) -> None:
    """Atomically place the non-weight files of `src` in `dst`."""
    from megatron_dgpo.weight_sync.hf_io import INDEX_NAME, _WEIGHT_SUFFIXES

    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_file() and p.suffix not in _WEIGHT_SUFFIXES and p.name != INDEX_NAME:
            shutil.copy2(p, tmp / p.name)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def convert_hf_to_megatron(hf_dir, out_root, *, params_dtype=None, strict: bool = True,
                           num_layers_in_first_pipeline_stage=None, num_layers_in_last_pipeline_stage=None) -> str:
    """Load `hf_dir` into a model built in the current (initialised) TP/PP layout and save it as a
    megatron_dgpo checkpoint root. Collective. Returns the step directory."""
    import torch
    import torch.distributed as dist

    from megatron_dgpo.checkpoint import save_checkpoint
    from megatron_dgpo.weight_sync import HFCheckpoint, load_hf_into_megatron
    from megatron_dgpo.model.builder import build_model_chunks as build_chunks

    hf = Path(hf_dir)
    with HFCheckpoint(hf) as ck:
        cfg = ck.model_config()
    chunks = build_chunks(cfg, params_dtype=params_dtype or torch.float32,
                          num_layers_in_first_pipeline_stage=num_layers_in_first_pipeline_stage,
                          num_layers_in_last_pipeline_stage=num_layers_in_last_pipeline_stage)
    load_hf_into_megatron(chunks, hf, cfg, strict=strict)
    root = Path(out_root)
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        copy_side_files(hf, root / "hf_files")
    dist.barrier()
    return save_checkpoint(str(root), 0, chunks, optimizer=None, save_rng=False,
                           extra={"converted_from": str(hf.resolve()), "tool": "convert_hf_to_megatron"})


def precheck(args):
    """Every input check that needs no model (same result on every rank). Returns the ModelConfig."""
    from megatron_dgpo.tool_cli import UsageError, check_tool_layout
    from megatron_dgpo.weight_sync import HFCheckpoint
    from megatron_dgpo.weight_sync.hf_io import CheckpointError
    from megatron_dgpo.weight_sync.load import check_hf_tensors

    with HFCheckpoint(args.hf) as ck:  # names the file on a non-checkpoint / unsupported config.json
        cfg = ck.model_config()
        check_tool_layout(cfg, args.tp, args.pp, args.first_stage_layers, args.last_stage_layers, args.vpp,
                          what=f"{Path(args.hf) / 'config.json'}")
        try:
            check_hf_tensors(ck, cfg, strict=args.strict)
        except CheckpointError as e:
            raise CheckpointError(str(e).replace("pass strict=False", "pass --no-strict")) from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    held = [p.name for p in out.iterdir() if p.name == "latest" or p.name.startswith("step_")] if out.is_dir() else []
    if held:
        raise UsageError(f"--out {out} already holds a checkpoint ({sorted(held)[0]}); choose a new folder")
    return cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True, help="HF checkpoint folder (config.json + *.safetensors)")
    ap.add_argument("--out", required=True, help="output checkpoint root")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--vpp", type=int, default=None)
    ap.add_argument("--decoder-first-pipeline-num-layers", dest="first_stage_layers", type=int, default=None,
                    help="layers on the first pipeline stage (uneven stages; default: num_layers / PP)")
    ap.add_argument("--decoder-last-pipeline-num-layers", dest="last_stage_layers", type=int, default=None,
                    help="layers on the last pipeline stage")
    ap.add_argument("--params-dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--strict", action=argparse.BooleanOptionalAction, default=True,
                    help="fail on HF tensors the layout does not use (default: on)")
    args = ap.parse_args(argv)

    import torch
    import torch.distributed as dist

    from megatron_dgpo import distributed as mdist

    cfg = precheck(args)  # before anything is built or written
    mdist.initialize(args.tp, args.pp, virtual_pipeline_model_parallel_size=args.vpp)
    path = convert_hf_to_megatron(args.hf, args.out, params_dtype=getattr(torch, DTYPES[args.params_dtype]),
                                  strict=args.strict, num_layers_in_first_pipeline_stage=args.first_stage_layers,
                                  num_layers_in_last_pipeline_stage=args.last_stage_layers)
    if dist.get_rank() == 0:
        print(f"wrote {path} (TP={args.tp} PP={args.pp}, {cfg.arch}, {cfg.num_layers} layers)")
    mdist.destroy()
    return 0


if __name__ == "__main__":
    from megatron_dgpo.tool_cli import run_tool

    sys.exit(run_tool(main))
