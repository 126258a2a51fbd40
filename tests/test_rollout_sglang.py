"""SGLang client tests. Without sglang: pure payload functions, the HTTP client against a fake
server on 127.0.0.1, and the colocated call sequence against a fake Engine. With sglang
(`-m sglang`, GPU machines): the payloads are checked against SGLang's own dataclasses."""
import importlib.util
import json
import pickle
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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
    p = P.build_generate_payload([[1, 2], [3]], sp)
    assert p["input_ids"] == [[1, 2], [1, 2], [3], [3]]
    assert p["return_logprob"] is True and p["logprob_start_len"] == -1
    assert [s["sampling_seed"] for s in p["sampling_params"]] == [10, 11, 12, 13]
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
                 "shapes": [[4], [2, 2], [3]], "group_name": "g", "flush_cache": False, "weight_version": None}
    assert P.build_init_group_payload("10.0.0.1", "2900", 1, 3) == {
        "master_address": "10.0.0.1", "master_port": 2900, "rank_offset": 1, "world_size": 3,
        "group_name": "weight_update_group", "backend": "nccl"}
    t = P.build_update_from_tensor_payload(["x", "y"], "5", True)
    assert t == {"serialized_named_tensors": ["x", "y"], "load_format": "flattened_bucket",
                 "flush_cache": True, "weight_version": "5"}
    assert P.build_memory_payload(["weights"]) == {"tags": ["weights"]}
    assert P.build_memory_payload(None) == {"tags": None}
    with pytest.raises(ValueError):
        P.build_memory_payload(["weight"])


# ---------------------------------------------------------------- fake HTTP server
class FakeSGLang:
    def __init__(self, apply_version=True):
        self.requests = []
        self.version = "default"
        self.apply_version = apply_version
        self.broadcasts = []
        self.lock = threading.Condition()
        self.in_session = False
        fake = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _reply(self, code, obj):
                raw = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                fake.requests.append(("GET", self.path, None))
                if self.path == "/model_info":
                    return self._reply(200, {"model_path": "m", "weight_version": fake.version})
                self._reply(404, {"detail": "Not Found"})

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n) or b"null")
                fake.requests.append(("POST", self.path, body))
                code, obj = fake.handle(self.path, body)
                self._reply(code, obj)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def handle(self, path, body):
        ok = {"success": True, "message": "Success"}
        if path == "/generate":
            return 200, _resp(body["input_ids"], version=self.version)
        if path == "/begin_weight_update":
            self.in_session = True
            return 200, ok
        if path == "/end_weight_update":
            self.in_session = False
            return 200, ok
        if path == "/init_weights_update_group":
            return 200, ok
        if path == "/update_weights_from_distributed":
            if not self.in_session:
                return 200, {"success": False, "message": "no weight-update session"}
            # like SGLang, the request returns only after the trainer broadcast every tensor
            with self.lock:
                got = self.lock.wait_for(lambda: len(self.broadcasts) >= self.expected_broadcasts(body), 10)
            if not got:
                return 200, {"success": False, "message": "broadcast never arrived"}
            if body.get("weight_version") is not None and self.apply_version:
                self.version = body["weight_version"]
            return 200, ok
        if path in ("/release_memory_occupation", "/resume_memory_occupation", "/flush_cache"):
            return 200, ok
        return 404, {"detail": "Not Found"}

    def expected_broadcasts(self, body):
        seen = 0
        for m, p, b in self.requests:
            if p == "/update_weights_from_distributed":
                seen += len(b["names"])
                if b is body:
                    return seen
        return seen

    def broadcast(self, t):
        with self.lock:
            self.broadcasts.append(t.clone())
            self.lock.notify_all()

    def posts(self, path):
        return [b for m, p, b in self.requests if p == path and m == "POST"]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    f = FakeSGLang()
    yield f
    f.close()


def test_http_generate_and_version(fake):
    eng = SGLangServerEngine(fake.url, timeout_s=20)
    assert eng.weight_version == "default"
    out = eng.generate([[1, 2], [7]], SamplingParams(n=2, max_new_tokens=4, temperature=0.5))
    assert len(out) == 4 and out[2].response_ids == [8, 2] and out[0].weight_version == "default"
    body = fake.posts("/generate")[0]
    assert body["input_ids"] == [[1, 2], [1, 2], [7], [7]]
    assert body["sampling_params"][0]["temperature"] == 0.5


def test_http_weight_update_flow(fake):
    eng = SGLangServerEngine(fake.url, timeout_s=20, bucket_bytes=64)
    group = eng.init_weights_update_group("10.1.2.3", 29555, create_local_group=lambda ws: ("G", ws))
    assert group == ("G", 2)
    init = fake.posts("/init_weights_update_group")[0]
    assert (init["master_port"], init["world_size"], init["rank_offset"]) == (29555, 2, 1)
    ts = [("model.embed_tokens.weight", torch.arange(12.0).view(3, 4)),
          ("model.norm.weight", torch.ones(4)), ("lm_head.weight", torch.full((4, 4), 2.0))]
    eng.update_weights(iter(ts), version=5, broadcast=fake.broadcast)
    ups = fake.posts("/update_weights_from_distributed")
    assert [u["names"] for u in ups] == [["model.embed_tokens.weight", "model.norm.weight"], ["lm_head.weight"]]
    assert [u["flush_cache"] for u in ups] == [False, True]
    assert [u["weight_version"] for u in ups] == [None, "5"]
    assert [tuple(t.shape) for t in fake.broadcasts] == [(3, 4), (4,), (4, 4)]
    assert torch.equal(fake.broadcasts[0], ts[0][1])
    paths = [p for m, p, _ in fake.requests if p != "/init_weights_update_group"]
    assert paths[0] == "/begin_weight_update" and paths[-2:] == ["/end_weight_update", "/model_info"]
    assert eng.weight_version == "5"
    assert {o.weight_version for o in eng.generate([[1]], SamplingParams())} == {"5"}
    eng.release_memory(["kv_cache", "weights"])
    eng.resume_memory(["weights"])
    assert fake.posts("/release_memory_occupation")[0] == {"tags": ["kv_cache", "weights"]}
    eng.flush_cache()


def test_http_version_not_applied_raises():
    f = FakeSGLang(apply_version=False)
    try:
        eng = SGLangServerEngine(f.url, timeout_s=20)
        with pytest.raises(P.SGLangResponseError, match="expected '2'"):
            eng.update_weights([("w", torch.ones(2))], version=2, broadcast=f.broadcast)
        # a later generate from stale weights is refused too
        eng._version = "2"
        with pytest.raises(P.SGLangResponseError, match="weight_version"):
            eng.generate([[1]], SamplingParams())
    finally:
        f.close()


def test_two_servers_split_and_shared_broadcast():
    a, b = FakeSGLang(), FakeSGLang()
    try:
        eng = SGLangServerEngine([a.url, b.url], timeout_s=20, bucket_bytes=1 << 20)
        eng.init_weights_update_group("h", 1234, server_tp_size=2, create_local_group=lambda ws: ws)
        inits = a.posts("/init_weights_update_group") + b.posts("/init_weights_update_group")
        assert [(i["rank_offset"], i["world_size"]) for i in inits] == [(1, 5), (3, 5)]
        prompts = [[10], [20], [30]]
        out = eng.generate(prompts, SamplingParams(n=2, seed=100))
        assert [o.prompt_index for o in out] == [0, 0, 1, 1, 2, 2]
        assert [o.response_ids[0] for o in out] == [11, 11, 21, 21, 31, 31]
        ga, gb = a.posts("/generate")[0], b.posts("/generate")[0]
        assert ga["input_ids"] == [[10], [10]] and gb["input_ids"] == [[20], [20], [30], [30]]
        seeds = [p["sampling_seed"] for p in ga["sampling_params"] + gb["sampling_params"]]
        assert seeds == list(range(100, 106))

        def both(t):  # one NCCL broadcast reaches every server
            a.broadcast(t)
            b.broadcast(t)
        eng.update_weights([("w", torch.ones(3)), ("v", torch.zeros(2))], version="s1", broadcast=both)
        assert a.version == b.version == "s1" == eng.weight_version
        assert len(a.broadcasts) == len(b.broadcasts) == 2
    finally:
        a.close()
        b.close()


def test_http_errors_surface(fake):
    eng = SGLangServerEngine(fake.url, timeout_s=20, weight_update_session=False)
    # without begin_weight_update the fake (like SGLang 0.5.23) refuses the update
    with pytest.raises(P.SGLangResponseError, match="no weight-update session"):
        eng.update_weights([("w", torch.ones(2))], version=1, broadcast=fake.broadcast)
    with pytest.raises(ValueError, match="no tensors"):
        SGLangServerEngine(fake.url, weight_update_session=False).update_weights([], 1, broadcast=fake.broadcast)
    with pytest.raises(P.SGLangResponseError, match="HTTP 404"):
        eng.servers[0].post("/no_such_endpoint", {})
    with pytest.raises(RuntimeError, match="init_weights_update_group"):
        SGLangServerEngine(fake.url).update_weights([("w", torch.ones(2))], version=1)


# ---------------------------------------------------------------- colocated, fake Engine
class _Bucket:
    """Stand-in for FlattenedTensorBucket: same constructor keyword and getters."""

    def __init__(self, named_tensors):
        self.meta = [(n, tuple(t.shape), t.dtype) for n, t in named_tensors]
        self.flat = torch.cat([t.flatten() for _, t in named_tensors])

    def get_flattened_tensor(self):
        return self.flat

    def get_metadata(self):
        return self.meta


class FakeEngine:
    def __init__(self, with_version_kw=True):
        self.calls = []
        self.server_args = type("SA", (), {"tp_size": 2, "weight_version": "default"})()
        self.version = "default"
        if not with_version_kw:
            self.update_weights_from_tensor = self._update_no_version

    def begin_weight_update(self):
        self.calls.append(("begin",))
        return True, "ok"

    def end_weight_update(self):
        self.calls.append(("end",))
        return True, "ok"

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True, weight_version=None):
        self.calls.append(("tensor", [pickle.loads(x) for x in named_tensors], load_format, flush_cache, weight_version))
        if weight_version is not None:
            self.version = weight_version
        return True, "Success"

    def _update_no_version(self, named_tensors, load_format=None, flush_cache=True):
        return FakeEngine.update_weights_from_tensor(self, named_tensors, load_format, flush_cache)

    def update_weight_version(self, new_version):
        self.calls.append(("version", new_version))
        self.version = new_version
        return {"success": True}

    def generate(self, input_ids, sampling_params, return_logprob, logprob_start_len):
        return _resp(input_ids, version=self.version)

    def release_memory_occupation(self, tags=None):
        self.calls.append(("release", tags))

    def resume_memory_occupation(self, tags=None):
        self.calls.append(("resume", tags))


@pytest.mark.parametrize("with_version_kw", [True, False])
def test_colocated_call_sequence(with_version_kw):
    fe = FakeEngine(with_version_kw)
    eng = SGLangColocatedEngine(fe, bucket_bytes=40, flatten=_Bucket, serialize=pickle.dumps)
    assert eng.tp_size == 2 and eng.weight_version == "default"
    ts = [("a", torch.ones(4)), ("b", torch.full((2, 3), 3.0)), ("c", torch.zeros(2))]
    eng.update_weights(ts, version=9)
    kinds = [c[0] for c in fe.calls]
    assert kinds[0] == "begin" and kinds[1:3] == ["tensor", "tensor"] and kinds[3] == "end"
    t1, t2 = fe.calls[1], fe.calls[2]
    assert len(t1[1]) == 2  # one payload per TP rank
    assert torch.equal(t1[1][0]["flattened_tensor"], t1[1][1]["flattened_tensor"])
    # 16 + 24 bytes fill the 40-byte bucket exactly; "c" opens the next one
    assert [m[0] for m in t1[1][0]["metadata"]] == ["a", "b"] and [m[0] for m in t2[1][0]["metadata"]] == ["c"]
    assert torch.equal(t1[1][0]["flattened_tensor"], torch.cat([ts[0][1], ts[1][1].flatten()]))
    assert (t1[2], t1[3], t2[3]) == ("flattened_bucket", False, True)
    if with_version_kw:
        assert (t1[4], t2[4]) == (None, "9")
    else:
        assert fe.calls[-1] == ("version", "9")
    assert eng.weight_version == "9"
    out = eng.generate([[4]], SamplingParams(n=3))
    assert len(out) == 3 and out[0].weight_version == "9"
    eng.release_memory(["weights"])
    eng.resume_memory(["weights", "kv_cache"])
    assert fe.calls[-2:] == [("release", ["weights"]), ("resume", ["weights", "kv_cache"])]


def test_colocated_failure_raises_and_closes_session():
    fe = FakeEngine()
    fe.update_weights_from_tensor = lambda **kw: (False, "boom")
    eng = SGLangColocatedEngine(fe, flatten=_Bucket, serialize=pickle.dumps)
    eng._tensor_update_takes_version = True
    with pytest.raises(P.SGLangResponseError, match="boom"):
        eng.update_weights([("a", torch.ones(1))], version=1)
    assert fe.calls[-1] == ("end",) and eng.weight_version == "default"


@pytest.mark.skipif(HAS_SGLANG, reason="sglang is installed")
def test_missing_sglang_error_names_extra():
    with pytest.raises(ImportError, match=r"pip install 'megatron-dgpo\[sglang\]'"):
        require_sglang()
    with pytest.raises(ImportError, match="megatron-dgpo"):
        SGLangColocatedEngine(model_path="x")
    assert "megatron-dgpo[sglang]" in INSTALL_HINT


# ---------------------------------------------------------------- against real sglang
@pytest.mark.sglang
def test_payloads_match_sglang_io_struct():
    from sglang.srt.managers import io_struct as io

    sp = SamplingParams(n=2, temperature=0.7, top_k=20, max_new_tokens=8, stop_token_ids=[3], seed=1)
    gen = io.GenerateReqInput(**P.build_generate_payload([[1, 2], [3]], sp))
    assert gen.input_ids == [[1, 2], [1, 2], [3], [3]]
    from sglang.srt.sampling.sampling_params import SamplingParams as SGLSamplingParams

    SGLSamplingParams(**P.build_generate_payload([[1]], sp)["sampling_params"][0])
    io.InitWeightsUpdateGroupReqInput(**P.build_init_group_payload("127.0.0.1", 29500, 1, 2))
    io.UpdateWeightsFromDistributedReqInput(**P.build_update_from_distributed_payload(
        [("w", torch.ones(2, dtype=torch.bfloat16))], "weight_update_group", True, "3"))
    io.UpdateWeightsFromTensorReqInput(**P.build_update_from_tensor_payload([b"x"], "3", True))
    io.ReleaseMemoryOccupationReqInput(**P.build_memory_payload(["weights", "kv_cache"]))
    io.ResumeMemoryOccupationReqInput(**P.build_memory_payload(["weights"]))
    io.BeginWeightUpdateReqInput()
    io.EndWeightUpdateReqInput()


@pytest.mark.sglang
def test_flattened_bucket_roundtrip_with_sglang_serializer():
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    ts = [("a", torch.randn(3, 4)), ("b", torch.randn(5))]
    (bucket,) = list(P.bucket_named_tensors(ts, 1 << 20))
    fb = FlattenedTensorBucket(named_tensors=bucket)
    blob = MultiprocessingSerializer.serialize({"flattened_tensor": fb.get_flattened_tensor(),
                                                "metadata": fb.get_metadata()})
    back = MultiprocessingSerializer.deserialize(blob)
    rec = FlattenedTensorBucket(flattened_tensor=back["flattened_tensor"], metadata=back["metadata"])
    for (n, t), (n2, t2) in zip(ts, rec.reconstruct_tensors()):
        assert n == n2 and torch.equal(t, t2)


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
