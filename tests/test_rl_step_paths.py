"""An RL step's old log-prob paths and its collectives, under torchrun (TP=2, embedded engine):
see tests/workers/rl_step_paths.py."""
import pytest

from tests.torchrun_util import run_torchrun

CHECKS = ["on_policy_shortcut_equals_recompute", "on_policy_step_runs_no_old_logp_forward",
          "rollout_source_within_1e-5_of_trainer", *[f"collectives_per_stage_{layout}_rank{r}" for layout in ("tp2", "dp2") for r in (0, 1)],
          "local_dp_totals_equal_collective_rank0", "local_dp_totals_equal_collective_rank1"]


@pytest.fixture(scope="module")
def results():
    return run_torchrun("rl_step_paths.py", 2, timeout=900)


@pytest.mark.dist
@pytest.mark.parametrize("check", CHECKS)
def test_rl_step_paths(results, check):
    assert check in results, f"{check} did not run: {sorted(results)}"
    assert results[check]["ok"], results[check]["detail"]
