"""Memory the RL loop holds (issue 18): one policy at a time, retired policies freed by reference
counting (tests/workers/memory_worker.py, 2 CPU processes)."""
import pytest

from tests.torchrun_util import run_torchrun

CHECKS = ["closed_policy_freed_without_gc", "one_policy_after_warm_start", "rl_numbers_as_from_fresh_policy",
          "checkpoint_writers_honoured", "memory_keys_every_step"]


@pytest.fixture(scope="module")
def results():
    return run_torchrun("memory_worker.py", 2, timeout=900)


@pytest.mark.dist
@pytest.mark.parametrize("check", CHECKS)
def test_memory(results, check):
    assert check in results, f"{check} did not run: {sorted(results)}"
    assert results[check]["ok"], results[check]["detail"]
