"""The RL loop: prompts -> rollout -> reward -> advantage -> old log-probs -> policy update
(DGPO on vocab-parallel logits) -> weight sync, with evaluation, metrics and checkpoints."""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_dgpo.advantage import group_advantages, tis_weights
from megatron_dgpo.config import TrainConfig
from megatron_dgpo.rl import old_logp, rollout_stage
from megatron_dgpo.rl.engines import EngineMemory, build_engine, sync_weights
from megatron_dgpo.rl.evaluate import evaluate
from megatron_dgpo.rl.guard import CollapseMonitor, TooManySkippedSteps, require_finite_weights  # noqa: F401
from megatron_dgpo.rl.memory import StageMemory
from megatron_dgpo.loss.diagnostics import summarize as summarize_diagnostics
from megatron_dgpo.rl.metrics import MetricsLogger, complete_row, plot_run
from megatron_dgpo.rl.policy import Policy
from megatron_dgpo.rl.setup import load_data, load_tokenizer_for
from megatron_dgpo.rl.warmstart import is_cached, warm_start
from megatron_dgpo.rollout import SamplingParams
from megatron_dgpo.train import pad_sequences


def build_batch(ro, adv, keep, pad_id: int, multiple: int):
    """Rows kept by the zero-variance filter (prompt + response tokens, response loss mask),
    plus empty rows (no loss token) up to a multiple of mini-batches x data-parallel size: they
    change neither the loss nor its normaliser."""
    idx = [i for i, k in enumerate(keep.tolist()) if k]
    s = [ro.samples[i] for i in idx]
    prompts, responses = [x.prompt_ids for x in s], [x.response_ids for x in s]
    logps, advs = [x.logprobs for x in s], adv[idx].tolist()
    for _ in range(-len(s) % multiple):
        prompts.append([pad_id]), responses.append([]), logps.append([]), advs.append(0.0)
    return pad_sequences(prompts, responses, torch.tensor(advs), rollout_logp=logps, pad_token_id=pad_id)


class RLTrainer:
    """Holds the run's state; `step()` is one RL step, `run()` the whole job."""

    def __init__(self, cfg: TrainConfig, log=print):
        from megatron_dgpo import checkpoint, distributed

        self.cfg = cfg
        distributed.initialize(tensor_model_parallel_size=cfg.parallel.tensor_model_parallel_size,
                               pipeline_model_parallel_size=cfg.parallel.pipeline_model_parallel_size,
                               seed=cfg.seed)
        self.rank = dist.get_rank()
        self.say = log if self.rank == 0 else (lambda *a, **k: None)
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = str(self.out / "checkpoints")
        from megatron_dgpo.rundir import open_run_dir

        self.run_dir = open_run_dir(cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite)
        if self.run_dir.note:
            self.say(self.run_dir.note)
        self.tokenizer = load_tokenizer_for(cfg, self.out)
        self.train_set, self.eval_set, self.sampler = load_data(cfg, self.tokenizer, self.say)
        self.pad_id = self.tokenizer.pad_token_id or 0

        self.policy = Policy(cfg)
        self.start_step = 0
        self.skipped = 0  # non-finite updates so far (algo.max_skipped_steps); kept across resumes
        self.collapse = CollapseMonitor(cfg.algo.max_steps_without_variance)
        resume_from = self.run_dir.resume_from
        if resume_from is not None:
            self.start_step = checkpoint.load_checkpoint(resume_from, self.policy.chunks, self.policy.optimizer)
            extra = checkpoint.read_meta(resume_from)["extra"]
            self.sampler.load_state_dict(int(extra["sampler"]))
            self.skipped = int(extra.get("skipped", 0))
            self.collapse.streak = int(extra.get("no_variance_streak", 0))
            self.say(f"resumed from {resume_from} at RL step {self.start_step}")
        else:
            ws = cfg.warmstart
            sft = ws.sft_steps > 0
            if ws.init_hf_path and not (sft and is_cached(cfg)):  # SFT starts from the HF weights
                self.policy.load_hf(ws.init_hf_path)
            if sft:
                folder, trained = warm_start(self.policy, self.train_set.examples, self.tokenizer, cfg, self.say)
                if trained:  # fresh optimizer state for RL, in place: never two policies at once
                    self.policy.reset_optimizer()
                self.policy.load_hf(folder)

        self.engine, self.distributed_rollout = build_engine(cfg, self.tokenizer, self.rank)
        self.engine_memory = EngineMemory(cfg, self.engine)
        self.stage_memory = StageMemory()  # mem/<stage>_peak_gb of every step (rl/memory.py)
        self.sync(self.start_step)
        self.reward_fn = _reward_fn(cfg, self.rank)
        self.logger = MetricsLogger(str(self.out), enabled=self.rank == 0, tensorboard=cfg.tensorboard,
                                    resume=resume_from is not None)
        self.logger.truncate_after(self.start_step)
        ro = cfg.rollout
        self.sampling = SamplingParams(n=ro.group_size, temperature=ro.temperature, top_p=ro.top_p,
                                       top_k=ro.top_k, max_new_tokens=ro.max_new_tokens)
        self.temperature = self.sampling.logprob_temperature
        self.old_logp_plan = old_logp.plan(cfg)  # on_policy | rollout | trainer
        self.say(old_logp.describe(cfg))

    def sync(self, version: int) -> None:
        from megatron.core import parallel_state as ps

        # over the model-parallel group: data-parallel replicas hold the same weights (rl/guard.py)
        require_finite_weights(self.policy.chunks, f"before the weight sync of version {version}",
                               group=ps.get_model_parallel_group())
        sync_weights(self.policy, self.engine, version=version, distributed=self.distributed_rollout,
                     memory=self.engine_memory)

    def evaluate(self, step: int) -> dict:
        t0 = time.perf_counter()
        m = evaluate(self.engine, self.reward_fn, self.tokenizer, self.eval_set.examples, self.cfg,
                     distributed=self.distributed_rollout, seed=self.cfg.seed, wait_timeout_s=_wait_timeout(self.cfg))
        self.logger.log({"step": step, "kind": "eval", **{f"eval_{k}": v for k, v in m.items()},
                         "eval_s": time.perf_counter() - t0})
        self.say(f"[eval step {step}] held-out accuracy {m['accuracy']:.3f} on {int(m['num_problems'])} prompts")
        return m

    def step(self, step: int) -> dict:
        """RL step `step` (0-based): prompts -> rollout -> reward -> advantages -> old log-probs
        -> policy update -> weight sync. Returns the metrics row it logged."""
        cfg, algo = self.cfg, self.cfg.algo
        t0 = time.perf_counter()
        # Reproducible rollouts, also after a resume: the seed depends only on the step.
        self.sampling.seed = (cfg.seed + 7919 * algo.seed) * 100003 + step
        examples = self.sampler.next_batch()
        self.stage_memory.begin("rollout")
        ro = rollout_stage.collect(self.engine, self.reward_fn, self.tokenizer, examples, self.sampling,
                                   distributed=self.distributed_rollout, wait_timeout_s=_wait_timeout(cfg))
        self.stage_memory.end()
        adv, keep, adv_stats = group_advantages(
            ro.rewards, cfg.rollout.group_size, scale="std" if algo.advantage == "grpo" else "none",
            filter_zero_variance=algo.filter_zero_variance)
        row = {"step": step + 1, "kind": "train", "reward_mean": sum(ro.rewards) / len(ro.rewards),
               "accuracy": sum(r > 0.5 for r in ro.rewards) / len(ro.rewards),
               "response_len": ro.num_response_tokens / len(ro.samples), **adv_stats, **ro.timings,
               "rollout_tokens": ro.num_tokens, "aborted_samples": ro.reward_stats.get("aborted", 0.0)}
        self.collapse.update(step + 1, adv_stats["adv/zero_variance_frac"] < 1.0, row["reward_mean"])
        if int(keep.sum()) == 0:
            row["skipped"] = "no group with reward variance"
        else:
            self.engine_memory.release()
            batch = build_batch(ro, adv, keep, self.pad_id, multiple=_dp_size() * algo.mini_batches)
            self.stage_memory.begin("old_logp")
            batch, gap, row["old_logp_s"] = old_logp.with_old_logp(self.policy, batch, self.old_logp_plan,
                                                                   self.temperature)
            self.stage_memory.end()
            row["old_logp_source"] = self.old_logp_plan
            if algo.tis_cap is not None:
                w = tis_weights(batch.old_logp, batch.rollout_logp, cap=algo.tis_cap)
                batch = dataclasses.replace(batch, advantages=batch.advantages[:, None] * w)
            updates, t1 = [], time.perf_counter()
            self.stage_memory.begin("update")
            for _ in range(algo.epochs):
                updates += self.policy.update(batch, temperature=self.temperature, lr=cfg.optim.lr)
            self.stage_memory.end()
            if math.isnan(gap) and updates:  # not recomputed: the first update ran on the rollout's weights
                gap = updates[0].get("rollout_logp_abs_diff", gap)
            row.update(summarize_diagnostics(_merge_updates(updates), updates), train_rollout_logp_gap=gap, update_s=time.perf_counter() - t1)
            row["update_tokens_per_s"] = row.get("tokens", 0.0) / max(row["update_s"], 1e-9)
            if not math.isfinite(row.get("loss", float("nan"))) or row.get("update_successful", 1.0) < 1:
                self.skipped += 1
                row["skipped"] = "non-finite loss or gradient"
                self.say(f"step {step + 1}: update skipped ({row['skipped']}), "
                         f"{self.skipped}/{algo.max_skipped_steps}")
                if self.skipped >= algo.max_skipped_steps:
                    raise TooManySkippedSteps(f"{self.skipped} non-finite updates; aborting (algo.max_skipped_steps)")
        t1 = time.perf_counter()
        self.stage_memory.begin("sync")
        self.sync(step + 1)
        self.stage_memory.end()
        row["sync_s"] = time.perf_counter() - t1
        row.update(self.stage_memory.collect())  # collective: the max over ranks
        row["step_s"] = time.perf_counter() - t0
        row["tokens_per_s"] = row["rollout_tokens"] / max(row["step_s"], 1e-9)
        row = complete_row(row)
        self.logger.log(row)
        return row

    def save(self, step: int) -> None:
        from megatron_dgpo import checkpoint

        require_finite_weights(self.policy.chunks, f"before saving the checkpoint of step {step}")
        checkpoint.save_checkpoint(self.ckpt_dir, step, self.policy.chunks, self.policy.optimizer,
                                   extra={"sampler": self.sampler.state_dict(), "skipped": self.skipped,
                                          "no_variance_streak": self.collapse.streak}, keep_last=2,
                                   optimizer_format=self.cfg.optimizer_checkpoint_format,
                                   writers=self.cfg.checkpoint_writers)

    def run(self) -> dict:
        cfg = self.cfg
        summary = {"eval_before": self.evaluate(self.start_step) if self.start_step == 0 else None}
        progress = _progress(self.rank, self.start_step, cfg.algo.steps)
        for step in range(self.start_step, cfg.algo.steps):
            row = self.step(step)
            progress.update(1)
            progress.set_postfix(reward=f"{row['reward_mean']:.3f}", ln=f"{row.get('ln_frac', 0):.3f}",
                                 hp=f"{row.get('hp_frac', 0):.3f}")
            last = step + 1 == cfg.algo.steps
            if cfg.eval.every and (step + 1) % cfg.eval.every == 0 and not last:
                self.evaluate(step + 1)
            if last or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                self.save(step + 1)
        progress.close()
        self.say(self.stage_memory.summary())
        summary["memory_peak_gb"] = dict(self.stage_memory.run_max)
        # Resumed after the final checkpoint: the final evaluation may already be logged.
        summary["eval_after"] = self._logged_eval(cfg.algo.steps) or self.evaluate(cfg.algo.steps)
        if self.rank == 0:
            summary["plot"] = plot_run(str(self.out / "metrics.jsonl"), str(self.out / "training_curves.png"),
                                       title=f"{cfg.loss.name.upper()} on {cfg.data.task}")
        self.close()
        return summary

    def _logged_eval(self, step: int) -> dict | None:
        """The eval metrics already in metrics.jsonl for `step` on a run resumed at `step`, else
        None (the same answer on every rank)."""
        found = [None]
        if self.rank == 0 and self.start_step == step and self.logger.path.exists():
            from megatron_dgpo.rl.metrics import read_metrics

            rows = [r for r in read_metrics(str(self.logger.path)) if r.get("kind") == "eval" and r.get("step") == step]
            if rows:
                found[0] = {k[5:]: v for k, v in rows[-1].items() if k.startswith("eval_")}
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(found, src=0)
        return found[0]

    def close(self) -> None:
        self.logger.close()
        self.policy.close()  # freed now, not at a later cyclic gc (train/lifetime.py)
        if hasattr(self.reward_fn, "close"):
            self.reward_fn.close()
        self.run_dir.close()


def run(cfg: TrainConfig, log=print) -> dict:
    return RLTrainer(cfg, log).run()


def _merge_updates(updates: list[dict]) -> dict:
    """Metrics of one RL step from its mini-batch updates: counts and times summed, the last lr,
    means (the loss too) weighted by their own token counts (W means by LN / HP tokens, the rest
    by valid tokens)."""
    from megatron_dgpo.train.step import _WEIGHT_OF

    out = {}
    for key in updates[0]:
        vals = [u[key] for u in updates]
        if isinstance(vals[0], list):  # a vector of counts (loss/diagnostics.py histograms)
            out[key] = [sum(x) for x in zip(*vals)]
        elif key.endswith("_tokens") or key in ("tokens", "step_time_s", "computed_tokens"):
            out[key] = sum(vals)
        elif key in ("lr", "num_microbatches", "normalizer"):
            out[key] = vals[-1]
        elif key == "update_successful":
            out[key] = min(vals)
        else:
            weights = [u.get(_WEIGHT_OF.get(key, "valid_tokens"), 1.0) for u in updates]
            out[key] = sum(v * w for v, w in zip(vals, weights)) / sum(weights) if sum(weights) > 0 else 0.0
    out.pop("tokens_per_s", None)  # the step's rates are set by RLTrainer.step
    return out


def _wait_timeout(cfg):
    """How long ranks without an engine wait for rank 0's SGLang rollout (None: the default)."""
    return cfg.rollout.sglang.wait_timeout_s if cfg.rollout.engine == "sglang" else None


def _dp_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_world_size()


def _reward_fn(cfg, rank):
    from megatron_dgpo.reward import make_reward_fn

    if rank != 0:  # rewards are computed on rank 0 and broadcast
        return None
    return make_reward_fn(cfg.reward)


class _NoBar:
    def update(self, *_):
        pass

    def set_postfix(self, **_):
        pass

    def close(self):
        pass


def _progress(rank, start, total):
    if rank != 0:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="RL steps", dynamic_ncols=True)
