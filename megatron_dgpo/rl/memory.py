"""Peak memory of each stage of an RL step, per rank, reduced to the maximum over ranks.

Source (rl/metrics.py, MEMORY_KEYS, says the same):
  * CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()` at the stage's
    start: the peak of live tensor bytes on this rank's GPU during the stage.
  * CPU: the process's peak resident set size during the stage: the kernel's high-water mark
    (VmHWM in /proc/self/status), reset at the stage's start by writing 5 to /proc/self/clear_refs.
    It counts everything the rank's process holds (tensors, Python, libraries), not the rollout
    server or reward worker processes. Where the reset is not allowed, the peak RSS since the
    process started is reported instead (`source` says "rss_hwm_since_start").
A stage that did not run in a step (a skipped update) reports 0.0, like its time.
"""
from __future__ import annotations

import re
from typing import Dict, Optional

import torch
import torch.distributed as dist

STAGES = ("rollout", "old_logp", "update", "sync")
_GB = 1e9


def key(stage: str) -> str:
    return f"mem/{stage}_peak_gb"


class StageMemory:
    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self.source = "cuda_max_memory_allocated" if self.cuda else "rss_hwm"
        self._stage: Optional[str] = None
        self.peaks: Dict[str, float] = {}
        self.run_max: Dict[str, float] = {s: 0.0 for s in STAGES}

    def begin(self, stage: str) -> None:
        self._stage = stage
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif self.source == "rss_hwm":
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                self.source = "rss_hwm_since_start"

    def end(self) -> None:
        if self._stage is None:
            return
        if self.cuda:
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _vm_hwm_bytes()
        self.peaks[self._stage] = max(self.peaks.get(self._stage, 0.0), peak / _GB)
        self._stage = None

    def collect(self) -> Dict[str, float]:
        """This step's `mem/<stage>_peak_gb` (max over ranks; collective over the default group),
        then a fresh step."""
        vals = torch.tensor([self.peaks.get(s, 0.0) for s in STAGES], dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            nccl = self.cuda and dist.get_backend() == "nccl"
            vals = vals.to(torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
            dist.all_reduce(vals, op=dist.ReduceOp.MAX)
        out = {key(s): float(v) for s, v in zip(STAGES, vals.cpu().tolist())}
        for s in STAGES:
            self.run_max[s] = max(self.run_max[s], out[key(s)])
        self.peaks = {}
        return out

    def summary(self) -> str:
        return "peak memory per rank (GB, max over ranks and steps; " + self.source + "): " + ", ".join(
            f"{s} {self.run_max[s]:.2f}" for s in STAGES)


def _vm_hwm_bytes() -> float:
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"VmHWM:\s+(\d+)\s+kB", f.read())
        if m:
            return float(m.group(1)) * 1024
    except OSError:
        pass
    import resource  # ru_maxrss: the peak since the process started (kB on Linux)

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
