"""What every torchrun worker records and hands back: named checks in RESULTS, run case by case,
written as JSON by rank 0 to the file tests/torchrun_util.py reads."""
from __future__ import annotations

import json
import traceback

import torch.distributed as dist

RESULTS: dict = {}


def check(name, ok, detail=""):
    RESULTS[name] = {"ok": bool(ok), "detail": str(detail)[:2000]}


def write_results(out: str) -> None:
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(RESULTS, f)


def run_cases(cases, *args, out=None, reraise=True) -> None:
    """Run each (name, fn) as fn(*args); a crash becomes the failed check `<name>_ran` and is
    re-raised (unless `reraise=False`: the later cases still run); then, with `out`, rank 0
    writes RESULTS."""
    for name, fn in cases:
        try:
            fn(*args)
        except Exception:
            check(f"{name}_ran", False, traceback.format_exc())
            if reraise:
                raise
    if out is not None:
        write_results(out)
