"""vocab_parallel_logprobs under tensor parallelism: tests/workers/ops_worker.py under torchrun
(CPU gloo) with TP 2 and 4, both backends (Triton in its interpreter on CPU), against float64."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from torchrun_util import run_torchrun  # noqa: E402

EXPECTED_CHECKS = {
    2: ["explicit_tp2_fp32_T1.0", "explicit_tp2_fp32_T0.7", "explicit_tp2_bf16_T1.0", "explicit_tp2_bf16_T0.7",
        "explicit_tp2_logp_only_and_entropy_only", "megatron_ps_tp2_fp32_T0.7", "megatron_ps_tp2_bf16_T1.0",
        "megatron_ce_agrees_tp2"],
    4: ["explicit_tp4_fp32_T1.0", "explicit_tp4_fp32_T0.7", "explicit_tp4_bf16_T1.0", "explicit_tp4_bf16_T0.7",
        "explicit_tp4_logp_only_and_entropy_only", "explicit_subgroup_tp2_of4_fp32", "explicit_subgroup_tp2_of4_bf16",
        "megatron_ps_tp2_fp32_T0.7", "megatron_ps_tp2_bf16_T1.0", "megatron_ce_agrees_tp2",
        "megatron_ps_tp4_fp32_T0.7", "megatron_ps_tp4_bf16_T1.0", "megatron_ce_agrees_tp4"],
}
# The Triton backend (tests/workers/ops_worker.py runs it when triton is installed).
TRITON_CHECKS = ["triton_tp{n}_fp32_T0.7", "triton_tp{n}_bf16_T1.0", "triton_tp{n}_logp_only_and_entropy_only"]
if importlib.util.find_spec("triton") is not None:
    for _n, _names in EXPECTED_CHECKS.items():
        _names.extend(c.format(n=_n) for c in TRITON_CHECKS)


@pytest.fixture(scope="module")
def dist_runs():
    """One torchrun launch per TP size (lazily, shared by all checks of this module)."""
    cache: dict[int, object] = {}

    def get(nproc: int) -> dict:
        if nproc not in cache:
            try:
                cache[nproc] = run_torchrun("ops_worker.py", nproc)
            except Exception as exc:  # report the launch failure on every check of this size
                cache[nproc] = exc
        if isinstance(cache[nproc], Exception):
            raise cache[nproc]
        return cache[nproc]

    return get


@pytest.mark.dist
@pytest.mark.parametrize(
    "nproc,name",
    [(n, c) for n, names in EXPECTED_CHECKS.items() for c in names],
    ids=[f"tp{n}-{c}" for n, names in EXPECTED_CHECKS.items() for c in names],
)
def test_distributed(dist_runs, nproc, name):
    results = dist_runs(nproc)
    assert name in results, f"check {name} missing; got {sorted(results)}"
    assert results[name]["ok"], f"{name}: {results[name]['detail']}"


@pytest.mark.dist
@pytest.mark.parametrize("nproc", sorted(EXPECTED_CHECKS))
def test_distributed_no_unexpected_checks(dist_runs, nproc):
    assert sorted(dist_runs(nproc)) == sorted(EXPECTED_CHECKS[nproc])
