"""torchrun worker (2 processes): the RL loop end to end on the embedded engine.

For TP=2, PP=2 (with TIS, rollout old log-probs, packed sequences) and DP=2 (3 mini-batches:
padded rows; token-budget micro-batches): a
couple of RL steps run, metrics.jsonl has the contract's columns, and after every weight sync the
engine's log-probs equal the trainer's (Megatron) log-probs. With TP=2: save at step 2, resume in a fresh trainer, continue:
identical to the uninterrupted run; NaN logits skip the update and abort the run in time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.distributed as dist

from megatron_dgpo.config import TrainConfig
from megatron_dgpo.configio import load_config
from megatron_dgpo.rl.metrics import REQUIRED, STAGE_TIMES, TRAIN_KEYS, read_metrics
from megatron_dgpo.train import pad_sequences
from megatron_dgpo.trainer import RLTrainer
from results import check, run_cases

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "configs", "embedded_cpu.yaml")
COMPARED = ("reward_mean", "loss", "grad_norm", "ln_frac", "hp_frac", "entropy")


class DenseReward:
    """A reward with variance in almost every group (longer answers score more), so that every
    step updates the policy: the loop's mechanics are under test here, not learning."""

    def score(self, responses, ground_truths):
        return [min(len(r), 5) / 5.0 for r in responses], {}


def trainer(cfg) -> RLTrainer:
    tr = RLTrainer(cfg, log=lambda *a, **k: None)
    if dist.get_rank() == 0:
        tr.reward_fn = DenseReward()
    return tr


def make_cfg(out, **over):
    # TP=2 unless overridden: the tensor-parallel, vocab-parallel path (the demo itself runs DP=2)
    base = dict(**{"parallel.tensor_model_parallel_size": 2, "algo.steps": 2, "warmstart.sft_steps": 4, "warmstart.sft_batch_size": 16,
                   "eval.num_prompts": 8, "algo.prompts_per_step": 4, "rollout.group_size": 4,
                   "model.hidden_size": 64, "model.ffn_hidden_size": 128, "tensorboard": False,
                   "data.arithmetic.num_train": 200, "data.arithmetic.num_eval": 16,
                   "optim.lr": 3e-3, "output_dir": out, "warmstart.cache_dir": os.path.join(out, "cache")})
    base.update(over)
    return load_config(TrainConfig, CONFIG, [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in base.items()])


def engine_matches_trainer(tr: RLTrainer) -> float:
    """Max |log pi_engine - log pi_trainer| over the answer tokens of a few held-out prompts."""
    ex = tr.eval_set.examples[:6]
    answers = [tr.tokenizer.encode(e.ground_truth, add_special_tokens=False) + [tr.tokenizer.eos_token_id] for e in ex]
    batch = pad_sequences([e.prompt_ids for e in ex], answers, torch.ones(len(ex)), pad_token_id=tr.pad_id)
    mine = tr.policy.logprobs(batch, tr.temperature)
    with torch.no_grad():
        logits = tr.engine.model(input_ids=batch.tokens).logits.float() / tr.temperature
        theirs = torch.zeros_like(mine)
        theirs[:, 1:] = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.tokens[:, 1:, None]).squeeze(-1)
    return float(((mine - theirs).abs() * batch.loss_mask).max())


def run_layout(name, out, **over):
    tr = trainer(make_cfg(out, **over))
    gaps = [engine_matches_trainer(tr)]
    rows = []
    for step in range(tr.cfg.algo.steps):
        rows.append(tr.step(step))
        gaps.append(engine_matches_trainer(tr))
    tr.close()
    check(f"{name}_engine_equals_trainer", max(gaps) < 1e-4, gaps)
    if dist.get_rank() == 0:
        got = read_metrics(os.path.join(out, "metrics.jsonl"))
        train_rows = [r for r in got if r["kind"] == "train"]
        missing = [k for k in set(REQUIRED) | set(TRAIN_KEYS) if any(k not in r for r in train_rows)]
        check(f"{name}_metrics_columns", len(train_rows) == tr.cfg.algo.steps and not missing, missing)
        # per-stage times add up to (at most) the step; the step's rate counts all its tokens
        timing = [(sum(r[k] for k in STAGE_TIMES), r["step_s"], r["tokens_per_s"], r["update_tokens_per_s"],
                   r["rollout_tokens"], r["tokens"]) for r in train_rows]
        check(f"{name}_metrics_times", all(
            isinstance(r["step"], int) and 0 < st <= s and tps > 0 and utps > 0 and math.isclose(tps, rt / s)
            for r, (st, s, tps, utps, rt, t) in zip(train_rows, timing)), timing)
        check(f"{name}_trained", all("skipped" not in r and "loss" in r for r in train_rows), train_rows)
    return tr, rows


class NoVarianceReward:
    def score(self, responses, ground_truths):
        return [1.0] * len(responses), {}


def skipped_step_writes_every_key(root):
    """A step without reward variance (no update) still writes every documented key: the update's
    metrics NaN, the times of stages it did not run 0, step an integer."""
    tr = trainer(make_cfg(os.path.join(root, "novar"), **{"algo.steps": 1}))
    if dist.get_rank() == 0:
        tr.reward_fn = NoVarianceReward()
    tr.step(0)
    tr.close()
    if dist.get_rank() == 0:
        (row,) = [r for r in read_metrics(os.path.join(root, "novar", "metrics.jsonl")) if r["kind"] == "train"]
        missing = [k for k in TRAIN_KEYS if k not in row]
        ok = (not missing and "skipped" in row and isinstance(row["step"], int) and math.isnan(row["loss"])
              and row["update_s"] == 0.0 and row["sync_s"] > 0 and math.isnan(row["update_tokens_per_s"]))
        check("skipped_step_writes_every_key", ok, {"missing": missing, "row": row})


def nonfinite_updates_are_skipped(root):
    """NaN logits in the trainer's forward (a hook on the output layer; the engine is untouched):
    the update is skipped with the weights unchanged, and the run aborts after
    algo.max_skipped_steps such steps, counted across a checkpoint and --resume."""
    from megatron_dgpo.model.builder import unwrap_model
    from megatron_dgpo.trainer import TooManySkippedSteps

    def nan_logits(tr):
        last = unwrap_model(tr.policy.chunks)[-1]
        return last.output_layer.register_forward_hook(lambda m, i, out: (out[0] * float("nan"), *out[1:]))

    cfg = {"algo.steps": 5, "algo.max_skipped_steps": 2}
    tr = trainer(make_cfg(os.path.join(root, "nan"), **cfg))
    before = [p.detach().clone() for c in tr.policy.chunks for p in c.parameters()]
    hook = nan_logits(tr)
    row = tr.step(0)
    same = all(torch.equal(a, p) for a, p in zip(before, (p for c in tr.policy.chunks for p in c.parameters())))
    hook.remove()
    tr.save(1)
    tr.close()
    tr = trainer(make_cfg(os.path.join(root, "nan"), **cfg, resume=True))  # one skip already counted
    hook = nan_logits(tr)
    try:
        tr.step(1)
        aborted = False
    except TooManySkippedSteps:
        aborted = True
    hook.remove()
    tr.close()
    check("nonfinite_update_skipped", "non-finite" in str(row.get("skipped")) and same and aborted,
          {"skipped": row.get("skipped"), "weights_unchanged": same, "aborted": aborted})


def policy_mechanics(root):
    """bf16 model: HF weights loaded after the optimizer was built survive its first step (the
    fp32 master copies are refreshed). A batch without loss tokens takes no optimizer step, even
    with Adam momentum from an earlier one."""
    from megatron_dgpo.rl.policy import Policy
    from megatron_dgpo.train import train_step

    cfg = make_cfg(os.path.join(root, "policy"), **{"parallel.params_dtype": "bfloat16", "optim.lr": 0.0,
                                                     "algo.mini_batches": 1})
    from megatron_dgpo import distributed as mdist

    mdist.initialize(tensor_model_parallel_size=2, pipeline_model_parallel_size=1, seed=cfg.seed)
    src = Policy(cfg)
    with torch.no_grad():
        for p in src.chunks[0].parameters():
            p.add_(0.5)
    folder = os.path.join(root, "policy", "hf")
    src.save_hf(folder)
    dist.barrier()
    pol = Policy(cfg)
    pol.load_hf(folder)
    params = lambda m: [p.detach().float().clone() for c in m.chunks for p in c.parameters()]  # noqa: E731
    want = params(src)
    batch = pad_sequences([[1, 2, 3]] * 4, [[4, 5]] * 4, torch.tensor([1.0, -1.0, 1.0, -1.0]))
    pol.update(batch, temperature=1.0, lr=0.0)
    kept = max(float((a - b).abs().max()) for a, b in zip(params(pol), want))
    check("bf16_loaded_weights_survive_first_step", kept == 0.0, kept)

    push = pad_sequences([[1, 2, 3]] * 4, [[4, 5]] * 4, torch.ones(4))
    pol.update(push, temperature=1.0, lr=1e-2)  # a non-zero gradient: builds Adam momentum
    before = params(pol)
    empty = pad_sequences([[1, 2, 3]] * 4, [[]] * 4, torch.zeros(4))
    m = train_step(pol.chunks, pol.optimizer, empty, cfg.loss, micro_batch_size=4, lr=1e-2)
    moved = max(float((a - b).abs().max()) for a, b in zip(params(pol), before))
    check("empty_batch_takes_no_step", moved == 0.0 and m["update_successful"] == 1.0, moved)


def resume_same_trajectory(root):
    full_dir, part_dir = os.path.join(root, "full"), os.path.join(root, "part")
    full = trainer(make_cfg(full_dir, **{"algo.steps": 4}))
    full_rows = [full.step(s) for s in range(4)]
    full.close()
    part = trainer(make_cfg(part_dir, **{"algo.steps": 4}))
    for s in range(2):
        part.step(s)
    part.save(2)
    part.close()
    resumed = trainer(make_cfg(part_dir, **{"algo.steps": 4, "resume": True}))
    ok_start = resumed.start_step == 2
    rows = [resumed.step(s) for s in range(2, 4)]
    resumed.close()
    diffs = {k: [abs(a.get(k, 0) - b.get(k, 0)) for a, b in zip(full_rows[2:], rows)] for k in COMPARED}
    worst = max(max(v) for v in diffs.values())
    updated = all("loss" in r for r in full_rows)
    check("resume_continues_same_trajectory", ok_start and updated and worst < 1e-6,
          {"start": resumed.start_step, "updated": updated, **diffs})


def nonfinite_on_one_dp_rank(root):
    """DP=2, NaN hidden states on rank 1 only: rank 0's own gradients are finite, but the DDP all-reduce
    carries the NaN into its sums, so both ranks skip the update without a collective of their own
    (train/step.py _grads_finite) and keep the same, unchanged weights."""
    from megatron_dgpo.model.builder import unwrap_model

    tr = trainer(make_cfg(os.path.join(root, "nan_dp"), **{"parallel.tensor_model_parallel_size": 1}))
    before = [p.detach().clone() for c in tr.policy.chunks for p in c.parameters()]
    hook = None
    if dist.get_rank() == 1:
        last = unwrap_model(tr.policy.chunks)[-1]
        hook = last.decoder.final_layernorm.register_forward_hook(lambda m, i, out: out * float("nan"))
    row = tr.step(0)
    if hook is not None:
        hook.remove()
    diff = [float((a - p).abs().max()) for a, p in zip(before, (p for c in tr.policy.chunks for p in c.parameters()))]
    same = max(diff) == 0.0
    flags = [None, None]
    dist.all_gather_object(flags, "non-finite" in str(row.get("skipped")))
    tr.close()
    check("nonfinite_on_one_dp_rank_skipped_everywhere", all(flags) and same,
          {"skipped_per_rank": flags, "weights_unchanged": same, "row": {k: v for k, v in row.items() if k in ("update_successful", "skipped", "grad_norm", "loss")},
           "diff": diff[:8]})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    root = os.path.dirname(os.path.abspath(args.out))  # the launcher's temp dir, the same for all ranks
    run_cases((
        # TP=2 runs the embedded default's layout otherwise (shared prompt prefixes).
        ("tp2", lambda r: run_layout("tp2", os.path.join(r, "tp2"))),
        # PP=2 also runs the truncated-IS correction (per-token advantages) and old log-probs
        # taken from the rollout engine.
        # PP=2 also packs sequences (THD, SDPA attention) into token-budget micro-batches.
        ("pp2", lambda r: run_layout("pp2", os.path.join(r, "pp2"), **{
            "parallel.tensor_model_parallel_size": 1, "parallel.pipeline_model_parallel_size": 2,
            "algo.tis_cap": 2.0, "algo.old_logp_source": "rollout", "parallel.attention_backend": "sdpa",
            "algo.pack_sequences": True, "algo.share_prompt_prefix": False, "algo.max_tokens_per_micro_batch": 64})),
        # DP=2 with token-budget micro-batches (token-balanced DP shares), old log-probs
        # recomputed by the trainer (the default `auto` takes the embedded engine's).
        ("dp2", lambda r: run_layout("dp2", os.path.join(r, "dp2"), **{
            "parallel.tensor_model_parallel_size": 1, "algo.mini_batches": 3, "algo.old_logp_source": "trainer",
            "algo.max_tokens_per_micro_batch": 48, "algo.share_prompt_prefix": False})),
        ("novar", skipped_step_writes_every_key),
        ("resume", lambda r: resume_same_trajectory(os.path.join(r, "resume"))),
        ("nonfinite", nonfinite_updates_are_skipped),
        ("nonfinite_dp", nonfinite_on_one_dp_rank),
        ("policy", policy_mechanics),
    ), root, out=args.out)


if __name__ == "__main__":
    main()
    sys.exit(0)
