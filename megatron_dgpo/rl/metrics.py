"""Per-step metrics: metrics.jsonl and TensorBoard in the output folder (rank 0), and the summary
plot of a run."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

# The columns every RL step writes (issue contract); more keys may follow.
REQUIRED = ("step", "reward_mean", "accuracy", "entropy", "ln_frac", "hp_frac", "w_ln_mean", "w_hp_mean",
            "approx_kl", "grad_norm", "train_rollout_logp_gap", "tokens_per_s")

# Every key of a train row ("kind": "train"), present on every row. `step` is an integer (1-based,
# the RL steps done). A step skipped because no group had reward variance (row "skipped") runs no
# update: the update's metrics are NaN there (written as `NaN`, which Python's json reads), and
# the times of the stages it did not run are 0.0. NaN also marks a value that is undefined on an
# updated step (e.g. `train_rollout_logp_gap` with `algo.old_logp_source: rollout`).
TRAIN_KEYS = {
    "step": "RL step, integer",
    "reward_mean": "mean reward of the rollouts", "accuracy": "fraction of rollouts with reward > 0.5",
    "response_len": "mean response tokens per rollout",
    "loss": "policy loss (token-weighted over the step's updates)", "entropy": "mean token entropy",
    "ln_frac": "fraction of LN tokens", "hp_frac": "fraction of HP tokens",
    "w_ln_mean": "mean W_logp on LN tokens", "w_hp_mean": "mean W_logp on HP tokens",
    "approx_kl": "approximate KL(old || new)", "grad_norm": "gradient norm (token-weighted mean over updates)",
    "train_rollout_logp_gap": "mean |log pi_train - log pi_rollout| on response tokens",
    "tokens": "non-pad tokens trained on (all updates)",
    "computed_tokens": "tokens the model computed in the updates, padding included",
    "num_microbatches": "micro-batches of the last update on this rank",
    "rollout_s": "generation (and gather) time", "reward_s": "reward time",
    "old_logp_s": "old log-prob forward time (0 when not recomputed)",
    "old_logp_source": "where pi_old came from: trainer (recomputed), rollout (the engine's) or on_policy (the update's own)", "update_s": "policy update time",
    "sync_s": "weight sync to the rollout engine", "step_s": "the whole RL step",
    "rollout_tokens": "prompt + response tokens of every rollout sample of the step",
    "tokens_per_s": "rollout_tokens / step_s: throughput of the whole RL step",
    "update_tokens_per_s": "tokens / update_s: throughput of the policy update alone",
}
# Eval rows ("kind": "eval"): eval_* metrics of rl.evaluate, and eval_s (its wall time).
STAGE_TIMES = ("rollout_s", "reward_s", "old_logp_s", "update_s", "sync_s")
# Peak memory of each stage, per rank, the maximum over ranks (rl/memory.py). Source: on CUDA
# torch.cuda.max_memory_allocated (live tensor bytes; the peak is reset at each stage's start), on
# CPU the process's peak resident set size during the stage (VmHWM, reset through
# /proc/self/clear_refs): everything the rank's process holds. 0.0 for a stage that did not run.
MEMORY_KEYS = {
    "mem/rollout_peak_gb": "peak memory per rank during rollout and reward (GB)",
    "mem/old_logp_peak_gb": "peak memory per rank during the old log-prob forward (GB)",
    "mem/update_peak_gb": "peak memory per rank during the policy update (GB)",
    "mem/sync_peak_gb": "peak memory per rank during the weight sync (GB)",
}
TRAIN_KEYS.update(MEMORY_KEYS)
# What the losses do on the trust-region boundary (megatron_dgpo/loss/diagnostics.py): W_p =
# W_logp / pi on LN / HP tokens from an exactly reduced histogram (quantiles within one bin, a
# factor 10^(1/4); max = the upper edge of the highest non-empty bin), NaN without such tokens.
DIAGNOSTIC_KEYS = {
    **{f"wp_{r}_{q}": f"{q} of W_p on {r.upper()} tokens" for r in ("ln", "hp") for q in ("p50", "p90", "p99", "max")},
    "grad_share_ln": "LN share of the logit-gradient mass sum |A| W_logp (1 - pi) (estimate, loss/diagnostics.py)",
    "grad_share_hp": "HP share of the same",
    "ln_lowp_frac": "fraction of LN tokens with pi_old < 1e-3",
    "grad_norm_max": "largest gradient norm of the step's optimizer steps (spikes)",
    "nonfinite_updates": "optimizer steps of the RL step skipped for a non-finite loss or gradient",
}
TRAIN_KEYS.update(DIAGNOSTIC_KEYS)


def complete_row(row: dict) -> dict:
    """Every TRAIN_KEYS key present: stage times default to 0.0, other metrics to NaN."""
    out = dict(row)
    for key in TRAIN_KEYS:
        if key not in out:
            out[key] = 0.0 if key in STAGE_TIMES or key in MEMORY_KEYS else float("nan")
    return out


class MetricsLogger:
    def __init__(self, out_dir: str, enabled: bool, tensorboard: bool = True, resume: bool = False):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not resume and self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(out_dir) / "tb"))
            except ImportError:  # tensorboard is a dependency; keep going without it if absent
                self._tb = None

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v) for k, v in row.items()}
        if "step" in row:
            clean["step"] = int(row["step"])
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        if self._tb is not None:
            step = int(row["step"])
            for k, v in clean.items():
                if k != "step" and isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows of steps after the checkpoint (they will be recomputed)."""
        if not self.enabled or not self.path.exists():
            return
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        keep = [r for r in rows if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def close(self):
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_run(metrics_path: str, out_png: str, title: Optional[str] = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_rows = read_metrics(metrics_path)
    rows = [r for r in all_rows if r.get("kind", "train") == "train"]
    evals = [r for r in all_rows if r.get("kind") == "eval" and "eval_accuracy" in r]
    steps = [r["step"] for r in rows]
    # A W mean is undefined on steps without LN (HP) tokens: leave a gap rather than draw a 0.
    count_of = {"w_ln_mean": "ln_tokens", "w_hp_mean": "hp_tokens"}

    def series(key):
        return [r.get(key, float("nan")) if r.get(count_of.get(key, ""), 1) else float("nan") for r in rows]

    panels = [(("reward_mean",), "reward (rollouts) and held-out accuracy"), (("entropy",), "entropy"),
              (("ln_frac", "hp_frac"), "LN / HP fraction"), (("w_ln_mean", "w_hp_mean"), "mean W_logp on LN / HP")]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6), constrained_layout=True)
    for ax, (keys, label) in zip(axes, panels):
        for key in keys:
            ax.plot(steps, series(key), marker=".", label=key)
        if keys == ("reward_mean",) and evals:
            ax.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], "s-", label="held-out accuracy")
        ax.set_xlabel("RL step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
