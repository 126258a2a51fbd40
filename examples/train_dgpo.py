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
import time
import warnings

# Expected on a CPU machine (no Apex / Transformer Engine / CUDA): said once in the README rather
# than by every rank on every import.
for _msg in ("Transformer Engine and Apex are not installed", "Apex is not installed",
             "When using async grad allreduce it is recommended"):
    warnings.filterwarnings("ignore", message=_msg)

from megatron_dgpo.config import TrainConfig  # noqa: E402
from megatron_dgpo.configio import ConfigError, format_config, load_config  # noqa: E402
from megatron_dgpo.data.prompts import MalformedRowError  # noqa: E402
from megatron_dgpo.checkpoint import CheckpointError  # noqa: E402
from megatron_dgpo.checkpoint_trust import CheckpointIntegrityError, UntrustedCheckpointError  # noqa: E402
from megatron_dgpo.weight_sync.hf_io import CheckpointError as HFCheckpointError  # noqa: E402
from megatron_dgpo.rl.guard import NonFiniteWeightsError, PolicyCollapsed, TooManySkippedSteps  # noqa: E402


def parse(argv=None) -> tuple[TrainConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file (fields of megatron_dgpo.config.TrainConfig)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an output_dir that holds an earlier run (its checkpoints are removed)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    args = p.parse_args(argv)
    cfg = load_config(TrainConfig, args.config, args.overrides)
    try:
        from megatron_dgpo.config_checks import check_world_size

        check_world_size(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError as e:
        raise ConfigError(f"{e} ({args.config or 'command line'})") from None
    if args.resume:
        cfg.resume = True
    if args.overwrite:
        cfg.overwrite = True
    return cfg, args


def main(argv=None) -> int:
    rank = int(os.environ.get("RANK", "0"))
    try:
        return _main(argv, rank)
    except (ConfigError, MalformedRowError, CheckpointError, CheckpointIntegrityError, UntrustedCheckpointError,
            HFCheckpointError) as e:  # bad input: one line, once, exit 2 (nothing was written)
        return _fail(rank, f"error: {e}", 2)
    except (TooManySkippedSteps, NonFiniteWeightsError, PolicyCollapsed) as e:  # the run aborted itself
        return _fail(rank, f"aborted: {e}", 3)


def _fail(rank: int, line: str, code: int) -> int:
    if rank == 0:
        print(line, file=sys.stderr, flush=True)
    else:  # torchrun stops every worker once one exits: let rank 0 print first
        time.sleep(2.0)
    return code


def _main(argv, rank: int) -> int:
    cfg, _ = parse(argv)
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
