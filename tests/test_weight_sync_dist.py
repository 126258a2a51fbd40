"""HF <-> Megatron weight sync across TP/PP layouts: one 4-process torchrun launch, many checks.

Layouts (TP, PP) in {(1,1), (2,1), (1,2), (2,2)} (the rest of the 4 ranks is data parallel),
variants qwen2 (QKV bias, GQA, untied), qwen2_tied, llama. Per layout and variant:
load HF -> Megatron, stream -> HF bit-exact on every rank, Megatron logits == transformers logits
of the streamed weights, bf16 stream to one receiver, inference TP=2 shards == slicing the HF
tensors, a corrupted bucket raises, export to a HF folder that transformers loads. Plus a
virtual-pipeline layout (PP=2 x VPP=2): load places layers where Megatron's interleaving puts them,
round trip, inference shards; and a DDP-wrapped TP=2 x DP=2 model whose stream follows in-place
parameter updates.
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from torchrun_util import run_torchrun  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from weight_sync_common import VARIANTS  # noqa: E402

LAYOUTS = ["tp1pp1", "tp2pp1", "tp1pp2", "tp2pp2"]


def _expected():
    names = []
    for lay in LAYOUTS:
        for v in VARIANTS:
            names += [f"{lay}/{v}/{c}" for c in ("load", "round_trip_bitexact", "logits_match_transformers",
                                                 "bf16_to_one_receiver", "inference_tp2_shards")]
            if v == "qwen2":
                names.append(f"{lay}/{v}/corrupted_bucket_raises")
            if v in ("qwen2_tied", "llama") or lay == "tp2pp2":
                names.append(f"{lay}/{v}/export_hf_folder")
    names.append("tp2pp1_ddp/qwen2/stream_follows_updates")
    names += [f"tp1pp2vpp2/qwen2/{c}" for c in ("load", "layer_placement", "round_trip_bitexact",
                                                  "inference_tp2_shards")]
    return names


CHECKS = _expected()


@pytest.fixture(scope="module")
def results():
    return run_torchrun("weight_sync_worker.py", 4)


@pytest.mark.dist
@pytest.mark.parametrize("name", CHECKS)
def test_weight_sync_dist(results, name):
    assert name in results, f"check {name} did not run; ran: {sorted(results)[:5]}..."
    assert results[name]["ok"], results[name]["detail"]
