"""torchrun worker (2 processes, TP=2): memory held by the RL loop (issue 18).

* After a warm start trained now, only one policy's model exists (the cyclic gc disabled, so
  only reference counting frees anything), and the RL steps equal those of a run whose warm start
  came from the cache (a pristine policy): the in-place optimizer reset is complete.
* A retired Policy (`close()`) is freed by reference counting alone.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import weakref

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from results import check, run_cases  # noqa: E402
from rl_loop import COMPARED, make_cfg, trainer  # noqa: E402

import megatron_dgpo.trainer as trainer_mod  # noqa: E402
from megatron_dgpo.train import pad_sequences  # noqa: E402


class _Tracked(trainer_mod.Policy):
    """Policy that records a weak reference to each model it builds."""
    built: list = []

    def __init__(self, cfg):
        super().__init__(cfg)
        _Tracked.built.append(weakref.ref(self.chunks[0].module))


def one_policy_after_warm_start(root):
    out = os.path.join(root, "ws")
    real = trainer_mod.Policy
    trainer_mod.Policy = _Tracked
    gc.collect()
    gc.disable()
    try:
        tr = trainer(make_cfg(out, **{"algo.steps": 2}))
        alive = sum(r() is not None for r in _Tracked.built)
    finally:
        gc.enable()
        trainer_mod.Policy = real
    check("one_policy_after_warm_start", alive == 1 and len(_Tracked.built) >= 1,
          {"built": len(_Tracked.built), "alive_without_gc": alive})
    trained_rows = [tr.step(s) for s in range(2)]
    tr.close()
    # The same configuration again: the warm start now comes from the cache into a pristine policy.
    cached = trainer(make_cfg(out, **{"algo.steps": 2, "overwrite": True}))
    cached_rows = [cached.step(s) for s in range(2)]
    writers_honoured(cached)
    cached.close()
    memory_keys_every_step(trained_rows + cached_rows, root)
    diffs = {k: [abs(a.get(k, 0) - b.get(k, 0)) for a, b in zip(trained_rows, cached_rows)] for k in COMPARED}
    worst = max(max(v) for v in diffs.values())
    updated = all("loss" in r and math.isfinite(r["loss"]) for r in trained_rows)
    check("rl_numbers_as_from_fresh_policy", updated and worst < 1e-6, diffs)


def memory_keys_every_step(updated_rows, root):
    """mem/<stage>_peak_gb on every train row, finite, the same on every rank (max over ranks),
    in metrics.jsonl; a step skipped for lack of reward variance has them too (0 for the stages
    it did not run)."""
    from rl_loop import NoVarianceReward

    from megatron_dgpo.rl.metrics import MEMORY_KEYS, read_metrics

    out = os.path.join(root, "novar")
    tr = trainer(make_cfg(out, **{"algo.steps": 1}))
    if dist.get_rank() == 0:
        tr.reward_fn = NoVarianceReward()
    skipped = tr.step(0)
    tr.close()
    keys = sorted(MEMORY_KEYS)
    stages = ("mem/rollout_peak_gb", "mem/sync_peak_gb")
    ok_updated = all(all(math.isfinite(r[k]) and r[k] > 0 for k in keys) for r in updated_rows)
    ok_skipped = "skipped" in skipped and all(math.isfinite(skipped[k]) for k in keys) and all(
        skipped[k] > 0 for k in stages) and skipped["mem/update_peak_gb"] == 0.0
    mine = torch.tensor([r[k] for r in updated_rows for k in keys], dtype=torch.float64)
    other = mine.clone()
    dist.broadcast(other, src=0)
    same = torch.equal(mine, other)
    logged = True
    if dist.get_rank() == 0:
        rows = [r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if r["kind"] == "train"]
        logged = len(rows) == 1 and all(math.isfinite(rows[0][k]) for k in keys)
    check("memory_keys_every_step", ok_updated and ok_skipped and same and logged,
          {"updated": [{k: r[k] for k in keys} for r in updated_rows], "skipped": {k: skipped.get(k) for k in keys},
           "same_on_ranks": same, "logged": logged})


def writers_honoured(tr):
    """checkpoint_writers: the number of files each rank writes (one per writer process)."""
    import glob

    from megatron_dgpo import checkpoint

    def files_per_rank(path):
        names = [os.path.basename(f) for f in glob.glob(os.path.join(path, "*.distcp"))]
        return sorted({n: sum(m.startswith(n.rsplit("_", 1)[0] + "_") for m in names) for n in names}.values())

    tr.save(2)  # the config's default (0: one writer on CPU)
    default = files_per_rank(os.path.join(tr.ckpt_dir, "step_00000002"))
    path = checkpoint.save_checkpoint(tr.ckpt_dir, 3, tr.policy.chunks, tr.policy.optimizer, writers=3)
    three = files_per_rank(path)
    check("checkpoint_writers_honoured", tr.cfg.checkpoint_writers == 0 and set(default) == {1} and set(three) == {3},
          {"default": default, "writers=3": three})


def closed_policy_freed_without_gc(root):
    from megatron_dgpo.rl.policy import Policy

    cfg = make_cfg(os.path.join(root, "close"))
    gc.collect()
    gc.disable()
    try:
        pol = Policy(cfg)
        batch = pad_sequences([[1, 2, 3]] * 4, [[4, 5]] * 4, torch.ones(4))
        pol.update(batch, temperature=1.0, lr=1e-2)  # gradients, Adam state, schedule hooks
        model, opt = weakref.ref(pol.chunks[0].module), weakref.ref(pol.optimizer)
        pol.close()
        del pol
        alive = (model() is not None, opt() is not None)
    finally:
        gc.enable()
    check("closed_policy_freed_without_gc", alive == (False, False), {"model, optimizer alive": alive})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    root = os.path.dirname(os.path.abspath(args.out))
    from megatron_dgpo import distributed as mdist

    mdist.initialize(tensor_model_parallel_size=2, pipeline_model_parallel_size=1, seed=1234)
    run_cases((("close", closed_policy_freed_without_gc), ("ws", one_policy_after_warm_start)), root, out=args.out)


if __name__ == "__main__":
    main()
    sys.exit(0)
