"""SGLang servers driven over HTTP (server mode): generation, the NCCL weight broadcast, failures.

What a long cluster job meets, and what happens (each has a test against SGLang's own FastAPI
app in tests/test_sglang_contract.py):
- a prompt whose prompt + max_new_tokens exceeds the server's context length makes SGLang refuse
  the whole /generate batch with HTTP 400 (TokenizerManager._validate_one_request): limits are
  clamped per prompt to the context length read from /v1/models, a prompt that cannot fit becomes
  a failed sample, and a batch still refused with 400 is retried prompt by prompt so the other
  samples survive;
- a row SGLang aborts comes back with finish_reason "abort": a failed sample, counted;
- a server that refuses or drops connections (or answers 500/502-504) is retried with backoff, then
  its share of the prompts goes to the healthy servers; with none left the step fails naming them;
- a server that rejects a weight update (no session, unknown group) answers at once while the
  trainer's broadcast would wait for it forever: replies are watched during the broadcast and a
  rejection becomes an error within seconds instead of a hang until the NCCL timeout.
Requests never go through an HTTP(S) proxy: the servers are cluster-internal.
"""
from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from typing import Any, Callable, Optional

import torch

from . import sglang_payloads as P
from .base import NamedTensors, RolloutEngine, RolloutSample, SamplingParams

log = logging.getLogger(__name__)

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_TRANSIENT_HTTP = (500, 502, 503, 504)  # 500: e.g. a server shutting down mid-request


def check_ok(result: Any, what: str) -> None:
    """SGLang returns (success, message), a dict, or an object with .success, by call."""
    if isinstance(result, tuple) and result and isinstance(result[0], bool):
        ok, msg = result[0], (result[1] if len(result) > 1 else "")
    elif isinstance(result, dict):
        ok, msg = result.get("success", True), result.get("message", "")
    else:
        ok, msg = getattr(result, "success", True), getattr(result, "message", "")
    if not ok:
        raise P.SGLangResponseError(f"SGLang {what} failed: {msg}")


class Background:
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

    def done(self) -> bool:
        return not self._t.is_alive()

    def failed(self) -> Optional[BaseException]:
        return self._err[0] if self.done() and self._err else None

    def result(self, timeout: Optional[float] = None):
        self._t.join(timeout)
        if self._t.is_alive():
            raise TimeoutError("SGLang request did not finish in time")
        if self._err:
            raise self._err[0]
        return self._out[0]


class HTTPStatusError(P.SGLangResponseError):
    def __init__(self, msg: str, status: int):
        super().__init__(msg)
        self.status = status


class Server:
    """JSON over HTTP to one SGLang server (stdlib only, never through a proxy)."""

    def __init__(self, base_url: str, timeout_s: float, api_key: Optional[str] = None,
                 retries: int = 3, backoff_s: float = 1.0):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.api_key = api_key
        self.retries = retries
        self.backoff_s = backoff_s

    def _once(self, method: str, path: str, body: Optional[dict]) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        try:
            with _NO_PROXY.open(req, timeout=self.timeout_s) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise HTTPStatusError(f"{self.base_url}: {method} {path} -> HTTP {e.code}: {detail}", e.code) from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw.decode(errors="replace")

    def request(self, method: str, path: str, body: Optional[dict] = None, retry: bool = True) -> Any:
        """One call; with `retry`, connection failures and 500/502-504 are retried with exponential
        backoff, then raised as SGLangServerUnavailable naming the server."""
        attempts = 1 + (self.retries if retry else 0)
        for i in range(attempts):
            try:
                return self._once(method, path, body)
            except HTTPStatusError as e:
                if e.status not in _TRANSIENT_HTTP:
                    raise
                err: BaseException = e
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout) as e:
                err = e
            if i + 1 < attempts:
                time.sleep(self.backoff_s * (2 ** i))
        raise P.SGLangServerUnavailable(
            f"SGLang server {self.base_url} failed {method} {path} after {attempts} attempt(s): {err}")

    def post(self, path: str, body: Optional[dict] = None, retry: bool = False) -> Any:
        out = self.request("POST", path, body if body is not None else {}, retry=retry)
        if isinstance(out, dict):
            check_ok(out, f"{self.base_url}{path}")
        return out

    def weight_version(self) -> str:
        return str(self.request("GET", "/model_info")["weight_version"])

    def context_length(self) -> int:
        """The served model's context length (GET /v1/models: data[0].max_model_len, which is
        the tokenizer manager's model_config.context_len that /generate validates against)."""
        cards = self.request("GET", "/v1/models")["data"]
        return int(cards[0]["max_model_len"])


def on_all(servers: list[Server], fn: Callable[[Server], Any], timeout: Optional[float]) -> list:
    calls = [Background(fn, s) for s in servers]
    return [c.result(timeout) for c in calls]


class SGLangServerEngine(RolloutEngine):
    """One or more SGLang servers (data-parallel replicas) driven over HTTP.

    generate() splits the prompts into contiguous shares, one per server, and keeps the order.
    Weights go out by one NCCL broadcast per bucket from the trainer's rank 0 that every server
    receives: the group has world size 1 + sum of the servers' TP sizes.
    """

    def __init__(self, base_urls: str | list[str], timeout_s: float = 3600.0, bucket_bytes: int = 1 << 30,
                 weight_update_session: bool = True, api_key: Optional[str] = None,
                 deterministic: bool = False, retries: int = 3, backoff_s: float = 1.0):
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls:
            raise ValueError("SGLangServerEngine needs at least one server URL")
        self.servers = [Server(u, timeout_s, api_key, retries, backoff_s) for u in urls]
        self.timeout_s = timeout_s
        self.bucket_bytes = bucket_bytes
        self.weight_update_session = weight_update_session  # False for SGLang < 0.5.23
        self.deterministic = deterministic
        self._version: Optional[str] = None
        self._context_len: dict[str, int] = {}
        self._group = None
        self._group_name = "weight_update_group"
        self.failed_rows = 0  # rows that came back aborted or could not be sent, since start

    def _post(self, path: str, body: Optional[dict] = None) -> list:
        return on_all(self.servers, lambda s: s.post(path, body), self.timeout_s)

    # ---- generation ----------------------------------------------------------------------------
    def _limits(self, server: Server, prompts: list[list[int]], sp: SamplingParams) -> list[int]:
        if server.base_url not in self._context_len:
            try:
                self._context_len[server.base_url] = server.context_length()
            except (HTTPStatusError, KeyError, IndexError, TypeError, ValueError) as e:
                # a server without /v1/models: no clamping; an over-long row is isolated on HTTP 400
                log.warning("cannot read the context length of %s (%s); max_new_tokens is not clamped",
                            server.base_url, e)
                self._context_len[server.base_url] = 1 << 62
        ctx = self._context_len[server.base_url]
        return [min(sp.max_new_tokens, ctx - len(p)) for p in prompts]

    def _generate_on(self, server: Server, lo: int, prompts: list[list[int]], sp: SamplingParams
                     ) -> list[RolloutSample]:
        """Samples of prompts[lo:...] from one server; prompts that cannot run are failed samples."""
        limits = self._limits(server, prompts, sp)
        version = self._version or "unknown"
        fits = [i for i, m in enumerate(limits) if m >= 1]
        out: dict[int, list[RolloutSample]] = {
            i: [P.failed_sample(i, prompts[i], version) for _ in range(sp.n)]
            for i in range(len(prompts)) if limits[i] < 1}
        if fits:
            part = [prompts[i] for i in fits]
            body = P.build_generate_payload(part, sp, deterministic=self.deterministic,
                                            max_new_tokens=[limits[i] for i in fits])
            try:
                got = P.parse_generate_response(server.request("POST", "/generate", body), part, sp,
                                                expected_version=self._version)
                for s in got:
                    s.prompt_index = fits[s.prompt_index]
                    out.setdefault(s.prompt_index, []).append(s)
            except HTTPStatusError as e:
                if e.status != 400:
                    raise
                if len(fits) == 1:
                    log.warning("SGLang refused prompt %d: %s", lo + fits[0], e)
                    out[fits[0]] = [P.failed_sample(fits[0], prompts[fits[0]], version) for _ in range(sp.n)]
                else:  # one bad row fails the whole batch: isolate it, keep the others
                    for i in fits:
                        sub = replace(sp, seed=None if sp.seed is None else sp.seed + i * sp.n)
                        for s in self._generate_on(server, lo + i, [prompts[i]], sub):
                            s.prompt_index = i
                            out.setdefault(i, []).append(s)
        samples = [s for i in sorted(out) for s in out[i]]
        for s in samples:
            s.prompt_index += lo
        return samples

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[RolloutSample]:
        prompts = list(prompt_token_ids)
        k = len(self.servers)
        bounds = [len(prompts) * i // k for i in range(k + 1)]
        shares = [(i, bounds[i], prompts[bounds[i]:bounds[i + 1]]) for i in range(k) if bounds[i + 1] > bounds[i]]

        def run(server, lo, part):
            # distinct seeds per share, so replicas do not repeat each other's samples
            sp = sampling if sampling.seed is None else replace(sampling, seed=sampling.seed + lo * sampling.n)
            return self._generate_on(server, lo, part, sp)

        calls = [(i, lo, part, Background(run, self.servers[i], lo, part)) for i, lo, part in shares]
        results, dead = {}, {}
        for i, lo, part, c in calls:
            try:
                results[lo] = c.result(self.timeout_s)
            except P.SGLangServerUnavailable as e:
                dead[i] = e
        for i, lo, part, _ in calls:  # re-route the shares of unreachable servers
            if lo in results:
                continue
            for j in [j for j in range(k) if j not in dead]:
                try:
                    results[lo] = run(self.servers[j], lo, part)
                    log.warning("SGLang server %s is down; its %d prompts ran on %s",
                                self.servers[i].base_url, len(part), self.servers[j].base_url)
                    break
                except P.SGLangServerUnavailable as e:
                    dead[j] = e
            else:
                raise P.SGLangServerUnavailable(
                    "no SGLang server could take the rollout: " + "; ".join(str(e) for e in dead.values()))
        samples = [x for lo in sorted(results) for x in results[lo]]
        self.failed_rows += sum(s.finish_reason == "abort" for s in samples)
        if self._version is None:
            self._version = next((s.weight_version for s in samples if s.finish_reason != "abort"), None)
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
        calls = [Background(s.post, "/init_weights_update_group", P.build_init_group_payload(
            master_address, master_port, 1 + i * server_tp_size, world_size, group_name, backend))
            for i, s in enumerate(self.servers)]
        if create_local_group is None:
            from .weight_sync import init_weight_sync_process_group

            def create_local_group(ws):
                return init_weight_sync_process_group(master_address, master_port, ws, 0, group_name, backend)
        local = Background(create_local_group, world_size)
        self._await(calls, local, "init_weights_update_group")
        self._group, self._group_name = local.result(), group_name
        return self._group

    def _await(self, calls: list[Background], local: Background, what: str) -> None:
        """Wait for the servers' replies and our side of a collective together; a server that
        answers with an error fails this at once (its peers would otherwise wait for it until
        the group's timeout)."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            for s, c in zip(self.servers, calls):
                err = c.failed()
                if err is not None:
                    self._version = None  # whatever the servers now hold is not a known version
                    raise P.SGLangResponseError(f"{what}: server {s.base_url} refused: {err}") from err
            err = local.failed()
            if err is not None:
                raise err
            if local.done() and all(c.done() for c in calls):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not finish within {self.timeout_s:.0f}s")
            time.sleep(0.01)

    def update_weights(self, named_tensors: NamedTensors, version: int | str,
                       broadcast: Optional[Callable[[torch.Tensor], None]] = None) -> None:
        """Broadcast HF-named tensors to every server, one flattened bucket at a time, then check
        the version. `broadcast(tensor)` defaults to torch.distributed.broadcast(src=0) on the
        group from init_weights_update_group; tensors must be on the GPU for NCCL."""
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
            for bucket, last in P.with_last(P.bucket_named_tensors(named_tensors, self.bucket_bytes)):
                payload = P.build_update_from_distributed_payload(
                    bucket, self._group_name, flush_cache=last, version=version if last else None)
                flat = P.flatten_bucket(bucket)
                # the servers answer only after receiving the whole bucket: post first, then send
                calls = [Background(s.post, "/update_weights_from_distributed", payload) for s in self.servers]
                self._await(calls, Background(broadcast, flat), "update_weights_from_distributed")
        finally:
            if self.weight_update_session:
                self._post("/end_weight_update", {})
        got = on_all(self.servers, lambda s: s.weight_version(), self.timeout_s)
        bad = {s.base_url: v for s, v in zip(self.servers, got) if v != version}
        if bad:
            self._version = None
            raise P.SGLangResponseError(f"after update_weights, server(s) report weight_version {bad}, "
                                        f"expected {version!r}")
        self._version = version

    def flush_cache(self) -> None:
        on_all(self.servers, lambda s: s.request("POST", "/flush_cache", {}), self.timeout_s)

    def release_memory(self, tags: Optional[list[str]] = None) -> None:
        self._post("/release_memory_occupation", P.build_memory_payload(tags))

    def resume_memory(self, tags: Optional[list[str]] = None) -> None:
        self._post("/resume_memory_occupation", P.build_memory_payload(tags))
