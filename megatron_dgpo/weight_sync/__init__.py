"""HF <-> Megatron weight conversion and streaming resharding to inference layouts.

* `layouts`: declarative per-architecture tables (HF names, Megatron names, rule, TP dim).
* `transforms`: qkv / gate-up / vocab-padding rules and inference-TP regions.
* `stream`: `WeightStreamer` / `iter_hf_weights`: Megatron (any TP/PP) -> HF tensors in checksummed buckets.
* `load`: `load_hf_into_megatron`: HF folder -> Megatron model, each rank reading its slices only.
* `hf_io`: `HFCheckpoint` (safetensors reads), `write_hf_folder` (atomic writes).
* `export`: `save_megatron_as_hf`: Megatron model -> HF folder.
"""
from megatron_dgpo.weight_sync.export import save_megatron_as_hf
from megatron_dgpo.weight_sync.hf_io import CheckpointError, HFCheckpoint, write_hf_folder
from megatron_dgpo.weight_sync.layouts import LAYOUTS, TensorRule, get_layout, hf_tensor_names
from megatron_dgpo.weight_sync.load import check_hf_tensors, load_hf_into_megatron, megatron_state_from_hf
from megatron_dgpo.weight_sync.stream import (
    StreamStats, WeightBucket, WeightStreamer, WeightSyncError, WeightSyncIntegrityError, drain, iter_hf_weights,
    payload_checksum,
)
from megatron_dgpo.weight_sync.transforms import inference_region, shard_hf_tensor

__all__ = [
    "CheckpointError", "HFCheckpoint", "LAYOUTS", "StreamStats", "TensorRule", "WeightBucket", "WeightStreamer",
    "WeightSyncError", "WeightSyncIntegrityError", "check_hf_tensors", "drain", "get_layout", "hf_tensor_names",
    "inference_region", "iter_hf_weights", "load_hf_into_megatron", "megatron_state_from_hf", "payload_checksum",
    "save_megatron_as_hf", "shard_hf_tensor", "write_hf_folder",
]
