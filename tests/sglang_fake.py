"""An SGLang server for tests: SGLang 0.5.23's own FastAPI app (sglang.srt.entrypoints.http_server)
served by uvicorn on 127.0.0.1, with the scheduler side replaced by `FakeTokenizerManager`.

So every request our client sends is parsed, validated (pydantic for the io_struct bodies, the
`generate_contract_error` schema gate for /generate), authorised (SGLang's API-key middleware)
and answered (status codes, error bodies) by SGLang's code. Only what lies behind the tokenizer
manager is modelled, each piece after the SGLang function named in its docstring:
- generate_request: TokenizerManager._validate_one_request's context-length checks (a ValueError
  that http_server turns into HTTP 400 for the whole batch), output format of a batch, aborted rows;
- begin/end_weight_update + update_weights_from_distributed: the session and group checks of
  managers/scheduler_components/weight_updater.py (SchedulerWeightUpdater.update_weights_from_distributed,
  model_runner_components/weight_updater.WeightUpdater.receive_weights_from_distributed);
- the weight version: TokenizerManager.config_value("weight_version").
"""
from __future__ import annotations

import asyncio
import contextvars
import json
import os
import tempfile
import threading
import time
from types import SimpleNamespace as NS
from typing import Callable, Optional

from tests import sglang_cpu
from tests.torchrun_util import _free_port as free_port  # noqa: F401 (also used by the tests)

_CURRENT = contextvars.ContextVar("fake_tm")
_CONTEXT_LEN = 64


def tiny_model_dir() -> str:
    """An HF folder (config.json) for SGLang's server-args resolution."""
    from megatron_dgpo.model.config import ModelConfig

    d = os.path.join(tempfile.gettempdir(), f"dgpo-sglang-fake-{os.getpid()}")
    os.makedirs(d, exist_ok=True)
    cfg = ModelConfig().to_hf_config()
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    return d


_PUBLISHED = []


def publish_server_args(extra: tuple = ()) -> None:
    """SGLang's config for this process, from a launch command parsed by SGLang's own parser."""
    if _PUBLISHED:
        return
    sglang_cpu.prepare()
    from sglang.srt.runtime_context import publish
    from sglang.srt.server_args import prepare_server_args

    publish(prepare_server_args(["--model-path", tiny_model_dir(), "--device", "cpu", *extra]), role="tokenizer")
    _PUBLISHED.append(True)


class _Dispatch:
    """The process-global tokenizer manager SGLang's app sees: the fake of the server serving
    the current request (one uvicorn server per fake, one app in the process)."""

    def __getattr__(self, name):
        return getattr(_CURRENT.get(), name)


class FakeTokenizerManager:
    def __init__(self, context_len: int = _CONTEXT_LEN, receive: Optional[Callable] = None,
                 init_group: Optional[Callable] = None):
        self.context_len = context_len
        self.version = "default"
        self.session = False
        self.groups: set[str] = set()
        self.receive = receive  # (names, dtypes, shapes, group_name, load_format) -> tensors
        self.init_group = init_group
        self.received: list = []
        self.requests: list = []
        self.abort_rows: set[int] = set()
        self.on_generate: Optional[Callable] = None
        self.model_path = self.served_model_name = "fake"
        self.is_generation = True
        self.model_config = NS(context_len=context_len, is_image_understandable_model=False,
                               is_audio_understandable_model=False,
                               hf_config=NS(model_type="qwen2", architectures=["Qwen2ForCausalLM"]))

    def config_value(self, name):
        return {"weight_version": self.version}.get(name)

    # -- generation (TokenizerManager.generate_request / _validate_one_request) -------------------
    async def generate_request(self, obj, request=None):
        self.requests.append(("generate", obj))
        if self.on_generate is not None:
            await self.on_generate()
        rows = obj.input_ids if isinstance(obj.input_ids[0], list) else [obj.input_ids]
        params = obj.sampling_params if isinstance(obj.sampling_params, list) else [obj.sampling_params] * len(rows)
        for ids, sp in zip(rows, params):
            n_new = sp.get("max_new_tokens")
            if len(ids) >= self.context_len:
                raise ValueError(f"The input ({len(ids)} tokens) is longer than the model's context length "
                                 f"({self.context_len} tokens).")
            if n_new is not None and n_new + len(ids) > self.context_len:
                raise ValueError("Requested token count exceeds the model's maximum context length of "
                                 f"{self.context_len} tokens.")
        out = []
        for k, (ids, sp) in enumerate(zip(rows, params)):
            if k in self.abort_rows:
                out.append({"text": "", "output_ids": [], "meta_info": {
                    "id": str(k), "finish_reason": {"type": "abort", "message": "aborted", "status_code": 503},
                    "prompt_tokens": len(ids), "completion_tokens": 0, "weight_version": self.version,
                    "output_token_logprobs": []}})
                continue
            seed = sp.get("sampling_seed") or 0
            toks = [(ids[-1] + 1 + seed + j) % 97 for j in range(sp.get("max_new_tokens", 4))]
            out.append({"text": "", "output_ids": toks, "meta_info": {
                "id": str(k), "finish_reason": {"type": "length", "length": len(toks)},
                "prompt_tokens": len(ids), "completion_tokens": len(toks), "weight_version": self.version,
                "output_token_logprobs": [[-0.5, t, None] for t in toks]}})
        yield out

    # -- weights (scheduler_components/weight_updater.py) -----------------------------------------
    async def init_weights_update_group(self, obj, request=None):
        self.requests.append(("init", obj))
        if self.init_group is not None:
            ok, msg = await asyncio.to_thread(self.init_group, obj)
            if not ok:
                return ok, msg
        self.groups.add(obj.group_name)
        return True, "Succeeded to initialize custom process group."

    async def begin_weight_update(self, obj, request=None):
        self.session = True
        return True, "ok"

    async def end_weight_update(self, obj, request=None):
        self.session = False
        return True, "ok"

    async def update_weights_from_distributed(self, obj, request=None):
        self.requests.append(("update", obj))
        if not self.session:
            return False, "update_weights_from_distributed must run between begin_weight_update() and end_weight_update()"
        if obj.group_name not in self.groups:
            return False, f"Failed to receive weights: Group {obj.group_name} not in {sorted(self.groups)}. " \
                          "Please call `init_weights_update_group` first."
        tensors = await asyncio.to_thread(self.receive, obj.names, obj.dtypes, obj.shapes, obj.group_name,
                                          obj.load_format)
        self.received.append(tensors)
        if obj.weight_version is not None:
            self.version = obj.weight_version
        return True, "Succeeded to update parameter online."

    async def flush_cache(self, timeout_s=0.0):
        return NS(success=True)

    async def release_memory_occupation(self, obj, request=None):
        self.requests.append(("release", obj))

    async def resume_memory_occupation(self, obj, request=None):
        self.requests.append(("resume", obj))


class _Scoped:
    """ASGI wrapper: requests reaching this server see its own tokenizer manager."""

    def __init__(self, app, tm):
        self.app, self.tm = app, tm

    async def __call__(self, scope, receive, send):
        token = _CURRENT.set(self.tm)
        try:
            await self.app(scope, receive, send)
        finally:
            _CURRENT.reset(token)


class _MiddlewareHost:
    """Receives `app.add_middleware(...)` from SGLang's add_api_key_middleware, so its real
    middleware wraps one fake server instead of the process-global app."""

    def __init__(self, app):
        self.router = app.router
        self.added = None

    def add_middleware(self, cls, **kw):
        self.added = (cls, kw)


class FakeSGLangServer:
    """One server: SGLang's app + a FakeTokenizerManager on 127.0.0.1:<free port>."""

    def __init__(self, tm: Optional[FakeTokenizerManager] = None, api_key: Optional[str] = None):
        import uvicorn

        publish_server_args()
        from sglang.srt.entrypoints import http_server as hs

        if hs.get_global_state() is None or not isinstance(hs.get_global_state().tokenizer_manager, _Dispatch):
            hs.set_global_state(hs._GlobalState(tokenizer_manager=_Dispatch(), template_manager=None,
                                                scheduler_info={}))
        self.tm = tm or FakeTokenizerManager()
        app = _Scoped(hs.app, self.tm)
        if api_key:
            from sglang.srt.utils.auth import add_api_key_middleware

            host = _MiddlewareHost(hs.app)
            add_api_key_middleware(host, api_key=api_key, admin_api_key=None)
            cls, kw = host.added
            app = _Scoped(cls(hs.app, **kw), self.tm)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, lifespan="off",
                                                    log_level="error", timeout_graceful_shutdown=0.2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("fake SGLang server did not start")
            time.sleep(0.02)

    def posts(self, kind: str) -> list:
        return [o for k, o in self.tm.requests if k == kind]

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
