"""torchrun worker (2 processes, TP=2): what a long run must never do (issue 11, items 1 and 2).

- An optimizer step that makes the weights non-finite (finite gradients, lr=inf) aborts at that
  step, before the weight sync and before any save: the engine keeps finite weights and no
  checkpoint holds NaN (the embedded job with a huge lr and save_every=1 used to save NaN weights
  as `latest`).
- A policy without reward variance for algo.max_steps_without_variance steps aborts.
- --resume with a `latest` that names a missing directory continues from the newest complete
  checkpoint (metrics kept, old checkpoints kept), and a `latest` that leaves the root is ignored.
- A fresh run into a folder holding a run refuses; --overwrite replaces it; two trainers on one
  folder: the second is refused while the first holds the lock.
- A run resumed at its last step does not log the final evaluation twice.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from results import check, run_cases  # noqa: E402
from rl_loop import DenseReward, make_cfg  # noqa: E402

from megatron_dgpo.rl.metrics import read_metrics  # noqa: E402
from megatron_dgpo.trainer import RLTrainer  # noqa: E402





class ConstReward:
    def score(self, responses, ground_truths):
        return [1.0] * len(responses), {}


def trainer(cfg, reward=DenseReward) -> RLTrainer:
    tr = RLTrainer(cfg, log=lambda *a, **k: None)
    if dist.get_rank() == 0:
        tr.reward_fn = reward()
    return tr


def _finite(module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def nonfinite_weights(root):
    out = os.path.join(root, "lr_huge")
    cfg = make_cfg(out, **{"save_every": 1, "algo.steps": 2})
    cfg.optim.lr = float("inf")  # the probe; refused at config load, so set afterwards
    tr = trainer(cfg)
    raised = None
    try:
        for step in range(2):  # what RLTrainer.run does: step, then save (save_every=1)
            tr.step(step)
            tr.save(step + 1)
    except Exception as e:  # noqa: BLE001
        raised = f"{type(e).__name__}: {e}"
    engine_ok = _finite(tr.engine.model)
    ckpts = sorted(e for e in os.listdir(os.path.join(out, "checkpoints"))
                   if e.startswith("step_")) if os.path.isdir(os.path.join(out, "checkpoints")) else []
    tr.close()
    check("nonfinite_weights_abort_before_sync_and_save",
          raised is not None and "NonFiniteWeightsError" in raised and engine_ok and not ckpts
          and "after optimizer step 1 " in raised,  # decided at the first of the 4 mini-batch steps
          {"raised": raised, "engine_finite": engine_ok, "checkpoints": ckpts})


def huge_finite_lr(root):
    """lr=1e30: finite but overflowing weights; the rollout engine says so instead of torch's
    'probability tensor contains inf/nan'."""
    tr = trainer(make_cfg(os.path.join(root, "lr_1e30"), **{"optim.lr": 1e30, "algo.steps": 3}))
    raised = None
    try:
        for step in range(3):
            tr.step(step)
    except Exception as e:  # noqa: BLE001
        raised = f"{type(e).__name__}: {e}"
    tr.close()
    check("overflowing_weights_named", raised is not None and "NonFiniteWeightsError" in raised and "optim.lr" in raised,
          raised)


def collapse(root):
    tr = trainer(make_cfg(os.path.join(root, "collapse"), **{"algo.steps": 5, "algo.max_steps_without_variance": 2}),
                 reward=ConstReward)
    steps, raised = 0, None
    try:
        for step in range(5):
            tr.step(step)
            steps += 1
    except Exception as e:  # noqa: BLE001
        raised = f"{type(e).__name__}: {e}"
    tr.close()
    check("collapsed_policy_aborts", steps == 1 and raised is not None and "PolicyCollapsed" in raised,
          {"steps": steps, "raised": raised})


def resume_and_run_dir(root):
    from megatron_dgpo.rundir import RunDirError

    out = os.path.join(root, "resume")
    tr = trainer(make_cfg(out, **{"algo.steps": 3}))
    for s in range(2):
        tr.step(s)
        tr.save(s + 1)
    # A second run on the same folder while this one is alive: refused by the lock.
    try:
        trainer(make_cfg(out, **{"algo.steps": 3, "overwrite": True}))
        locked = False
    except RunDirError as e:
        locked = "in use" in str(e)
    tr.close()
    check("second_run_on_output_dir_refused", locked, locked)

    # A fresh run into the folder refuses without --overwrite (nothing is touched).
    try:
        trainer(make_cfg(out, **{"algo.steps": 3}))
        refused = False
    except RunDirError as e:
        refused = "--resume" in str(e) and "--overwrite" in str(e)
    check("fresh_run_into_old_run_refused", refused and os.path.isdir(os.path.join(out, "checkpoints", "step_00000002")),
          refused)

    ck = os.path.join(out, "checkpoints")
    if dist.get_rank() == 0:
        with open(os.path.join(ck, "latest"), "w") as f:
            f.write("step_00000099\n")
    dist.barrier()
    rows_before = len(read_metrics(os.path.join(out, "metrics.jsonl"))) if dist.get_rank() == 0 else 0
    notes = []
    tr = RLTrainer(make_cfg(out, **{"algo.steps": 3, "resume": True}), log=notes.append)
    if dist.get_rank() == 0:
        tr.reward_fn = DenseReward()
    start = tr.start_step
    tr.close()
    kept = len(read_metrics(os.path.join(out, "metrics.jsonl"))) if dist.get_rank() == 0 else 0
    check("broken_latest_falls_back_to_newest_complete",
          start == 2 and (dist.get_rank() != 0 or (kept == rows_before and any("newest complete" in n for n in notes))),
          {"start": start, "rows": (rows_before, kept), "notes": notes})

    if dist.get_rank() == 0:
        with open(os.path.join(ck, "latest"), "w") as f:
            f.write("../../../lr_huge/checkpoints/step_00000001\n")
    dist.barrier()
    tr = trainer(make_cfg(out, **{"algo.steps": 3, "resume": True}))
    start = tr.start_step
    # The final-eval duplicate: finish the run, then resume at its last step and finish again.
    tr.run()
    tr2 = trainer(make_cfg(out, **{"algo.steps": 3, "resume": True}))
    start2 = tr2.start_step
    tr2.run()
    if dist.get_rank() == 0:
        evals = [r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if r.get("kind") == "eval" and r["step"] == 3]
        n_final = len(evals)
    else:
        n_final = 1
    check("latest_outside_root_ignored", start == 2, start)
    check("final_eval_not_duplicated_after_resume", start2 == 3 and n_final == 1, {"start": start2, "final_evals": n_final})

    # --overwrite replaces the run: old checkpoints gone, training from step 0.
    tr = trainer(make_cfg(out, **{"algo.steps": 3, "overwrite": True}))
    gone = not os.path.exists(os.path.join(ck, "step_00000003"))
    check("overwrite_replaces_run", tr.start_step == 0 and gone, {"start": tr.start_step, "gone": gone})
    tr.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    root = os.path.dirname(os.path.abspath(args.out))
    # a crashed case fails its `_ran` check and the others still run
    run_cases((("nonfinite", nonfinite_weights), ("huge_lr", huge_finite_lr), ("collapse", collapse),
               ("resume", resume_and_run_dir)), root, out=args.out, reraise=False)


if __name__ == "__main__":
    main()
    sys.exit(0)
