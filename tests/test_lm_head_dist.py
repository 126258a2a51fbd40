"""The fused LM head under torchrun (2 CPU processes, gloo): the op at TP=2 with and without
sequence parallelism, Megatron train steps fused vs materialised for TP=2, TP=2+SP and PP=2 with
tied and untied embeddings and PP=2 interleaved (two virtual stages), and the main job's first three steps (tests/workers/lm_head_worker.py)."""
import pytest

from tests.torchrun_util import run_torchrun

LAYOUTS = ["tp2", "tp2_sp", "pp2"]
CHECKS = ([f"op_tp2_sp{sp}_T{t}" for sp in (0, 1) for t in (1.0, 0.7)]
          + [f"train_{lay}_{tie}" for lay in LAYOUTS for tie in ("untied", "tied")]
          + ["train_pp2_vpp2_untied", "main_job_tp2_fused_equals_materialised"])


@pytest.fixture(scope="module")
def results():
    return run_torchrun("lm_head_worker.py", 2, timeout=900)


@pytest.mark.dist
@pytest.mark.parametrize("check", CHECKS)
def test_lm_head_dist(results, check):
    assert check in results, f"{check} did not run: {sorted(results)}"
    assert results[check]["ok"], results[check]["detail"]


@pytest.mark.dist
def test_no_unexpected_checks(results):
    assert sorted(results) == sorted(CHECKS)
