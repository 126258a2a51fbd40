"""What keeps a long run from serving or saving a broken policy.

- `require_finite_weights`: after every optimizer step, before every weight sync and before every
  checkpoint, all ranks agree (one all-reduce of a flag) that every parameter is finite. An
  optimizer step that made a weight non-finite (finite gradients but an absurd learning rate, an
  overflow in the update) aborts the run with `NonFiniteWeightsError` before anything is synced or
  saved: the last checkpoint stays the last good state.
- `CollapseMonitor`: a policy that diverged (or a task that is solved) gives every group the same
  reward, so no step has a gradient and the run would go on doing nothing. After
  `algo.max_steps_without_variance` consecutive such steps the run aborts with `PolicyCollapsed`.

Non-finite *gradients* are handled per optimizer step in train.step.train_step (the step is
skipped, weights untouched) and counted by the trainer (`algo.max_skipped_steps`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class NonFiniteWeightsError(RuntimeError):
    """Some parameter is NaN or infinite: nothing may be synced or saved."""


class TooManySkippedSteps(RuntimeError):
    """More than algo.max_skipped_steps RL steps had a non-finite loss or gradient."""


class PolicyCollapsed(RuntimeError):
    """Too many consecutive RL steps without any group with reward variance."""


def _local_nonfinite(model_chunks) -> list[str]:
    named = [(f"chunk{i}.{n}" if len(model_chunks) > 1 else n, p)
             for i, chunk in enumerate(model_chunks) for n, p in chunk.named_parameters()]
    if not named:
        return []
    # The sum of a tensor is non-finite iff some element is (or it overflows, which for a float32
    # sum of finite weights would mean |w| ~ 1e38 / n: broken too). One host sync for all of them.
    sums = torch.stack([p.detach().sum(dtype=torch.float32) for _, p in named])
    ok = torch.isfinite(sums)
    if bool(ok.all()):
        return []
    return [name for (name, _), good in zip(named, ok.tolist()) if not good]


def weights_finite(model_chunks, group=None) -> tuple[bool, list[str]]:
    """(all parameters of all ranks of `group` finite, names of this rank's non-finite ones).
    Collective over `group` (default: all ranks); none for a group of one."""
    bad = _local_nonfinite(model_chunks)
    flag = torch.tensor(float(bool(bad)))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return float(flag) == 0.0, bad


def require_finite_weights(model_chunks, when: str, group=None) -> None:
    """Raise NonFiniteWeightsError on every rank of `group` (default: all ranks) when any of
    them holds a non-finite parameter. Data-parallel replicas hold the same weights (the same
    reduced gradients, the same optimizer step), so the model-parallel group decides for all of
    them, without a collective over DP."""
    ok, bad = weights_finite(model_chunks, group)
    if not ok:
        names = (f" (this rank: {', '.join(bad[:3])}" + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
                 + ")") if bad else ""
        raise NonFiniteWeightsError(
            f"non-finite weights {when}{names}: aborting before they are synced to the rollout engine or "
            "saved; the last checkpoint is the last good state (lower optim.lr / check the data, then --resume)")


class CollapseMonitor:
    """Counts consecutive RL steps in which no group had reward variance."""

    def __init__(self, limit: int, streak: int = 0):
        self.limit = int(limit)
        self.streak = int(streak)

    def update(self, step: int, had_variance: bool, reward_mean: float) -> None:
        self.streak = 0 if had_variance else self.streak + 1
        if self.limit and self.streak >= self.limit:
            raise PolicyCollapsed(
                f"RL step {step}: {self.streak} consecutive steps without a group with reward variance "
                f"(reward mean {reward_mean:.3f}): the policy diverged or the task is solved; nothing more "
                "can be learned (algo.max_steps_without_variance, 0 disables)")
