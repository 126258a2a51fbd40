"""User errors of the command-line tools (tools/convert_*.py) as one line, exit code 2.

The same contract as examples/train_dgpo.py: every rank runs the same checks on the same files
before any model is built or checkpoint loaded, so every rank fails alike; rank 0 prints
`error: ...` once to stderr, the other ranks wait briefly so that torchrun's shutdown does not
cut that line off, and each returns 2. Nothing has been written at that point.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, Optional, Sequence


class UsageError(ValueError):
    """A bad argument or input the user can fix (the message names the option, file or key)."""


def user_error_types() -> tuple:
    from megatron_dgpo.checkpoint import CheckpointError
    from megatron_dgpo.weight_sync.hf_io import CheckpointError as HFCheckpointError

    return (UsageError, CheckpointError, HFCheckpointError)


def run_tool(main: Callable[[Optional[Sequence[str]]], int], argv=None) -> int:
    """main(argv), with user errors turned into one line on rank 0 and exit code 2."""
    rank = int(os.environ.get("RANK", "0"))
    try:
        return main(argv)
    except user_error_types() as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        else:
            time.sleep(2.0)
        return 2


def check_tool_layout(cfg, tp: int, pp: int, first: Optional[int] = None, last: Optional[int] = None,
                      vpp: Optional[int] = None, world_size: Optional[int] = None, what: str = "the model") -> None:
    """The TP/PP layout given on the command line can hold `cfg` on `world_size` processes."""
    from megatron_dgpo.config_checks import check_model_layout
    from megatron_dgpo.weight_sync.layouts import get_layout

    keys = dict(tp="--tp", pp="--pp", first="--decoder-first-pipeline-num-layers",
                last="--decoder-last-pipeline-num-layers", vpp="--vpp")
    for name, v in (("--tp", tp), ("--pp", pp), ("--vpp", vpp or 1)):
        if v < 1:
            raise UsageError(f"{name}={v} must be >= 1")
    try:
        get_layout(cfg)
        check_model_layout(cfg, tp, pp, first, last, vpp, keys=keys)
    except ValueError as e:
        raise UsageError(f"{what}: {e}") from None
    world = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    if world % (tp * pp):
        raise UsageError(f"--tp {tp} x --pp {pp} = {tp * pp} does not divide the {world} processes "
                         f"(torchrun --nproc_per_node)")
