"""Held-out evaluation through the rollout engine: accuracy (avg@k) and pass@k."""
from __future__ import annotations

from megatron_dgpo.eval.passk import benchmark_metrics
from megatron_dgpo.rl import rollout_stage
from megatron_dgpo.rollout import SamplingParams


def evaluate(engine, reward_fn, tokenizer, examples, cfg, *, distributed: bool, seed: int = 0,
             wait_timeout_s=None) -> dict:
    ev, ro = cfg.eval, cfg.rollout
    examples = [examples[i] for i in range(min(ev.num_prompts, len(examples)))]
    k = ev.samples_per_prompt
    sampling = SamplingParams(n=k, temperature=ev.temperature, top_p=ro.top_p if ev.temperature > 0 else 1.0,
                              top_k=ro.top_k if ev.temperature > 0 else -1,
                              max_new_tokens=ro.max_new_tokens, seed=seed)
    out = rollout_stage.collect(engine, reward_fn, tokenizer, examples, sampling, distributed=distributed,
                                wait_timeout_s=wait_timeout_s)
    per_problem = [out.rewards[i * k:(i + 1) * k] for i in range(len(examples))]
    metrics = benchmark_metrics(per_problem, ks=sorted({1, k}))
    metrics["accuracy"] = sum(out.rewards) / max(len(out.rewards), 1)
    return metrics
