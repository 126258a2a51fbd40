"""Colocated engines free GPU memory during the update and take it back around the weight sync,
in the order SGLang needs (weights before the update, KV cache after); remote ones never do."""
from megatron_dgpo.config import TrainConfig
from megatron_dgpo.configio import load_config
from megatron_dgpo.rl.engines import EngineMemory, sync_weights


class FakeEngine:
    def __init__(self):
        self.calls = []

    def release_memory(self, tags):
        self.calls.append(("release", tuple(tags)))

    def resume_memory(self, tags):
        self.calls.append(("resume", tuple(tags)))

    def update_weights(self, named_tensors, version):
        self.calls.append(("update", len(list(named_tensors)), str(version)))


class FakePolicy:
    def stream_weights(self, receivers=None, version=0, local=False):
        return iter([("w", 1), ("b", 2)])


def _run(mode):
    cfg = load_config(TrainConfig, None, ["rollout.engine=sglang", f"rollout.sglang.mode={mode}"])
    engine = FakeEngine()
    memory = EngineMemory(cfg, engine)
    sync_weights(FakePolicy(), engine, 0, distributed=True, memory=memory)  # start: nothing released
    memory.release()
    memory.release()  # idempotent
    sync_weights(FakePolicy(), engine, 1, distributed=True, memory=memory)
    return engine.calls


def test_colocated_releases_and_resumes_in_order():
    assert _run("colocated") == [
        ("update", 2, "0"),
        ("release", ("cuda_graph", "kv_cache", "weights")),
        ("resume", ("weights",)),
        ("update", 2, "1"),
        ("resume", ("kv_cache", "cuda_graph")),
    ]


def test_server_mode_keeps_its_memory():
    assert _run("server") == [("update", 2, "0"), ("update", 2, "1")]
