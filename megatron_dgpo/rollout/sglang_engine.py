"""SGLang rollout engines: colocated in-process `sglang.Engine`, and a remote server over HTTP.

sglang is imported only when one of these is constructed (it needs CUDA). Request bodies come
from `sglang_payloads` so they are unit-tested without sglang.

Weight updates (SGLang 0.5.23):
  colocated: begin_weight_update -> per bucket update_weights_from_tensor(load_format=
    "flattened_bucket", one serialized payload per inference TP rank) -> end_weight_update.
  server: /init_weights_update_group once (an NCCL group: trainer rank 0 + the server's ranks),
    then per update /begin_weight_update -> per bucket /update_weights_from_distributed posted
    from a thread while the trainer broadcasts the bucket's tensors -> /end_weight_update.
In both, the last bucket carries flush_cache and the new weight_version, and the engine must
report that version afterwards (checked), so a silently failed update cannot go unnoticed.
"""
from __future__ import annotations

import inspect
import json
import logging
import threading
import urllib.error
import urllib.request
from dataclasses import replace
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from . import sglang_payloads as P
from .base import NamedTensors, RolloutEngine, RolloutSample, SamplingParams

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'megatron-dgpo[sglang]'"


def require_sglang():
    try:
        import sglang  # noqa: F401
    except ImportError as e:
        raise ImportError(f"the SGLang rollout engine needs the sglang package ({INSTALL_HINT}; GPU only)") from e
    return sglang


def _with_last(it: Iterable) -> Iterator[tuple[Any, bool]]:
    it = iter(it)
    try:
        prev = next(it)
    except StopIteration:
        # the last bucket carries the version: an empty update could never set it
        raise ValueError("update_weights got no tensors") from None
    for x in it:
        yield prev, False
        prev = x
    yield prev, True


def _check_ok(result: Any, what: str) -> None:
    """SGLang returns (success, message), a dict, or an object with .success, by version."""
    if isinstance(result, tuple) and result and isinstance(result[0], bool):
        ok, msg = result[0], (result[1] if len(result) > 1 else "")
    elif isinstance(result, dict):
        ok, msg = result.get("success", True), result.get("message", "")
    else:
        ok, msg = getattr(result, "success", True), getattr(result, "message", "")
    if not ok:
        raise P.SGLangResponseError(f"SGLang {what} failed: {msg}")


class _Background:
    """Run a blocking call in a thread; result() re-raises its exception."""

    def __init__(self, fn: Callable, *args):
        self._out: list = []
        self._err: list = []
        self._t = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self._t.start()

    def _run(self, fn, args):
        try:
            self._out.append(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            self._err.append(e)

    def result(self, timeout: Optional[float] = None):
        self._t.join(timeout)
        if self._t.is_alive():
            raise TimeoutError("SGLang request did not finish in time")
        if self._err:
            raise self._err[0]
        return self._out[0]


# --------------------------------------------------------------------------------------------
# server mode
# --------------------------------------------------------------------------------------------
class _Server:
    """JSON over HTTP to one SGLang server (stdlib only)."""

    def __init__(self, base_url: str, timeout_s: float):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def request(self, method: str, path: str, body: Optional[dict] = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise P.SGLangResponseError(f"{self.base_url}: {method} {path} -> HTTP {e.code}: {detail}") from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw.decode(errors="replace")

    def post(self, path: str, body: Optional[dict] = None) -> Any:
        out = self.request("POST", path, body if body is not None else {})
        if isinstance(out, dict):
            _check_ok(out, f"{self.base_url}{path}")
        return out

    def weight_version(self) -> str:
        try:
            info = self.request("GET", "/model_info")
        except P.SGLangResponseError:
            info = None
        if not isinstance(info, dict) or "weight_version" not in info:
            info = self.request("GET", "/get_weight_version")  # SGLang before /model_info carried it
        return str(info["weight_version"])


def _on_all(servers: list[_Server], fn: Callable[[_Server], Any], timeout: Optional[float]) -> list:
    calls = [_Background(fn, s) for s in servers]
    return [c.result(timeout) for c in calls]


class SGLangServerEngine(RolloutEngine):
    """One or more SGLang servers (data-parallel replicas) driven over HTTP.

    generate() splits the prompts into contiguous shares, one per server, and keeps the order.
    Weights go out by one NCCL broadcast from the trainer's rank 0 that every server receives:
    the group has world size 1 + sum of the servers' TP sizes.
    """

    def __init__(self, base_urls: str | list[str], timeout_s: float = 3600.0, bucket_bytes: int = 1 << 30,
                 weight_update_session: bool = True):
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls:
            raise ValueError("SGLangServerEngine needs at least one server URL")
        self.servers = [_Server(u, timeout_s) for u in urls]
        self.timeout_s = timeout_s
        self.bucket_bytes = bucket_bytes
        self.weight_update_session = weight_update_session  # False for SGLang < 0.5.23
        self._version: Optional[str] = None
        self._group = None
        self._group_name = "weight_update_group"

    def _post(self, path: str, body: Optional[dict] = None) -> list:
        return _on_all(self.servers, lambda s: s.post(path, body), self.timeout_s)

    # ---- generation ----------------------------------------------------------------------------
    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[RolloutSample]:
        prompts = list(prompt_token_ids)
        k = len(self.servers)
        bounds = [len(prompts) * i // k for i in range(k + 1)]
        shares = [(self.servers[i], bounds[i], prompts[bounds[i]:bounds[i + 1]]) for i in range(k)]
        shares = [sh for sh in shares if sh[2]]

        def run(share):
            server, lo, part = share
            # distinct seeds per share, so replicas do not repeat each other's samples
            sp = sampling if sampling.seed is None else replace(sampling, seed=sampling.seed + lo * sampling.n)
            resp = server.request("POST", "/generate", P.build_generate_payload(part, sp))
            out = P.parse_generate_response(resp, part, sp, expected_version=self._version)
            for x in out:
                x.prompt_index += lo
            return out

        results = [c.result(self.timeout_s) for c in [_Background(run, sh) for sh in shares]]
        samples = [x for r in results for x in r]
        if self._version is None and samples:
            self._version = samples[0].weight_version
        return samples

    @property
    def weight_version(self) -> str:
        if self._version is None:
            self._version = self.servers[0].weight_version()
        return self._version

    # ---- weights -------------------------------------------------------------------------------
    def init_weights_update_group(self, master_address: str, master_port: int, server_tp_size: int = 1,
                                  group_name: str = "weight_update_group", backend: str = "nccl",
                                  create_local_group: Optional[Callable[[int], Any]] = None):
        """Form the NCCL group: trainer rank 0, then server i's TP ranks at 1 + i * server_tp_size.

        Each server's call blocks until every rank joined, so they run in threads while this
        process joins with `create_local_group(world_size)` (default:
        `init_weight_sync_process_group`)."""
        world_size = 1 + server_tp_size * len(self.servers)
        calls = [_Background(s.post, "/init_weights_update_group", P.build_init_group_payload(
            master_address, master_port, 1 + i * server_tp_size, world_size, group_name, backend))
            for i, s in enumerate(self.servers)]
        if create_local_group is None:
            from .weight_sync import init_weight_sync_process_group

            def create_local_group(ws):
                return init_weight_sync_process_group(master_address, master_port, ws, 0, group_name, backend)
        group = create_local_group(world_size)
        for c in calls:
            c.result(self.timeout_s)
        self._group, self._group_name = group, group_name
        return group

    def update_weights(self, named_tensors: NamedTensors, version: int | str,
                       broadcast: Optional[Callable[[torch.Tensor], None]] = None) -> None:
        """Broadcast HF-named tensors to every server, bucket by bucket, then check the version.

        `broadcast(tensor)` defaults to torch.distributed.broadcast(src=0) on the group from
        init_weights_update_group; tensors must be on the GPU for NCCL."""
        version = str(version)
        if broadcast is None:
            if self._group is None:
                raise RuntimeError("call init_weights_update_group() before update_weights()")
            import torch.distributed as dist

            group = self._group

            def broadcast(t):
                dist.broadcast(t, src=0, group=group)
        if self.weight_update_session:
            self._post("/begin_weight_update", {})
        try:
            for bucket, last in _with_last(P.bucket_named_tensors(named_tensors, self.bucket_bytes)):
                payload = P.build_update_from_distributed_payload(
                    bucket, self._group_name, flush_cache=last, version=version if last else None)
                # the servers answer only after receiving the whole bucket: post first, then send
                calls = [_Background(s.post, "/update_weights_from_distributed", payload) for s in self.servers]
                for _, t in bucket:
                    broadcast(t.contiguous())
                for c in calls:
                    c.result(self.timeout_s)
        finally:
            if self.weight_update_session:
                self._post("/end_weight_update", {})
        got = _on_all(self.servers, lambda s: s.weight_version(), self.timeout_s)
        bad = {s.base_url: v for s, v in zip(self.servers, got) if v != version}
        if bad:
            raise P.SGLangResponseError(f"after update_weights, server(s) report weight_version {bad}, "
                                        f"expected {version!r}")
        self._version = version

    def flush_cache(self) -> None:
        _on_all(self.servers, lambda s: s.request("POST", "/flush_cache", {}), self.timeout_s)

    def release_memory(self, tags: Optional[list[str]] = None) -> None:
        self._post("/release_memory_occupation", P.build_memory_payload(tags))

    def resume_memory(self, tags: Optional[list[str]] = None) -> None:
        self._post("/resume_memory_occupation", P.build_memory_payload(tags))


# --------------------------------------------------------------------------------------------
# colocated in-process engine
# --------------------------------------------------------------------------------------------
class SGLangColocatedEngine(RolloutEngine):
    """Drives an in-process `sglang.Engine` on the trainer's GPUs.

    `flatten` / `serialize` default to SGLang's FlattenedTensorBucket and
    MultiprocessingSerializer; they are parameters only so the call sequence can be tested
    without sglang.
    """

    def __init__(self, engine=None, bucket_bytes: int = 512 << 20, flatten=None, serialize=None,
                 **engine_kwargs):
        if engine is None or flatten is None or serialize is None:
            sgl = require_sglang()
            if engine is None:
                engine = sgl.Engine(**engine_kwargs)
            if flatten is None:
                from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket as flatten
            if serialize is None:
                from sglang.srt.utils import MultiprocessingSerializer

                serialize = MultiprocessingSerializer.serialize
                try:  # CUDA tensors are sent by IPC handle; SGLang patches torch's reductions for it
                    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
                except ImportError:
                    try:
                        from sglang.srt.patch_torch import monkey_patch_torch_reductions
                    except ImportError:
                        monkey_patch_torch_reductions = None
                if monkey_patch_torch_reductions is not None:
                    monkey_patch_torch_reductions()
        self.engine = engine
        self.bucket_bytes = bucket_bytes
        self._flatten = flatten
        self._serialize = serialize
        self.tp_size = int(getattr(getattr(engine, "server_args", None), "tp_size",
                                   engine_kwargs.get("tp_size", 1)))
        self._version: Optional[str] = None
        params = inspect.signature(engine.update_weights_from_tensor).parameters
        self._tensor_update_takes_version = "weight_version" in params

    @property
    def weight_version(self) -> str:
        if self._version is None:
            sa = getattr(self.engine, "server_args", None)
            self._version = str(getattr(sa, "weight_version", "default"))
        return self._version

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[RolloutSample]:
        payload = P.build_generate_payload(prompt_token_ids, sampling)
        payload.pop("stream")
        resp = self.engine.generate(**payload)
        return P.parse_generate_response(resp, prompt_token_ids, sampling, expected_version=self._version)

    def update_weights(self, named_tensors: NamedTensors, version: int | str) -> None:
        version = str(version)
        session = hasattr(self.engine, "begin_weight_update")
        if session:
            _check_ok(self.engine.begin_weight_update(), "begin_weight_update")
        try:
            for bucket, last in _with_last(P.bucket_named_tensors(named_tensors, self.bucket_bytes)):
                fb = self._flatten(named_tensors=bucket)
                payload = {"flattened_tensor": fb.get_flattened_tensor(), "metadata": fb.get_metadata()}
                # each TP rank deserializes (and releases) its own copy of the IPC handles
                per_rank = [self._serialize(payload) for _ in range(self.tp_size)]
                kw = dict(named_tensors=per_rank, load_format="flattened_bucket", flush_cache=last)
                if last and self._tensor_update_takes_version:
                    kw["weight_version"] = version
                _check_ok(self.engine.update_weights_from_tensor(**kw), "update_weights_from_tensor")
        finally:
            if session:
                _check_ok(self.engine.end_weight_update(), "end_weight_update")
        if not self._tensor_update_takes_version:
            if not hasattr(self.engine, "update_weight_version"):
                raise RuntimeError("this sglang.Engine cannot set weight_version; upgrade to >= 0.5.23")
            _check_ok(self.engine.update_weight_version(new_version=version), "update_weight_version")
        self._version = version

    def release_memory(self, tags: Optional[list[str]] = None) -> None:
        self.engine.release_memory_occupation(**P.build_memory_payload(tags))

    def resume_memory(self, tags: Optional[list[str]] = None) -> None:
        self.engine.resume_memory_occupation(**P.build_memory_payload(tags))

    def close(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:
            shutdown()


def from_train_config(cfg, tokenizer=None) -> RolloutEngine:
    """The SGLang engine a TrainConfig asks for (rollout.sglang), driven from trainer rank 0.

    Server mode also forms the NCCL weight-sync group, so rank 0 needs its GPU by then.
    Colocated mode starts the engine with the memory saver on (release/resume need it) and
    without a tokenizer (we send token ids).
    """
    ro = cfg.rollout
    sg = ro.sglang
    bucket = int(ro.weight_sync_bucket_mb) << 20
    if sg.mode == "server":
        if not sg.server_urls:
            raise ValueError("rollout.sglang.server_urls is empty (server mode needs one URL per server)")
        eng = SGLangServerEngine(sg.server_urls, bucket_bytes=bucket)
        eng.init_weights_update_group(sg.nccl_master_address, sg.nccl_master_port, server_tp_size=sg.tp_size)
        return eng
    if not sg.model_path:
        raise ValueError("rollout.sglang.model_path is required in colocated mode (an HF folder)")
    return SGLangColocatedEngine(bucket_bytes=bucket, model_path=sg.model_path, tp_size=sg.tp_size,
                                 mem_fraction_static=sg.mem_fraction_static, enable_memory_saver=True,
                                 skip_tokenizer_init=True, random_seed=int(cfg.seed))
