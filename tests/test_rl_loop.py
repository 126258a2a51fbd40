"""The RL loop end to end on CPU (embedded engine, gloo, 2 processes): TP=2, PP=2, DP=2, resume,
non-finite updates."""
import pytest

from tests.torchrun_util import run_torchrun

CHECKS = ["tp2_engine_equals_trainer", "tp2_metrics_columns", "tp2_trained", "tp2_metrics_times",
          "pp2_engine_equals_trainer", "pp2_metrics_columns", "pp2_trained", "pp2_metrics_times",
          "dp2_engine_equals_trainer", "dp2_metrics_columns", "dp2_trained", "dp2_metrics_times",
          "skipped_step_writes_every_key",
          "resume_continues_same_trajectory", "nonfinite_update_skipped", "nonfinite_on_one_dp_rank_skipped_everywhere",
          "bf16_loaded_weights_survive_first_step", "empty_batch_takes_no_step"]


@pytest.fixture(scope="module")
def results():
    return run_torchrun("rl_loop.py", 2, timeout=900)


@pytest.mark.dist
@pytest.mark.parametrize("check", CHECKS)
def test_rl_loop(results, check):
    assert check in results, f"{check} did not run: {sorted(results)}"
    assert results[check]["ok"], results[check]["detail"]
