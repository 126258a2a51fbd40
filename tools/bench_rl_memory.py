"""Memory of the RL job per rank (issue 18): start-up, each stage of each RL step, a checkpoint save.

Run under torchrun like the job itself; prints one table (max over ranks) on rank 0:
  * start-up: the process's RSS when RLTrainer() has returned, and that RSS again after one
    gc.collect() (what only the cyclic collector would free: a retired policy in reference cycles);
  * per RL step: the trainer's own mem/<stage>_peak_gb (rl/memory.py: peak RSS during the stage on
    CPU, max_memory_allocated on CUDA);
  * save: peak summed RSS and PSS of the rank's process and all its children (the checkpoint
    writer processes and Megatron's multiprocessing Manager), sampled every 20 ms during
    RLTrainer.save, and the rank's own RSS increase that stays after it.

    torchrun --nproc_per_node 2 tools/bench_rl_memory.py --config examples/configs/embedded_cpu.yaml \
        --dense-reward model.vocab_size=262144 algo.steps=3 warmstart.sft_steps=5 \
        output_dir=/tmp/m warmstart.cache_dir=/tmp/m/cache
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time

import psutil
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_dgpo.config import TrainConfig  # noqa: E402
from megatron_dgpo.configio import load_config  # noqa: E402
from megatron_dgpo.trainer import RLTrainer  # noqa: E402

GB = 1e9


class DenseReward:
    """Seeded random rewards: variance in every group, so every step updates (the memory of the
    loop's mechanics is measured here, not learning)."""

    def __init__(self):
        import random

        self.rng = random.Random(0)

    def score(self, responses, ground_truths):
        return [self.rng.random() for _ in responses], {}


class TreeSampler:
    """Peak summed RSS / PSS of this process and its descendants while running."""

    def __init__(self, interval=0.02):
        self.interval, self.rss, self.pss, self.procs = interval, 0, 0, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            rss = pss = 0
            procs = [me] + me.children(recursive=True)
            for p in procs:
                try:
                    info = p.memory_full_info()
                    rss, pss = rss + info.rss, pss + info.pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.rss, self.pss, self.procs = max(self.rss, rss), max(self.pss, pss), max(self.procs, len(procs))
            time.sleep(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


ALLOC_PEAKS: dict = {}
ALLOC_STEPS: dict = {}  # per stage: (peak extra, net change) of each step, GB


def profile_stages():
    """Wrap rl.memory.StageMemory so that each stage also runs under the torch profiler: the peak
    of torch-allocated bytes above the stage's start, replayed from the allocation events
    (deterministic, unlike RSS, which depends on what the C allocator kept from earlier frees).
    A gc.collect() precedes each stage: garbage of earlier stages (objects in reference cycles)
    freed inside the window would otherwise lower the peak by its size at random."""
    from torch.profiler import ProfilerActivity, profile

    from megatron_dgpo.rl.memory import StageMemory

    begin, end = StageMemory.begin, StageMemory.end

    def begin_p(self, stage):
        gc.collect()  # earlier garbage freed inside the window would lower the measured peak
        begin(self, stage)
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()

    def end_p(self):
        stage = self._stage
        self._prof.__exit__(None, None, None)
        import torch

        events = sorted((e.start_ns(), e.nbytes()) for e in self._prof.profiler.kineto_results.events()
                        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
        running = peak = 0
        for _, n in events:
            running += n
            peak = max(peak, running)
        ALLOC_PEAKS[stage] = max(ALLOC_PEAKS.get(stage, 0), peak)
        ALLOC_STEPS.setdefault(stage, []).append((round(peak / GB, 3), round(running / GB, 3)))
        end(self)

    StageMemory.begin, StageMemory.end = begin_p, end_p


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--dense-reward", action="store_true",
                   help="seeded random rewards (every group has variance, every step updates)")
    p.add_argument("--torch-alloc", action="store_true",
                   help="also each stage's peak torch-allocated bytes above its start "
                        "(profiler allocation events, ops/_memprofile.py): alloc/<stage>_extra_gb")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    cfg = load_config(TrainConfig, a.config, a.overrides + ["tensorboard=false", "overwrite=true"])
    me = psutil.Process()
    if a.torch_alloc:
        profile_stages()
    tr = RLTrainer(cfg, log=lambda *x, **k: None)
    out = {"startup_rss_gb": me.memory_info().rss / GB}
    if a.dense_reward and dist.get_rank() == 0:
        tr.reward_fn = DenseReward()
    gc.collect()
    out["startup_rss_after_gc_gb"] = me.memory_info().rss / GB
    rows = [tr.step(s) for s in range(cfg.algo.steps)]
    for key in sorted(k for k in rows[0] if k.startswith("mem/")):
        out[key] = max(r[key] for r in rows)
    for stage, peak in sorted(ALLOC_PEAKS.items()):
        out[f"alloc/{stage}_extra_gb"] = peak / GB
    before = me.memory_info().rss
    with TreeSampler() as s:
        tr.save(cfg.algo.steps)
    out.update(save_tree_rss_peak_gb=s.rss / GB, save_tree_pss_peak_gb=s.pss / GB, save_procs=s.procs,
               save_rss_kept_gb=(me.memory_info().rss - before) / GB)
    tr.close()
    box = [None] * dist.get_world_size()
    dist.all_gather_object(box, out)
    if dist.get_rank() == 0:
        if ALLOC_STEPS:
            print("alloc per step (peak extra, net):", json.dumps(ALLOC_STEPS))
        print(json.dumps({"accuracy": [r["accuracy"] for r in rows], "reward_mean": [r["reward_mean"] for r in rows]}))
        print(f"{'per rank (max over ranks)':<28} {'value':>8}")
        for k in out:
            print(f"{k:<28} {max(b[k] for b in box):>8.3f}")


if __name__ == "__main__":
    main()
