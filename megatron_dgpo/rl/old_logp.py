"""Where the old log-probs (the pi_old of the policy ratio) of an RL step come from.

* `trainer`: a forward pass of the trainer over the whole batch before the update (recompute).
* `rollout`: the rollout engine's own log-probs of the sampled tokens (the engines return them).
* `auto` (default): `rollout` when they are the trainer's numbers, i.e. the embedded engine, which
  runs the trainer's own weights (synced after every step) in float32 like an fp32 trainer
  (measured `train_rollout_logp_gap` 3e-7 on the embedded task); `trainer` otherwise: SGLang's
  kernels and bf16/FP8 trainers differ from the engine by 0.007-0.018 per token, which the
  ratio must not absorb.

Independently of the source, a fully on-policy update (one mini-batch, one epoch) needs no old
log-probs at all: the update forward's own log-probs, detached, are pi_old (ratio 1, as verl and
TRL do). That skips the extra forward and is exact, not an approximation. Truncated IS
(`algo.tis_cap`) needs pi_old before the update, so it keeps the configured source.
"""
from __future__ import annotations

import math

SOURCES = ("auto", "trainer", "rollout")


def resolve_source(cfg) -> tuple[str, str]:
    """(`trainer` or `rollout`, why) for `cfg.algo.old_logp_source`."""
    src = cfg.algo.old_logp_source
    if src != "auto":
        return src, "set by algo.old_logp_source"
    if cfg.rollout.engine != "embedded":
        return "trainer", f"auto: the {cfg.rollout.engine} engine's log-probs are not the trainer's numbers"
    if cfg.parallel.params_dtype != "float32" or cfg.fp8.enabled:
        return "trainer", (f"auto: the trainer runs in {'fp8' if cfg.fp8.enabled else cfg.parallel.params_dtype}, "
                           "the embedded engine in float32")
    return "rollout", "auto: the embedded engine runs the trainer's weights in float32"


def on_policy(cfg) -> bool:
    """True when the update is one optimizer step over the batch: pi_old = pi_current, detached."""
    a = cfg.algo
    return a.mini_batches == 1 and a.epochs == 1 and a.tis_cap is None


def plan(cfg) -> str:
    """What an RL step does for its old log-probs: `on_policy`, `rollout` or `trainer`."""
    return "on_policy" if on_policy(cfg) else resolve_source(cfg)[0]


def describe(cfg) -> str:
    """The start-up log line."""
    src, why = resolve_source(cfg)
    if on_policy(cfg):
        return ("old log-probs: the update forward's own (one mini-batch, one epoch: on policy, no extra "
                f"forward); source otherwise {src} ({why})")
    return f"old log-probs: {src} ({why})"


def with_old_logp(policy, batch, how: str, temperature: float):
    """(batch ready for the update, train-vs-rollout gap or NaN, seconds spent).

    `on_policy` leaves `old_logp=None` (train_step then uses the forward's own, detached) and
    `rollout` takes the engine's; both leave the gap to the update's `rollout_logp_abs_diff`.
    `trainer` recomputes and measures the gap: the mean |log pi_train - log pi_rollout| over
    response tokens under the same weights (0 up to rounding when the engines agree)."""
    import time

    if how == "on_policy":
        return batch.with_old_logp(None), math.nan, 0.0
    if how == "rollout":
        return batch.with_old_logp(batch.rollout_logp), math.nan, 0.0
    t0 = time.perf_counter()
    old = policy.logprobs(batch, temperature)
    mask = batch.loss_mask
    gap = float(((old - batch.rollout_logp).abs() * mask).sum() / mask.sum().clamp(min=1))
    return batch.with_old_logp(old), gap, time.perf_counter() - t0
