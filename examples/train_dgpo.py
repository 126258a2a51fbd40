#!/usr/bin/env python
"""The main job: RLVR with DGPO (or any registered loss) on Megatron-Core.

    torchrun --nproc_per_node 2 examples/train_dgpo.py --config examples/configs/embedded_cpu.yaml [key=value ...]

Overrides are dotted config paths, e.g. `loss.name=grpo algo.steps=50 parallel.tensor_model_parallel_size=1`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

# Expected on a CPU machine (no Apex / Transformer Engine / CUDA): said once in the README rather
# than by every rank on every import.
for _msg in ("Transformer Engine and Apex are not installed", "Apex is not installed",
             "When using async grad allreduce it is recommended"):
    warnings.filterwarnings("ignore", message=_msg)

from megatron_dgpo.config import TrainConfig  # noqa: E402
from megatron_dgpo.configio import format_config, load_config  # noqa: E402


def parse(argv=None) -> tuple[TrainConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file (fields of megatron_dgpo.config.TrainConfig)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    args = p.parse_args(argv)
    cfg = load_config(TrainConfig, args.config, args.overrides)
    if args.resume:
        cfg.resume = True
    return cfg, args


def main(argv=None) -> int:
    cfg, _ = parse(argv)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(format_config(cfg), flush=True)
    from megatron_dgpo.trainer import run

    summary = run(cfg)
    if rank == 0:
        before, after = summary.get("eval_before"), summary["eval_after"]
        print("\n== summary ==")
        if before is not None:
            print(f"held-out accuracy before RL: {before['accuracy']:.3f}")
        print(f"held-out accuracy after RL:  {after['accuracy']:.3f}")
        print(f"metrics: {os.path.join(cfg.output_dir, 'metrics.jsonl')}; curves: {summary.get('plot')}")
        with open(os.path.join(cfg.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
