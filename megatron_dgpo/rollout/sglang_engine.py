"""SGLang rollout engines: colocated in-process `sglang.Engine` (here) and remote servers over
HTTP (`sglang_server.SGLangServerEngine`), and the factory that builds either from a TrainConfig.

sglang is imported only when one of these is constructed (it needs CUDA). Request bodies come
from `sglang_payloads`; every call into SGLang is checked against sglang 0.5.23's own code in
tests/test_sglang_contract.py.

Weight updates (SGLang 0.5.23):
  colocated: begin_weight_update -> per bucket an UpdateWeightsFromTensorReqInput
    (load_format "flattened_bucket", one serialized payload per inference TP rank) run through
    the engine's tokenizer manager on the engine's event loop -> end_weight_update. This is what
    Engine.update_weights_from_tensor does, plus the `weight_version` field that the Engine
    method does not expose (0.5.23 has no Engine.update_weight_version either).
  server: see sglang_server.
In both, the last bucket carries flush_cache and the new weight_version, and the engine must
report that version afterwards (checked). A failed update leaves the engine marked as holding
unknown weights: it refuses to generate until a complete update succeeds.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

from . import sglang_payloads as P
from .base import NamedTensors, RolloutEngine, RolloutSample, SamplingParams
from .sglang_server import SGLangServerEngine, check_ok

__all__ = ["SGLangColocatedEngine", "SGLangServerEngine", "from_train_config", "require_sglang"]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'megatron-dgpo[sglang]'"


def require_sglang():
    try:
        import sglang  # noqa: F401
    except ImportError as e:
        raise ImportError(f"the SGLang rollout engine needs the sglang package ({INSTALL_HINT}; GPU only)") from e
    return sglang


# --------------------------------------------------------------------------------------------
# colocated in-process engine
# --------------------------------------------------------------------------------------------
class SGLangColocatedEngine(RolloutEngine):
    """Drives an in-process `sglang.Engine` on the trainer's GPUs.

    `flatten` / `serialize` / `request_type` default to SGLang's FlattenedTensorBucket,
    MultiprocessingSerializer and UpdateWeightsFromTensorReqInput; they are parameters only so
    the call sequence can be tested without a GPU.
    """

    def __init__(self, engine=None, bucket_bytes: int = 512 << 20, flatten=None, serialize=None,
                 request_type=None, deterministic: bool = False, **engine_kwargs):
        if engine is None or flatten is None or serialize is None or request_type is None:
            sgl = require_sglang()
            if engine is None:
                engine = sgl.Engine(**engine_kwargs)
            if flatten is None:
                from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket as flatten
            if request_type is None:
                from sglang.srt.managers.io_struct import UpdateWeightsFromTensorReqInput as request_type
            if serialize is None:
                from sglang.srt.utils import MultiprocessingSerializer
                from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

                serialize = MultiprocessingSerializer.serialize
                monkey_patch_torch_reductions()  # CUDA tensors travel by IPC handle
        self.engine = engine
        self.bucket_bytes = bucket_bytes
        self.deterministic = deterministic
        self._flatten = flatten
        self._serialize = serialize
        self._request_type = request_type
        self.tp_size = int(getattr(getattr(engine, "server_args", None), "tp_size",
                                   engine_kwargs.get("tp_size", 1)))
        self._version: Optional[str] = None
        self._unknown_weights = False  # a failed update may have loaded some buckets

    def _engine_version(self) -> str:
        return str(self.engine.tokenizer_manager.config_value("weight_version"))

    @property
    def weight_version(self) -> str:
        if self._version is None:
            self._version = self._engine_version()
        return self._version

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[RolloutSample]:
        if self._unknown_weights:
            raise P.SGLangResponseError("the colocated SGLang engine holds partly updated weights after a failed "
                                        "update_weights; refusing to generate until an update succeeds")
        payload = P.build_generate_payload(prompt_token_ids, sampling, deterministic=self.deterministic)
        payload.pop("stream")
        resp = self.engine.generate(**payload)
        return P.parse_generate_response(resp, prompt_token_ids, sampling, expected_version=self._version)

    def _update_from_tensor(self, per_rank: list, flush_cache: bool, version: Optional[str]):
        obj = self._request_type(**P.build_update_from_tensor_payload(per_rank, version, flush_cache))
        tm = self.engine.tokenizer_manager
        return self.engine.loop.run_until_complete(tm.update_weights_from_tensor(obj, None))

    def update_weights(self, named_tensors: NamedTensors, version: int | str) -> None:
        version = str(version)
        check_ok(self.engine.begin_weight_update(), "begin_weight_update")
        self._unknown_weights = True
        try:
            for bucket, last in P.with_last(P.bucket_named_tensors(named_tensors, self.bucket_bytes)):
                fb = self._flatten(named_tensors=bucket)
                payload = {"flattened_tensor": fb.get_flattened_tensor(), "metadata": fb.get_metadata()}
                # each TP rank deserializes (and releases) its own copy of the IPC handles
                per_rank = [self._serialize(payload) for _ in range(self.tp_size)]
                check_ok(self._update_from_tensor(per_rank, flush_cache=last, version=version if last else None),
                         "update_weights_from_tensor")
        finally:
            check_ok(self.engine.end_weight_update(), "end_weight_update")
        got = self._engine_version()
        if got != version:
            raise P.SGLangResponseError(f"after update_weights the engine reports weight_version {got!r}, "
                                        f"expected {version!r}")
        self._version, self._unknown_weights = version, False

    def release_memory(self, tags: Optional[list[str]] = None) -> None:
        self.engine.release_memory_occupation(**P.build_memory_payload(tags))

    def resume_memory(self, tags: Optional[list[str]] = None) -> None:
        self.engine.resume_memory_occupation(**P.build_memory_payload(tags))

    def close(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:
            shutdown()


def trainer_host_address() -> str:
    """The address SGLang servers reach this process (trainer global rank 0) at: its own host
    name. Not the first Slurm node: torchrun's c10d rendezvous may give rank 0 to any node."""
    import socket

    return socket.getfqdn()


def from_train_config(cfg, tokenizer=None) -> RolloutEngine:
    """The SGLang engine a TrainConfig asks for (rollout.sglang), driven from trainer rank 0.

    Server mode also forms the NCCL weight-sync group, so rank 0 needs its GPU by then; its
    rendezvous is at rank 0's own host (`rollout.sglang.nccl_master_address` overrides), and the
    servers' API key is read from the environment variable named by `rollout.sglang.api_key_env`.
    Colocated mode starts the engine with the memory saver on (release/resume need it) and
    without a tokenizer (we send token ids).
    """
    ro = cfg.rollout
    sg = ro.sglang
    bucket = int(ro.weight_sync_bucket_mb) << 20
    if sg.mode == "server":
        if not sg.server_urls:
            raise ValueError("rollout.sglang.server_urls is empty (server mode needs one URL per server)")
        eng = SGLangServerEngine(sg.server_urls, timeout_s=sg.request_timeout_s, bucket_bytes=bucket,
                                 api_key=os.environ.get(sg.api_key_env) or None, deterministic=sg.deterministic,
                                 retries=sg.retries)
        eng.init_weights_update_group(sg.nccl_master_address or trainer_host_address(), sg.nccl_master_port,
                                      server_tp_size=sg.tp_size)
        return eng
    if not sg.model_path:
        raise ValueError("rollout.sglang.model_path is required in colocated mode (an HF folder)")
    return SGLangColocatedEngine(bucket_bytes=bucket, deterministic=sg.deterministic, model_path=sg.model_path,
                                 tp_size=sg.tp_size, mem_fraction_static=sg.mem_fraction_static,
                                 enable_memory_saver=True, skip_tokenizer_init=True, random_seed=int(cfg.seed),
                                 enable_deterministic_inference=sg.deterministic)
