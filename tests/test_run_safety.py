"""Long runs never serve or save non-finite weights and never destroy an earlier run (issue 11,
items 1 and 2): the trainer end to end on 2 CPU processes (tests/workers/run_safety.py)."""
import pytest

from tests.torchrun_util import run_torchrun

CHECKS = ["nonfinite_weights_abort_before_sync_and_save", "overflowing_weights_named", "collapsed_policy_aborts",
          "second_run_on_output_dir_refused", "fresh_run_into_old_run_refused",
          "broken_latest_falls_back_to_newest_complete", "latest_outside_root_ignored",
          "final_eval_not_duplicated_after_resume", "overwrite_replaces_run"]


@pytest.fixture(scope="module")
def results():
    return run_torchrun("run_safety.py", 2, timeout=900)


@pytest.mark.dist
@pytest.mark.parametrize("check", CHECKS)
def test_run_safety(results, check):
    assert check in results, f"{check} did not run: {sorted(results)}"
    assert results[check]["ok"], results[check]["detail"]
