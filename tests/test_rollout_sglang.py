"""SGLang client tests: pure payload functions; server mode against SGLang 0.5.23's own HTTP app
(tests/sglang_fake.py; marked `sglang`, CI installs the wheel without GPU dependencies); the
colocated engine against an Engine modelled on 0.5.23 (signatures checked in test_sglang_contract)."""
import asyncio
import importlib.util
import json
import pickle
import threading
import time

import pytest
import torch

from megatron_dgpo.rollout import SamplingParams
from megatron_dgpo.rollout import sglang_payloads as P
from megatron_dgpo.rollout.sglang_engine import (INSTALL_HINT, SGLangColocatedEngine, SGLangServerEngine,
                                                 require_sglang)

HAS_SGLANG = importlib.util.find_spec("sglang") is not None


# ---------------------------------------------------------------- pure payloads
def test_generate_payload_rows_and_seeds():
    sp = SamplingParams(n=2, temperature=0.0, top_k=-1, max_new_tokens=7, stop_token_ids=[5], seed=10)
    p = P.build_generate_payload([[1, 2], [3]], sp, deterministic=True)
    assert p["input_ids"] == [[1, 2], [1, 2], [3], [3]]
    assert p["return_logprob"] is True and p["logprob_start_len"] == -1
    assert [s["sampling_seed"] for s in p["sampling_params"]] == [10, 11, 12, 13]
    # without --enable-deterministic-inference SGLang ignores seeds: none are sent
    assert all("sampling_seed" not in s for s in P.build_generate_payload([[1]], sp)["sampling_params"])
    # deterministic and no seed given: still one distinct seed per sample (not the server's one default)
    seeds = [s["sampling_seed"] for s in P.build_generate_payload(
        [[1]], SamplingParams(n=4), deterministic=True)["sampling_params"]]
    assert len(set(seeds)) == 4
    limited = P.build_generate_payload([[1], [2]], SamplingParams(n=2, max_new_tokens=9), max_new_tokens=[9, 3])
    assert [s["max_new_tokens"] for s in limited["sampling_params"]] == [9, 9, 3, 3]
    s0 = p["sampling_params"][0]
    assert s0["max_new_tokens"] == 7 and s0["temperature"] == 0.0 and s0["top_k"] == -1
    assert s0["stop_token_ids"] == [5] and s0["skip_special_tokens"] is False
    assert "sampling_seed" not in P.build_generate_payload([[1]], SamplingParams())["sampling_params"][0]
    json.dumps(p)


def _resp(rows, version="3", lp_ids=None):
    out = []
    for i, r in enumerate(rows):
        ids = [r[-1] + 1, 2]
        out.append({"text": "", "output_ids": ids, "meta_info": {
            "id": str(i), "finish_reason": {"type": "stop", "matched": 2} if i % 2 == 0 else {"type": "length"},
            "prompt_tokens": len(r), "weight_version": version,
            "output_token_logprobs": [[-0.25 * (j + 1), t if lp_ids is None else lp_ids, None] for j, t in enumerate(ids)]}})
    return out


def test_parse_generate_response_checks():
    sp = SamplingParams(n=2)
    prompts = [[1, 2], [3]]
    rows = P.build_generate_payload(prompts, sp)["input_ids"]
    s = P.parse_generate_response(_resp(rows), prompts, sp, expected_version="3")
    assert [x.prompt_index for x in s] == [0, 0, 1, 1]
    assert s[0].response_ids == [3, 2] and s[0].logprobs == [-0.25, -0.5]
    assert [x.finish_reason for x in s] == ["stop", "length", "stop", "length"]
    assert s[2].prompt_ids == [3] and s[2].weight_version == "3"
    with pytest.raises(P.SGLangResponseError, match="weight_version"):
        P.parse_generate_response(_resp(rows, version="2"), prompts, sp, expected_version="3")
    with pytest.raises(P.SGLangResponseError, match="expected 4 outputs"):
        P.parse_generate_response(_resp(rows[:3]), prompts, sp)
    with pytest.raises(P.SGLangResponseError, match="disagree"):
        P.parse_generate_response(_resp(rows, lp_ids=99), prompts, sp)
    bad = _resp(rows)
    del bad[1]["meta_info"]["output_token_logprobs"]
    with pytest.raises(P.SGLangResponseError, match="return_logprob"):
        P.parse_generate_response(bad, prompts, sp)


def test_weight_payloads_and_buckets():
    ts = [("a", torch.zeros(4)), ("b", torch.zeros(2, 2)), ("c", torch.zeros(100)),
          ("d", torch.zeros(3, dtype=torch.bfloat16)), ("e", torch.zeros(1))]
    buckets = list(P.bucket_named_tensors(ts, bucket_bytes=40))
    assert [[n for n, _ in b] for b in buckets] == [["a", "b"], ["c"], ["d"], ["e"]]
    d = P.build_update_from_distributed_payload(buckets[0] + [ts[3]], "g", flush_cache=False, version=None)
    assert d == {"names": ["a", "b", "d"], "dtypes": ["float32", "float32", "bfloat16"],
                 "shapes": [[4], [2, 2], [3]], "group_name": "g", "flush_cache": False, "weight_version": None,
                 "load_format": "flattened_bucket"}
    flat = P.flatten_bucket(buckets[0])
    assert flat.dtype == torch.uint8 and flat.numel() == 32
    assert P.build_init_group_payload("10.0.0.1", "2900", 1, 3) == {
        "master_address": "10.0.0.1", "master_port": 2900, "rank_offset": 1, "world_size": 3,
        "group_name": "weight_update_group", "backend": "nccl"}
    t = P.build_update_from_tensor_payload(["x", "y"], "5", True)
    assert t == {"serialized_named_tensors": ["x", "y"], "load_format": "flattened_bucket",
                 "flush_cache": True, "weight_version": "5"}
    assert P.build_memory_payload(["weights", "cuda_graph"]) == {"tags": ["weights", "cuda_graph"]}
    assert P.build_memory_payload(None) == {"tags": None}
    with pytest.raises(ValueError):
        P.build_memory_payload(["weight"])


# ---------------------------------------------------------------- server mode, against SGLang's app
# FakeSGLangServer is SGLang's own FastAPI app with a fake scheduler side (tests/sglang_fake.py).
needs_sglang = pytest.mark.sglang


class Pipe:
    """Stands in for the NCCL group: what the trainer broadcasts, the fake servers receive."""

    def __init__(self, n_servers=1):
        self.sent = []
        self.cond = threading.Condition()
        self.n = n_servers

    def broadcast(self, t):
        with self.cond:
            self.sent.append(t.clone())
            self.cond.notify_all()

    def receiver(self):
        seen = [0]

        def receive(names, dtypes, shapes, group, load_format):
            with self.cond:
                assert self.cond.wait_for(lambda: len(self.sent) > seen[0], 20)
                flat = self.sent[seen[0]]
                seen[0] += 1
            assert load_format == "flattened_bucket" and flat.dtype == torch.uint8
            from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket as FTB

            meta = FTB.empty(names, dtypes, shapes, "cpu").get_metadata()  # SGLang's receive layout
            return FTB(flattened_tensor=flat, metadata=meta).reconstruct_tensors()
        return receive


@pytest.fixture
def server():
    from tests.sglang_fake import FakeSGLangServer, FakeTokenizerManager

    pipe = Pipe()
    s = FakeSGLangServer(FakeTokenizerManager(receive=pipe.receiver()))
    s.pipe = pipe
    yield s
    s.close()


def _servers(n, **kw):
    from tests.sglang_fake import FakeSGLangServer, FakeTokenizerManager

    pipe = Pipe(n)
    out = [FakeSGLangServer(FakeTokenizerManager(receive=pipe.receiver()), **kw) for _ in range(n)]
    return out, pipe


@needs_sglang
def test_http_generate_and_version(server):
    eng = SGLangServerEngine(server.url, timeout_s=20)
    assert eng.weight_version == "default"
    out = eng.generate([[1, 2], [7]], SamplingParams(n=2, max_new_tokens=4, temperature=0.5))
    assert len(out) == 4 and out[2].response_ids[0] == 8 and out[0].weight_version == "default"
    (req,) = server.posts("generate")
    assert req.input_ids == [[1, 2], [1, 2], [7], [7]] and req.sampling_params[0]["temperature"] == 0.5
    assert req.return_logprob is True and req.logprob_start_len == -1


@needs_sglang
def test_http_weight_update_flow(server):
    eng = SGLangServerEngine(server.url, timeout_s=20, bucket_bytes=64)
    group = eng.init_weights_update_group("10.1.2.3", 29555, create_local_group=lambda ws: ("G", ws))
    assert group == ("G", 2)
    (init,) = server.posts("init")
    assert (init.master_port, init.world_size, init.rank_offset) == (29555, 2, 1)
    ts = [("model.embed_tokens.weight", torch.arange(12.0).view(3, 4)),
          ("model.norm.weight", torch.ones(4)), ("lm_head.weight", torch.full((4, 4), 2.0)),
          ("model.layers.0.mlp.up_proj.weight", torch.randn(2, 3).to(torch.bfloat16))]
    eng.update_weights(iter(ts), version=5, broadcast=server.pipe.broadcast)
    ups = server.posts("update")
    assert [u.names for u in ups] == [["model.embed_tokens.weight", "model.norm.weight"], ["lm_head.weight"],
                                      ["model.layers.0.mlp.up_proj.weight"]]
    assert [u.flush_cache for u in ups] == [False, False, True]
    assert [u.weight_version for u in ups] == [None, None, "5"]
    assert {u.load_format for u in ups} == {"flattened_bucket"}
    assert len(server.pipe.sent) == 3  # one broadcast per bucket, not per tensor
    got = [t for bucket in server.tm.received for t in bucket]
    assert [n for n, _ in got] == [n for n, _ in ts]
    assert all(torch.equal(a, b) and a.dtype == b.dtype for (_, a), (_, b) in zip(got, ts))
    assert eng.weight_version == "5" and server.tm.version == "5"
    assert {o.weight_version for o in eng.generate([[1]], SamplingParams())} == {"5"}
    eng.release_memory(["kv_cache", "weights", "cuda_graph"])
    eng.resume_memory(["weights"])
    assert server.posts("release")[0].tags == ["kv_cache", "weights", "cuda_graph"]
    eng.flush_cache()


@needs_sglang
def test_requests_bypass_proxies(server, monkeypatch):
    dead = f"http://127.0.0.1:{_closed_port()}"
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, dead)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    eng = SGLangServerEngine(server.url, timeout_s=10, retries=0)
    assert eng.weight_version == "default"
    assert len(eng.generate([[3]], SamplingParams(max_new_tokens=2))) == 1


def _closed_port():
    from tests.sglang_fake import free_port

    return free_port()  # nothing listens there: connections are refused


@needs_sglang
def test_api_key_is_sent(monkeypatch):
    from tests.sglang_fake import FakeSGLangServer

    s = FakeSGLangServer(api_key="job-secret")
    try:
        with pytest.raises(P.SGLangResponseError, match="HTTP 401"):
            SGLangServerEngine(s.url, timeout_s=10).servers[0].post("/begin_weight_update", {})
        eng = SGLangServerEngine(s.url, timeout_s=10, api_key="job-secret")
        eng.servers[0].post("/begin_weight_update", {})
        assert len(eng.generate([[3]], SamplingParams(max_new_tokens=2))) == 1
    finally:
        s.close()


@needs_sglang
def test_overlong_prompts_are_clamped_and_isolated(server):
    eng = SGLangServerEngine(server.url, timeout_s=20)
    ctx = server.tm.context_len
    prompts = [[1] * 10, [2] * (ctx - 3), [3] * ctx, [4] * 5]
    out = eng.generate(prompts, SamplingParams(n=2, max_new_tokens=8))
    assert [o.prompt_index for o in out] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [len(o.response_ids) for o in out] == [8, 8, 3, 3, 0, 0, 8, 8]
    assert [o.finish_reason for o in out][4:6] == ["abort", "abort"] and eng.failed_rows == 2
    # SGLang refuses a whole batch with HTTP 400 for one bad row: the others still come back
    server.tm.context_len = 12  # the server now validates against less than it advertised
    out = eng.generate([[1] * 3, [2] * 11, [3] * 2], SamplingParams(n=1, max_new_tokens=8))
    assert [len(o.response_ids) for o in out] == [8, 0, 8] and out[1].finish_reason == "abort"


@needs_sglang
def test_aborted_rows_become_failed_samples(server):
    server.tm.abort_rows = {1}
    out = SGLangServerEngine(server.url, timeout_s=20).generate([[5], [6]], SamplingParams(n=2, max_new_tokens=3))
    assert [o.finish_reason for o in out] == ["length", "abort", "length", "length"]
    assert out[1].response_ids == [] and out[1].logprobs == [] and len(out[2].response_ids) == 3


@needs_sglang
@pytest.mark.parametrize("fault", ["no_session", "unknown_group"])
def test_rejected_update_fails_fast(server, fault):
    eng = SGLangServerEngine(server.url, timeout_s=60, weight_update_session=fault != "no_session")
    eng.init_weights_update_group("h", 1, create_local_group=lambda ws: "G")
    if fault == "unknown_group":
        eng._group_name = "other"
    never = threading.Event()
    t0 = time.monotonic()
    with pytest.raises(P.SGLangResponseError, match="refused.*(begin_weight_update|Group other)"):
        eng.update_weights([("w", torch.ones(2))], version=1, broadcast=lambda t: never.wait(60))
    assert time.monotonic() - t0 < 10  # not the broadcast's (NCCL's) timeout


@needs_sglang
def test_version_not_applied_raises(server):
    eng = SGLangServerEngine(server.url, timeout_s=20)
    eng.init_weights_update_group("h", 1, create_local_group=lambda ws: "G")

    def receive_and_forget(*a):
        got = server.pipe.receiver()(*a)
        server.tm.version = "stale"
        return got
    server.tm.receive = receive_and_forget
    orig = server.tm.update_weights_from_distributed

    async def keep_stale(obj, request=None):
        ok = await orig(obj, request)
        server.tm.version = "stale"
        return ok
    server.tm.update_weights_from_distributed = keep_stale
    with pytest.raises(P.SGLangResponseError, match="expected '2'"):
        eng.update_weights([("w", torch.ones(2))], version=2, broadcast=server.pipe.broadcast)


@needs_sglang
def test_two_servers_split_seeds_and_shared_broadcast():
    (a, b), pipe = _servers(2)
    try:
        eng = SGLangServerEngine([a.url, b.url], timeout_s=20, bucket_bytes=1 << 20, deterministic=True)
        eng.init_weights_update_group("h", 1234, server_tp_size=2, create_local_group=lambda ws: ws)
        assert [(i.rank_offset, i.world_size) for i in a.posts("init") + b.posts("init")] == [(1, 5), (3, 5)]
        out = eng.generate([[10], [20], [30]], SamplingParams(n=2, seed=100))
        assert [o.prompt_index for o in out] == [0, 0, 1, 1, 2, 2]
        ga, gb = a.posts("generate")[0], b.posts("generate")[0]
        assert ga.input_ids == [[10], [10]] and gb.input_ids == [[20], [20], [30], [30]]
        seeds = [p["sampling_seed"] for p in ga.sampling_params + gb.sampling_params]
        assert seeds == list(range(100, 106))  # deterministic: every sample its own seed
        assert out[0].response_ids != out[1].response_ids

        def both(t):  # one NCCL broadcast reaches every server
            pipe.broadcast(t)
            pipe.broadcast(t)
        a.tm.receive, b.tm.receive = pipe.receiver(), pipe.receiver()
        pipe.sent.clear()
        eng.update_weights([("w", torch.ones(3)), ("v", torch.zeros(2))], version="s1", broadcast=both)
        assert a.tm.version == b.tm.version == "s1" == eng.weight_version
    finally:
        a.close()
        b.close()


@needs_sglang
def test_dead_server_is_retried_then_rerouted():
    (a, b), _ = _servers(2)
    try:
        eng = SGLangServerEngine([a.url, b.url], timeout_s=20, retries=2, backoff_s=0.05)
        eng.generate([[1]], SamplingParams(max_new_tokens=2))  # learn the context lengths

        async def die():  # the server goes away in the middle of the batch
            b.server.should_exit = True
            await asyncio.sleep(5)
        b.tm.on_generate = die
        out = eng.generate([[1], [2], [3], [4]], SamplingParams(n=1, max_new_tokens=2))
        assert [o.prompt_index for o in out] == [0, 1, 2, 3] and all(o.response_ids for o in out)
        assert len(a.posts("generate")) >= 2  # its own share and b's
        a.close()
        with pytest.raises(P.SGLangServerUnavailable, match="no SGLang server could take the rollout"):
            eng.generate([[1], [2]], SamplingParams(max_new_tokens=2))
    finally:
        a.close()
        b.close()


def test_http_errors_surface():
    from tests.sglang_fake import free_port

    eng = SGLangServerEngine(f"http://127.0.0.1:{free_port()}", timeout_s=5, retries=1, backoff_s=0.01)
    with pytest.raises(P.SGLangServerUnavailable, match="after 2 attempt"):
        eng.servers[0].request("GET", "/model_info")
    with pytest.raises(ValueError, match="no tensors"):
        SGLangServerEngine(eng.servers[0].base_url, weight_update_session=False).update_weights(
            [], 1, broadcast=lambda t: None)
    with pytest.raises(RuntimeError, match="init_weights_update_group"):
        eng.update_weights([("w", torch.ones(2))], version=1)

# ---------------------------------------------------------------- colocated, Engine modelled on 0.5.23
class _Bucket:
    """Stand-in for FlattenedTensorBucket: same constructor keyword and getters."""

    def __init__(self, named_tensors):
        self.meta = [(n, tuple(t.shape), t.dtype) for n, t in named_tensors]
        self.flat = torch.cat([t.flatten() for _, t in named_tensors])

    def get_flattened_tensor(self):
        return self.flat

    def get_metadata(self):
        return self.meta


class _Req:
    """UpdateWeightsFromTensorReqInput's fields (the contract test checks them against SGLang)."""

    def __init__(self, serialized_named_tensors, load_format=None, flush_cache=True, weight_version=None):
        self.serialized_named_tensors, self.load_format = serialized_named_tensors, load_format
        self.flush_cache, self.weight_version = flush_cache, weight_version


class FakeTokenizerManager:
    """tokenizer_control_mixin.TokenizerControlMixin.update_weights_from_tensor: loads, then sets
    weight_version only when the request carries one; config_value reads it back."""

    def __init__(self, fail_at=None):
        self.calls, self.version, self.fail_at = [], "default", fail_at

    async def update_weights_from_tensor(self, obj, request=None):
        self.calls.append(("tensor", [pickle.loads(x) for x in obj.serialized_named_tensors], obj.load_format,
                           obj.flush_cache, obj.weight_version))
        if self.fail_at is not None and len(self.calls) > self.fail_at:
            return False, "boom"
        if obj.weight_version is not None:
            self.version = obj.weight_version
        return True, "Success"

    def config_value(self, name):
        return self.version if name == "weight_version" else None


class FakeEngine:
    """sglang.srt.entrypoints.engine.Engine 0.5.23: the methods and attributes we use, with its
    signatures (tests/test_sglang_contract.py compares them); no update_weight_version, and
    update_weights_from_tensor without weight_version."""

    def __init__(self, fail_at=None):
        import asyncio

        self.loop = asyncio.new_event_loop()
        self.tokenizer_manager = FakeTokenizerManager(fail_at)
        self.server_args = type("SA", (), {"tp_size": 2})()
        self.calls = self.tokenizer_manager.calls

    def begin_weight_update(self, selector="all"):
        self.calls.append(("begin",))
        return True, "ok"

    def end_weight_update(self):
        self.calls.append(("end",))
        return True, "ok"

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        raise AssertionError("cannot carry weight_version in 0.5.23; the engine must not use it")

    def generate(self, prompt=None, sampling_params=None, input_ids=None, return_logprob=False,
                 logprob_start_len=None, **kw):
        return _resp(input_ids, version=self.tokenizer_manager.version)

    def release_memory_occupation(self, tags=None):
        self.calls.append(("release", tags))

    def resume_memory_occupation(self, tags=None):
        self.calls.append(("resume", tags))


def test_colocated_call_sequence():
    fe = FakeEngine()
    eng = SGLangColocatedEngine(fe, bucket_bytes=40, flatten=_Bucket, serialize=pickle.dumps, request_type=_Req)
    assert eng.tp_size == 2 and eng.weight_version == "default"
    ts = [("a", torch.ones(4)), ("b", torch.full((2, 3), 3.0)), ("c", torch.zeros(2))]
    eng.update_weights(ts, version=9)
    kinds = [c[0] for c in fe.calls]
    assert kinds == ["begin", "tensor", "tensor", "end"]
    t1, t2 = fe.calls[1], fe.calls[2]
    assert len(t1[1]) == 2  # one payload per TP rank
    assert torch.equal(t1[1][0]["flattened_tensor"], t1[1][1]["flattened_tensor"])
    # 16 + 24 bytes fill the 40-byte bucket exactly; "c" opens the next one
    assert [m[0] for m in t1[1][0]["metadata"]] == ["a", "b"] and [m[0] for m in t2[1][0]["metadata"]] == ["c"]
    assert torch.equal(t1[1][0]["flattened_tensor"], torch.cat([ts[0][1], ts[1][1].flatten()]))
    assert (t1[2], t1[3], t2[3]) == ("flattened_bucket", False, True)
    assert (t1[4], t2[4]) == (None, "9")  # the version rides on the last bucket
    assert eng.weight_version == "9" and fe.tokenizer_manager.version == "9"
    out = eng.generate([[4]], SamplingParams(n=3))
    assert len(out) == 3 and out[0].weight_version == "9"
    eng.release_memory(["weights", "cuda_graph"])
    eng.resume_memory(["weights", "kv_cache"])
    assert fe.calls[-2:] == [("release", ["weights", "cuda_graph"]), ("resume", ["weights", "kv_cache"])]


def test_colocated_failure_marks_weights_unknown():
    fe = FakeEngine(fail_at=1)  # the first bucket loads, the second fails
    eng = SGLangColocatedEngine(fe, bucket_bytes=16, flatten=_Bucket, serialize=pickle.dumps, request_type=_Req)
    with pytest.raises(P.SGLangResponseError, match="boom"):
        eng.update_weights([("a", torch.ones(4)), ("b", torch.ones(4))], version=1)
    assert fe.calls[-1] == ("end",)  # the session is closed
    with pytest.raises(P.SGLangResponseError, match="partly updated"):
        eng.generate([[1]], SamplingParams())
    fe.tokenizer_manager.fail_at = None
    eng.update_weights([("a", torch.ones(4)), ("b", torch.ones(4))], version=2)
    assert eng.weight_version == "2" and len(eng.generate([[1]], SamplingParams())) == 1

@pytest.mark.skipif(HAS_SGLANG, reason="sglang is installed")
def test_missing_sglang_error_names_extra():
    with pytest.raises(ImportError, match=r"pip install 'megatron-dgpo\[sglang\]'"):
        require_sglang()
    with pytest.raises(ImportError, match="megatron-dgpo"):
        SGLangColocatedEngine(model_path="x")
    assert "megatron-dgpo[sglang]" in INSTALL_HINT


def test_from_train_config_validation():
    from types import SimpleNamespace as NS

    from megatron_dgpo.rollout.sglang_engine import from_train_config

    def cfg(**sg):
        base = dict(mode="server", server_urls=[], model_path=None, tp_size=1, mem_fraction_static=0.5,
                    nccl_master_address="127.0.0.1", nccl_master_port=29600)
        return NS(seed=1, rollout=NS(weight_sync_bucket_mb=8, sglang=NS(**{**base, **sg})))

    with pytest.raises(ValueError, match="server_urls"):
        from_train_config(cfg())
    with pytest.raises(ValueError, match="model_path"):
        from_train_config(cfg(mode="colocated"))


def test_from_train_config_server_wiring(monkeypatch):
    """Rank 0 rendezvouses at its own host (torchrun may make any node rank 0), and the job's
    API key comes from the environment, never from the config file."""
    from megatron_dgpo.config import TrainConfig
    from megatron_dgpo.configio import load_config
    from megatron_dgpo.rollout import sglang_engine as SE

    seen = {}
    monkeypatch.setattr(SE.SGLangServerEngine, "init_weights_update_group",
                        lambda self, addr, port, server_tp_size: seen.update(addr=addr, port=port, tp=server_tp_size))
    monkeypatch.setattr(SE, "trainer_host_address", lambda: "trainer-rank0-host")
    monkeypatch.setenv("DGPO_SGLANG_API_KEY", "k123")
    cfg = load_config(TrainConfig, None, ["rollout.engine=sglang", "rollout.sglang.server_urls=[http://s:1]",
                                          "rollout.sglang.tp_size=2", "rollout.sglang.deterministic=true",
                                          "rollout.sglang.request_timeout_s=77"])
    eng = SE.from_train_config(cfg)
    assert seen == {"addr": "trainer-rank0-host", "port": 29600, "tp": 2}
    assert eng.servers[0].api_key == "k123" and eng.deterministic and eng.timeout_s == 77
    cfg.rollout.sglang.nccl_master_address = "10.0.0.9"
    SE.from_train_config(cfg)
    assert seen["addr"] == "10.0.0.9"


def test_waiting_ranks_use_the_configured_timeout(monkeypatch):
    """Ranks without an engine wait on a gloo group whose timeout is rollout.sglang.wait_timeout_s."""
    from megatron_dgpo.rl import rollout_stage as RS

    made, sent = [], []
    monkeypatch.setattr(RS.dist, "new_group", lambda backend, timeout: made.append((backend, timeout)) or "WG")
    monkeypatch.setattr(RS.dist, "broadcast_object_list", lambda box, src, group=None: sent.append(group))
    monkeypatch.setattr(RS, "_world", lambda: (1, 2))
    RS._wait_group.cache_clear()
    RS.generate(None, [[1]], SamplingParams(), distributed=False, wait_timeout_s=5000.0)
    RS.generate(None, [[1]], SamplingParams(), distributed=False, wait_timeout_s=5000.0)
    assert [(b, t.total_seconds()) for b, t in made] == [("gloo", 5000.0)] and sent == ["WG", "WG"]


@needs_sglang
def test_unknown_context_length_still_isolates_overlong_rows(server, monkeypatch):
    """A server whose /v1/models cannot be read: no clamping, but a row SGLang refuses (HTTP 400
    for the whole batch) still costs only that row."""
    from megatron_dgpo.rollout.sglang_server import HTTPStatusError, Server

    def no_models(self):
        raise HTTPStatusError(f"{self.base_url}: GET /v1/models -> HTTP 404", 404)
    monkeypatch.setattr(Server, "context_length", no_models)
    ctx = server.tm.context_len
    out = SGLangServerEngine(server.url, timeout_s=20).generate([[1] * 4, [2] * (ctx - 2)],
                                                               SamplingParams(max_new_tokens=8))
    assert [len(o.response_ids) for o in out] == [8, 0] and out[1].finish_reason == "abort"
