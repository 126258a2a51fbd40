"""torchrun worker (2 processes, TP=2 unless stated, embedded engine): the old log-prob paths of an RL step.

* on-policy shortcut (one mini-batch, one epoch): the update with the forward's own detached
  log-probs as pi_old gives the recompute path's loss, gradients and weights (fp32, 1e-6), and
  the trainer's step then runs no old-log-prob forward;
* `rollout` on the embedded engine: one update's loss and gradients within 1e-5 (relative) of
  `trainer` (recompute) on the same batch and weights;
* collectives per RL step by stage (tests/collectives.py), measured on a steady-state step;
* DP=2: the update's collective-free normaliser counts and once-per-step metric reduction equal
  the per-step collectives, bit for bit.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.distributed as dist

from megatron_dgpo.advantage import group_advantages
from megatron_dgpo.rl import old_logp, rollout_stage
from megatron_dgpo.rl.policy import Policy
from megatron_dgpo.trainer import build_batch
from tests.workers.rl_loop import make_cfg, trainer
from results import RESULTS, check, run_cases, write_results  # the module rl_loop records into (script dir on sys.path)


def rollout_batch(tr, seed):
    tr.sampling.seed = seed
    ro = rollout_stage.collect(tr.engine, tr.reward_fn, tr.tokenizer, tr.sampler.next_batch(), tr.sampling,
                               distributed=tr.distributed_rollout)
    adv, keep, _ = group_advantages(ro.rewards, tr.cfg.rollout.group_size, scale="std", filter_zero_variance=True)
    return build_batch(ro, adv, keep, tr.pad_id, multiple=tr.cfg.algo.mini_batches)


def params(pol):
    return [p.detach().clone() for c in pol.chunks for p in c.parameters()]


def grads(pol):
    return [p.main_grad.detach().clone() for c in pol.chunks for p in c.parameters()]


def max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def rel_norm_diff(a, b):
    num = sum(float((x.double() - y.double()).pow(2).sum()) for x, y in zip(a, b))
    den = sum(float(x.double().pow(2).sum()) for x in a)
    return math.sqrt(num / max(den, 1e-300))


def shortcut_equals_recompute(root):
    cfg = make_cfg(os.path.join(root, "onpolicy"), **{"algo.mini_batches": 1, "optim.lr": 1e-3})
    tr = trainer(cfg)
    batch = rollout_batch(tr, 11)
    twin = Policy(cfg)  # the same weights and a fresh optimizer, like tr.policy's
    with torch.no_grad():
        for a, b in zip((p for c in twin.chunks for p in c.parameters()),
                        (p for c in tr.policy.chunks for p in c.parameters())):
            a.copy_(b)
    twin.optimizer.reload_model_params()
    t = tr.temperature
    recomputed, gap, _ = old_logp.with_old_logp(tr.policy, batch, "trainer", t)
    shortcut, _, _ = old_logp.with_old_logp(twin, batch, "on_policy", t)
    before = params(tr.policy)
    (ma,) = tr.policy.update(recomputed, temperature=t, lr=cfg.optim.lr)
    (mb,) = twin.update(shortcut, temperature=t, lr=cfg.optim.lr)
    d = {"loss": abs(ma["loss"] - mb["loss"]), "grad": max_diff(grads(tr.policy), grads(twin)),
         "weights": max_diff(params(tr.policy), params(twin)), "moved": max_diff(params(tr.policy), before),
         "grad_norm": ma["grad_norm"], "gap": gap, "update_gap": mb.get("rollout_logp_abs_diff")}
    check("on_policy_shortcut_equals_recompute",
          d["loss"] <= 1e-6 and d["grad"] <= 1e-6 and d["weights"] <= 1e-6 and d["moved"] > 1e-4
          and d["grad_norm"] > 0, d)

    # The trainer's step takes the shortcut: no old-log-prob forward at all.
    def no_forward(*a, **k):
        raise AssertionError("old log-probs recomputed on an on-policy step")

    tr.policy.logprobs = no_forward
    tr.sync(1)  # the engine gets the updated weights, as after a real step
    row = tr.step(1)
    tr.close()
    check("on_policy_step_runs_no_old_logp_forward",
          row.get("old_logp_source") == "on_policy" and row["old_logp_s"] == 0.0 and "loss" in row
          and 0 <= row["train_rollout_logp_gap"] < 1e-4,
          {k: row.get(k) for k in ("old_logp_source", "old_logp_s", "loss", "train_rollout_logp_gap", "skipped")})


def rollout_source_matches_trainer(root):
    cfg = make_cfg(os.path.join(root, "rollout_src"), **{"algo.mini_batches": 2})
    tr = trainer(cfg)
    t = tr.temperature
    batch = rollout_batch(tr, 12)
    got = {}
    for how in ("trainer", "rollout"):
        b, gap, _ = old_logp.with_old_logp(tr.policy, batch, how, t)
        ms = tr.policy.update(b, temperature=t, lr=0.0)  # lr 0: both see the same weights
        got[how] = ([m["loss"] for m in ms], grads(tr.policy), gap)
    la, lb = got["trainer"][0], got["rollout"][0]
    # Relative to the loss's scale: a group-normalised loss can be ~0 at ratio 1, where a relative
    # error means nothing; its terms are of the size of the mean |advantage| per loss token.
    scale = float(batch.advantages.abs().mean())
    loss_rel = max(abs(a - b) / max(abs(a), scale) for a, b in zip(la, lb))
    grad_rel = rel_norm_diff(got["trainer"][1], got["rollout"][1])
    tr.close()
    d = {"losses": [la, lb], "loss_rel": loss_rel, "scale": scale, "grad_rel": grad_rel, "gap": got["trainer"][2],
         "auto_plan": tr.old_logp_plan}
    check("rollout_source_within_1e-5_of_trainer",
          loss_rel <= 1e-5 and grad_rel <= 1e-5 and tr.old_logp_plan == "rollout" and 0 < got["trainer"][2] < 1e-5, d)


# Measured with megatron-core 0.16.1 on gloo (both ranks alike). An RL step of the demo's shape:
# the rollout gather and the reward broadcast one object each. TP=2: the update 16 all-reduces per
# mini-batch (one micro-batch each: TP reductions of 2 layers forward + backward, vocab-parallel
# log-prob reductions, the normaliser, the finite-gradient flag, the grad norm); the weight sync one
# gather of the bucket's TP shards, one broadcast of the bucket, the finite-weights flag. DP=2
# (the demo): per mini-batch the gradient all-reduce and the grad norm (Megatron's, over the
# model-parallel group of one); the normaliser's counts need none (every rank holds all DP shares:
# train/step.py dp_totals_of), the finite-gradient and finite-weight flags none (replicas agree:
# _grads_finite, rl/guard.py), and the loss metrics of the 4 mini-batches are one all-reduce at
# the end; the sync none (each rank converts its own replica for its own engine:
# WeightStreamer(local=True)). Outside the stages, one
# MAX all-reduce of the step's per-stage memory peaks (rl/memory.py, 4 float64 values).
# A change that adds collectives fails here: update these numbers only on purpose.
WANT = {
    "tp2": {"rollout": {"all_gather_object": 1}, "reward": {"broadcast_object_list": 1},
            "update": {"all_reduce": 64}, "sync": {"all_reduce": 1, "gather": 1, "broadcast": 1},
            "other": {"all_reduce": 1}},
    "dp2": {"rollout": {"all_gather_object": 1}, "reward": {"broadcast_object_list": 1},
            "update": {"all_reduce": 9},  # sync: none
            "other": {"all_reduce": 1}},
}


def collectives_per_stage(root, layout):
    """One steady-state RL step of the demo's shape (32 prompts x 8, 4 mini-batches of 64, token
    budget) under TP=2 or DP=2: collectives and bytes per stage on this rank."""
    from megatron_dgpo.collective_count import CollectiveCounter, instrument_trainer

    tp = 2 if layout == "tp2" else 1
    cfg = make_cfg(os.path.join(root, f"coll_{layout}"), **{
        "algo.prompts_per_step": 32, "rollout.group_size": 8, "algo.steps": 3,
        "parallel.tensor_model_parallel_size": tp})
    tr = trainer(cfg)
    with CollectiveCounter() as cc:
        instrument_trainer(tr, cc)
        tr.step(0)
        cc.reset()
        row = tr.step(1)
    tr.close()
    got = cc.summary()
    ops = {k: v["ops"] for k, v in got.items()}
    detail = {"ops": ops, "bytes": {k: v["bytes"] for k, v in got.items()}, "table": cc.table(),
              "num_microbatches": row.get("num_microbatches"), "source": row.get("old_logp_source")}
    check(f"collectives_per_stage_{layout}_rank{dist.get_rank()}",
          ops == WANT[layout] and row.get("num_microbatches") == 1.0 and row.get("old_logp_source") == "rollout",
          detail)


def local_totals_equal_collective(root):
    """DP=2, 2 mini-batches: Policy.update's normaliser counts computed from every rank's share
    (`dp_totals_of`, no collective) and its metrics reduced once for the RL step
    (`reduce_deferred`) give the collective path's metrics and weights, bit for bit."""
    import megatron_dgpo.rl.policy as policy_mod

    cfg = make_cfg(os.path.join(root, "dp_totals"), **{"parallel.tensor_model_parallel_size": 1,
                                                        "algo.mini_batches": 2, "optim.lr": 1e-3})
    tr = trainer(cfg)
    batch = rollout_batch(tr, 13)
    b, _, _ = old_logp.with_old_logp(tr.policy, batch, "trainer", tr.temperature)
    twin = Policy(cfg)
    with torch.no_grad():
        for x, y in zip((p for c in twin.chunks for p in c.parameters()), (p for c in tr.policy.chunks for p in c.parameters())):
            x.copy_(y)
    twin.optimizer.reload_model_params()
    fast = tr.policy.update(b, temperature=tr.temperature, lr=cfg.optim.lr)
    real = policy_mod.train_step

    def collective(*a, **k):  # each step's own DP collectives, as a caller without the shares has
        k.pop("dp_totals"), k.pop("defer_stats")
        return real(*a, **k)

    policy_mod.train_step = collective
    try:
        slow = twin.update(b, temperature=tr.temperature, lr=cfg.optim.lr)
    finally:
        policy_mod.train_step = real
    skip = {"step_time_s", "tokens_per_s"}
    diff = {k: (f[k], s_[k]) for f, s_ in zip(fast, slow) for k in f if k not in skip and not
            (f[k] == s_[k] or (isinstance(f[k], float) and math.isnan(f[k]) and math.isnan(s_[k])))}
    same_keys = [sorted(set(f) - skip) == sorted(set(s_) - skip) for f, s_ in zip(fast, slow)]
    weights = max_diff(params(tr.policy), params(twin))
    tr.close()
    check(f"local_dp_totals_equal_collective_rank{dist.get_rank()}",
          len(fast) == len(slow) == 2 and all(same_keys) and not diff and weights == 0.0,
          {"diff": diff, "same_keys": same_keys, "weights": weights})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    root = os.path.dirname(os.path.abspath(args.out))
    run_cases((("shortcut", shortcut_equals_recompute), ("rollout_src", rollout_source_matches_trainer),
               ("collectives_tp2", lambda r: collectives_per_stage(r, "tp2")),
               ("collectives_dp2", lambda r: collectives_per_stage(r, "dp2")),
               ("dp_totals", local_totals_equal_collective)), root)
    # rank 1's checks travel to rank 0, which writes the results
    box = [RESULTS]
    all_results = [None] * dist.get_world_size()
    dist.all_gather_object(all_results, box[0])
    for r in all_results:
        RESULTS.update({k: v for k, v in r.items() if k not in RESULTS})
    write_results(args.out)


if __name__ == "__main__":
    main()
    sys.exit(0)
