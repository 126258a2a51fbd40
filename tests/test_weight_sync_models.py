"""Issue 14's shapes and layouts through load / stream / logits / inference shards: one 4-process launch.

Fewer KV heads than TP (Megatron-Core splits linear_qkv in equal row blocks and all-gathers them),
Qwen3 dense (q/k norms, head_dim independent of hidden), uneven pipeline stages
(num_layers_in_first/last_pipeline_stage), Llama-3 rope scaling; gradients vs transformers at TP 2 / 4
(Qwen3 q/k norms, fewer KV heads than TP). See workers/weight_sync_models_worker.py.
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from torchrun_util import run_torchrun  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from weight_sync_models_worker import CASES, GRAD_CASES  # noqa: E402


def _expected():
    out = []
    for name, (_, _, _, _, first, last, itp) in CASES.items():
        out += [f"{name}/{c}" for c in ("load", "round_trip_bitexact", "logits_match_transformers",
                                         f"inference_tp{itp}_shards")]
        if first is not None or last is not None:
            out.append(f"{name}/layer_placement")
    return out + [f"{name}/grads_match_transformers" for name in GRAD_CASES]


@pytest.fixture(scope="module")
def results():
    return run_torchrun("weight_sync_models_worker.py", 4)


@pytest.mark.dist
@pytest.mark.parametrize("name", _expected())
def test_weight_sync_models(results, name):
    assert name in results, f"check {name} did not run; ran: {sorted(results)[:5]}..."
    assert results[name]["ok"], results[name]["detail"]
