"""Contract tests: every fact the SGLang path relies on, checked against sglang 0.5.23's and
sglang-router 0.3.2's own code (installed without GPU dependencies by `make test`).

- request bodies: each key we send is a field of SGLang's request type (its FastAPI app ignores
  unknown keys silently, so a renamed field would otherwise go unnoticed); the bodies themselves
  go through SGLang's app in tests/test_rollout_sglang.py;
- colocated mode: the Engine / TokenizerManager methods and arguments we call;
- the launcher's command lines, parsed by SGLang's and the router's real argument parsers;
- the weight broadcast: our trainer side and SGLang's own init_custom_process_group + receiving
  code (WeightUpdater) exchange a small model's weights over gloo, flattened buckets included.
"""
import inspect
import multiprocessing as mp
import shlex

import pytest
import torch

from megatron_dgpo.rollout import SamplingParams
from megatron_dgpo.rollout import sglang_payloads as P
from tests import sglang_cpu

pytestmark = pytest.mark.sglang


@pytest.fixture(scope="module")
def io():
    sglang_cpu.prepare()
    from sglang.srt.managers import io_struct

    return io_struct


def _fields(cls) -> set:
    import dataclasses

    import msgspec

    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return {f.name for f in msgspec.structs.fields(cls)}


def test_every_body_key_is_a_sglang_field(io):
    sp = SamplingParams(n=2, temperature=0.7, top_k=20, max_new_tokens=8, stop_token_ids=[3], seed=1)
    gen = P.build_generate_payload([[1, 2]], sp, deterministic=True, max_new_tokens=[5])
    assert set(gen) <= _fields(io.GenerateReqInput)
    from sglang.srt.sampling.sampling_params import SamplingParams as SGLSamplingParams

    assert set(gen["sampling_params"][0]) <= set(inspect.signature(SGLSamplingParams).parameters)
    SGLSamplingParams(**gen["sampling_params"][0])
    bodies = {
        io.InitWeightsUpdateGroupReqInput: P.build_init_group_payload("127.0.0.1", 29500, 1, 2),
        io.UpdateWeightsFromDistributedReqInput: P.build_update_from_distributed_payload(
            [("w", torch.ones(2, dtype=torch.bfloat16))], "weight_update_group", True, "3"),
        io.UpdateWeightsFromTensorReqInput: P.build_update_from_tensor_payload([b"x"], "3", True),
        io.ReleaseMemoryOccupationReqInput: P.build_memory_payload(["weights", "kv_cache", "cuda_graph"]),
        io.ResumeMemoryOccupationReqInput: P.build_memory_payload(["weights"]),
    }
    for cls, body in bodies.items():
        assert set(body) <= _fields(cls), (cls.__name__, set(body) - _fields(cls))
        cls(**body)
    from sglang.srt import constants

    assert set(P.WEIGHT_TAGS) == set(constants.GPU_MEMORY_ALL_TYPES)


def test_flatten_bucket_matches_sglang_layout():
    sglang_cpu.prepare()
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    bucket = [("a", torch.randn(3, 4)), ("b", torch.randn(5)), ("c", torch.randn(2, 2))]
    ours = P.flatten_bucket(bucket)
    assert torch.equal(ours, FlattenedTensorBucket(named_tensors=bucket).get_flattened_tensor())
    d = P.build_update_from_distributed_payload(bucket, "g", True, None)
    rx = FlattenedTensorBucket.empty(d["names"], d["dtypes"], d["shapes"], "cpu")
    rx.get_flattened_tensor().copy_(ours)
    for (n, t), (n2, t2) in zip(bucket, rx.reconstruct_tensors()):
        assert n == n2 and torch.equal(t, t2)


def _params(fn):
    return [(p.name, p.default, p.kind) for p in inspect.signature(fn).parameters.values()]


def test_colocated_engine_calls_exist_in_sglang():
    sglang_cpu.prepare()
    from sglang.srt.entrypoints.engine import Engine
    from sglang.srt.managers.tokenizer_manager import TokenizerManager
    from sglang.srt.server_args import ServerArgs

    from tests.test_rollout_sglang import FakeEngine, FakeTokenizerManager

    gen = set(inspect.signature(Engine.generate).parameters)
    payload = P.build_generate_payload([[1]], SamplingParams(n=2), deterministic=True)
    payload.pop("stream")
    assert set(payload) <= gen
    for name in ("begin_weight_update", "end_weight_update", "release_memory_occupation",
                 "resume_memory_occupation", "shutdown", "update_weights_from_tensor"):
        if hasattr(FakeEngine, name):  # the fake used by the colocated tests has SGLang's signature
            assert _params(getattr(FakeEngine, name)) == _params(getattr(Engine, name)), name
    assert "tags" in inspect.signature(Engine.release_memory_occupation).parameters
    # 0.5.23 cannot carry a version through the Engine method, and has no update_weight_version:
    assert "weight_version" not in inspect.signature(Engine.update_weights_from_tensor).parameters
    assert not hasattr(Engine, "update_weight_version")
    # ... so we run the Engine method's own path with the request type that has the field
    src = inspect.getsource(Engine.update_weights_from_tensor)
    assert "self.loop.run_until_complete" in src and "self.tokenizer_manager.update_weights_from_tensor(" in src
    sig = inspect.signature(TokenizerManager.update_weights_from_tensor)
    assert list(sig.parameters)[:3] == ["self", "obj", "request"]
    assert inspect.signature(FakeTokenizerManager.update_weights_from_tensor).parameters.keys() == sig.parameters.keys()
    assert "_update_weight_version_if_provided(obj.weight_version)" in inspect.getsource(
        TokenizerManager.update_weights_from_tensor)
    assert inspect.signature(TokenizerManager.config_value).parameters.keys() == {"self", "name"}
    # keyword arguments from_train_config gives sglang.Engine(**kwargs) are ServerArgs fields
    fields = _fields(ServerArgs)
    for kw in ("model_path", "tp_size", "mem_fraction_static", "enable_memory_saver", "skip_tokenizer_init",
               "random_seed", "enable_deterministic_inference"):
        assert kw in fields, kw


def _argv(line: str) -> list[str]:
    env = {"$port": "30001", "$DGPO_SGLANG_API_KEY": "k", "$(echo \"$DGPO_SGLANG_URLS\" | tr ',' ' ')": "http://a:1"}
    for k, v in env.items():
        line = line.replace(k, v)
    return shlex.split(line)


def test_launcher_command_lines_parse_with_sglangs_parsers():
    sglang_cpu.prepare()
    import argparse

    from sglang.srt.server_args import ServerArgs
    from sglang_router.launch_router import parse_router_args

    from megatron_dgpo.launch import spec

    serve = spec.SGLangServeSpec(nodes=2, servers_per_node=2, extra_args=["--mem-fraction-static", "0.85"])
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    for det in (False, True):
        ns = parser.parse_args(_argv(" ".join(spec.sglang_server_args(serve, "/m/q", 8, deterministic=det))))
        assert (ns.model_path, ns.host, ns.port, ns.tp_size, ns.api_key) == ("/m/q", "0.0.0.0", 30001, 4, "k")
        assert ns.enable_deterministic_inference is det and ns.mem_fraction_static == 0.85
    with pytest.raises(SystemExit):  # an unknown flag fails here, not on the cluster
        parser.parse_args(_argv(" ".join(spec.sglang_server_args(
            spec.SGLangServeSpec(extra_args=["--no-such-flag"]), "/m", 8))))
    ra = parse_router_args(_argv(" ".join(spec.router_args(serve))))
    assert (ra.host, ra.port, ra.api_key, ra.worker_urls) == ("0.0.0.0", 30100, "k", ["http://a:1"])
    # the script runs exactly these arguments
    script = spec.sglang_server_script(serve, "/m/q", 8)
    assert " ".join(spec.sglang_server_args(serve, "/m/q", 8)) in script
    assert " ".join(spec.router_args(serve)) in script


# ---------------------------------------------------------------- 3 processes over gloo
def _server_proc(port_q, result_q, stop):
    """An SGLang server process: SGLang's app, and SGLang's own WeightUpdater methods for the
    update group (init_custom_process_group) and for receiving broadcasts."""
    import os
    import sys
    sys.path.insert(0, os.getcwd())
    import torch.distributed as dist

    from tests import sglang_cpu as sc
    sc.prepare()
    from sglang.srt.model_executor.model_runner_components.weight_updater import WeightUpdater

    from tests.sglang_fake import FakeSGLangServer, FakeTokenizerManager, free_port

    # SGLang asserts its own (TP) default group exists before creating the update group
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    class Runner:  # the model runner's weight updater, without a model (its methods, SGLang's code)
        init_weights_update_group = WeightUpdater.init_weights_update_group
        receive_weights_from_distributed = WeightUpdater.receive_weights_from_distributed
        _receive_bucketed_weights_from_distributed = WeightUpdater._receive_bucketed_weights_from_distributed

        def __init__(self):
            self.tp_rank, self.device, self._model_update_group = 0, "cpu", {}

    runner = Runner()

    def init_group(obj):
        return runner.init_weights_update_group(obj.master_address, obj.master_port, obj.rank_offset,
                                                obj.world_size, obj.group_name, obj.backend)

    def receive(names, dtypes, shapes, group_name, load_format):
        got = runner.receive_weights_from_distributed(names=names, dtypes=dtypes, shapes=shapes,
                                                      group_name=group_name, load_format=load_format)
        result_q.put([(n, t.clone()) for n, t in got])
        return got

    s = FakeSGLangServer(FakeTokenizerManager(receive=receive, init_group=init_group))
    port_q.put(s.url)
    stop.wait(300)
    s.close()


@pytest.mark.slow
def test_weight_broadcast_with_sglangs_receiving_code(tmp_path):
    from megatron_dgpo.rollout.sglang_server import SGLangServerEngine
    from tests.sglang_fake import free_port

    ctx = mp.get_context("spawn")
    port_q, result_q, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_server_proc, args=(port_q, result_q, stop), daemon=True) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        urls = [port_q.get(timeout=240) for _ in procs]
        eng = SGLangServerEngine(urls, timeout_s=120, bucket_bytes=256)
        # a group name of its own: torch refuses a name already used in this process
        eng.init_weights_update_group("127.0.0.1", free_port(), server_tp_size=1, backend="gloo",
                                      group_name=f"contract_test_{free_port()}")
        g = torch.Generator().manual_seed(0)
        model = [("model.embed_tokens.weight", torch.randn(16, 8, generator=g)),
                 ("model.layers.0.self_attn.qkv.weight", torch.randn(24, 8, generator=g)),
                 ("model.norm.weight", torch.randn(8, generator=g)),
                 ("model.layers.0.mlp.up_proj.weight", torch.randn(4, 8, generator=g).to(torch.bfloat16)),
                 ("lm_head.weight", torch.randn(16, 8, generator=g))]
        eng.update_weights(iter(model), version="7")
        assert eng.weight_version == "7"
        n_buckets = len(list(P.bucket_named_tensors(model, 256)))
        assert n_buckets == 5  # four dtype/size splits: flattened buckets, one broadcast each
        got = [t for _ in range(2 * n_buckets) for t in result_q.get(timeout=60)]  # both servers
        assert sorted(n for n, _ in got) == sorted(n for n, _ in model for _ in range(2))
        sent = dict(model)
        for n, t in got:
            assert t.dtype == sent[n].dtype and torch.equal(t, sent[n]), n
    finally:
        stop.set()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
