import pytest
import torch

from megatron_dgpo.model.config import ModelConfig
from megatron_dgpo.rollout import HFRolloutEngine, RolloutEngine, SamplingParams, filter_logits

EOS = 2
MC = ModelConfig(vocab_size=48, hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
                 ffn_hidden_size=64, max_position_embeddings=128)


def _engine(arch="qwen2", seed=0, **kw):
    cfg = ModelConfig(**{**MC.to_dict(), "arch": arch, "qkv_bias": arch == "qwen2"}).to_hf_config()
    cfg["initializer_range"] = 0.3  # peaked distributions, so eos and greedy ties are meaningful
    return HFRolloutEngine.from_hf_config(cfg, init_seed=seed, eos_token_ids=[EOS], pad_token_id=0, **kw)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def eng(one_torch_thread):
    return _engine()


PROMPTS = [[1, 5, 6, 7, 8], [1, 9], [1, 10, 11]]


def _recompute(engine, sample, T):
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    with torch.no_grad():
        logits = engine.model(input_ids=ids).logits[0].float() / T
    lp = torch.log_softmax(logits, -1)
    P = len(sample.prompt_ids)
    idx = torch.arange(P - 1, P - 1 + len(sample.response_ids))
    return lp[idx, torch.tensor(sample.response_ids)]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("sp", [
    SamplingParams(n=2, temperature=1.0, max_new_tokens=10, seed=1),
    SamplingParams(n=2, temperature=0.7, top_k=5, top_p=0.9, max_new_tokens=10, seed=2),
    SamplingParams(temperature=0.0, max_new_tokens=10),
])
def test_logprobs_match_forward_recompute(arch, sp):
    e = _engine(arch)
    assert isinstance(e, RolloutEngine)
    out = e.generate(PROMPTS, sp)
    assert len(out) == len(PROMPTS) * sp.n
    assert [o.prompt_index for o in out] == [i for i in range(len(PROMPTS)) for _ in range(sp.n)]
    for o in out:
        assert len(o.logprobs) == len(o.response_ids) >= 1
        if o.finish_reason == "stop":
            assert o.response_ids[-1] == EOS and EOS not in o.response_ids[:-1]
        else:
            assert len(o.response_ids) == sp.max_new_tokens and EOS not in o.response_ids
        # batched, left-padded, KV-cached decoding == one unpadded forward of the whole sequence
        torch.testing.assert_close(torch.tensor(o.logprobs), _recompute(e, o, sp.logprob_temperature),
                                   rtol=0, atol=2e-4)


def test_some_rows_stop_early(eng):
    out = eng.generate([[1, k] for k in range(3, 40)], SamplingParams(max_new_tokens=8, seed=0))
    reasons = {o.finish_reason for o in out}
    assert reasons == {"stop", "length"}, reasons


def test_greedy_deterministic_and_batch_invariant(eng):
    sp = SamplingParams(temperature=0.0, max_new_tokens=8)
    a = eng.generate(PROMPTS, sp)
    b = eng.generate(PROMPTS, sp)
    alone = [eng.generate([p], sp)[0] for p in PROMPTS]
    assert [x.response_ids for x in a] == [x.response_ids for x in b] == [x.response_ids for x in alone]
    # top_k=1 at any temperature is greedy as well
    c = eng.generate(PROMPTS, SamplingParams(temperature=1.3, top_k=1, max_new_tokens=8))
    assert [x.response_ids for x in c] == [x.response_ids for x in a]


def test_seeded_sampling_deterministic(eng):
    sp = SamplingParams(n=4, temperature=1.0, max_new_tokens=8, seed=123)
    a = [o.response_ids for o in eng.generate(PROMPTS, sp)]
    b = [o.response_ids for o in eng.generate(PROMPTS, sp)]
    c = [o.response_ids for o in eng.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=8, seed=124))]
    assert a == b and a != c
    assert len({tuple(x) for x in a[:4]}) > 1  # the n samples of one prompt differ


def test_stop_token_ids(eng):
    base = eng.generate([[1, 5]], SamplingParams(temperature=0, max_new_tokens=6))[0]
    stop_at = base.response_ids[1]
    if stop_at == EOS or stop_at == base.response_ids[0]:
        pytest.skip("degenerate greedy path for this seed")
    o = eng.generate([[1, 5]], SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=[stop_at]))[0]
    assert o.response_ids == base.response_ids[:2] and o.finish_reason == "stop"


def test_filter_logits():
    x = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(x, 2, 1.0)).tolist() == [[True, False, False, True]]
    p = torch.softmax(x, -1)[0]  # sorted probs: .644 .237 .087 .032
    assert p[1] > 0.6
    kept = ~torch.isinf(filter_logits(x, -1, 0.5))
    assert kept.tolist() == [[False, True, False, False]]
    kept = ~torch.isinf(filter_logits(x, -1, 0.85))
    assert kept.tolist() == [[False, True, True, False]]


def test_update_weights_strict_and_changes_output():
    e = _engine(seed=0)
    other = _engine(seed=1)
    sp = SamplingParams(temperature=0, max_new_tokens=8)
    before = [o.response_ids for o in e.generate(PROMPTS, sp)]
    target = [o.response_ids for o in other.generate(PROMPTS, sp)]
    assert before != target
    sd = list(other.model.state_dict().items())
    with pytest.raises(KeyError, match="unknown"):
        e.update_weights(sd + [("model.layers.9.mlp.up_proj.weight", torch.zeros(1))], version=1)
    with pytest.raises(ValueError, match="missing"):
        e.update_weights(sd[1:], version=1)
    with pytest.raises(ValueError, match="shape"):
        e.update_weights([(sd[0][0], torch.zeros(3))] + sd[1:], version=1)
    assert e.weight_version == "0"
    assert [o.response_ids for o in e.generate(PROMPTS, sp)] == before  # failed updates wrote nothing
    e.update_weights(iter(sd), version=7)
    assert e.weight_version == "7"
    out = e.generate(PROMPTS, sp)
    assert [o.response_ids for o in out] == target
    assert {o.weight_version for o in out} == {"7"}
    e.update_weights(sd[:1], version=8, partial=True)
    assert e.weight_version == "8"


def test_release_resume_cpu_noop(eng):
    eng.release_memory(["weights", "kv_cache"])
    eng.resume_memory()
    assert eng.generate([[1, 4]], SamplingParams(max_new_tokens=2))


def test_sampled_tokens_respect_top_k_and_top_p(eng):
    sp = SamplingParams(n=8, temperature=1.5, top_k=3, top_p=0.8, max_new_tokens=6, seed=5)
    for o in eng.generate(PROMPTS, sp):
        ids = torch.tensor([o.prompt_ids + o.response_ids])
        with torch.no_grad():
            logits = eng.model(input_ids=ids).logits[0].float() / sp.temperature
        P = len(o.prompt_ids)
        for j, tok in enumerate(o.response_ids):
            row = logits[P - 1 + j]
            kept = ~torch.isinf(filter_logits(row[None], sp.top_k, sp.top_p))[0]
            assert kept.sum() <= 3 and kept[tok], (j, tok)


@pytest.mark.gpu
def test_cuda_engine_logprobs_and_release():
    e = _engine(device="cuda")
    sp = SamplingParams(n=2, temperature=0.8, max_new_tokens=10, seed=1)
    for o in e.generate(PROMPTS, sp):
        ids = torch.tensor([o.prompt_ids + o.response_ids], device="cuda")
        with torch.no_grad():
            lp = torch.log_softmax(e.model(input_ids=ids).logits[0].float() / sp.temperature, -1)
        P = len(o.prompt_ids)
        ref = lp[torch.arange(P - 1, P - 1 + len(o.response_ids)), torch.tensor(o.response_ids, device="cuda")]
        torch.testing.assert_close(torch.tensor(o.logprobs), ref.cpu(), rtol=0, atol=1e-3)
    before = torch.cuda.memory_allocated()
    e.release_memory()
    assert torch.cuda.memory_allocated() < before
    with pytest.raises(RuntimeError, match="resume_memory"):
        e.generate(PROMPTS, sp)
    e.resume_memory()
    assert len(e.generate(PROMPTS, sp)) == 6


@pytest.mark.parametrize("variant,over", [
    ("qwen3", {}),
    ("llama", dict(rope_theta=500000.0, rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                           original_max_position_embeddings=16))),
], ids=["qwen3", "llama3_rope_scaling"])
def test_embedded_engine_takes_the_weight_stream(tmp_path, variant, over):
    """HF folder -> Megatron-layout state -> weight stream -> embedded engine built from
    ModelConfig.to_hf_config(): the engine computes the source model's logits (Qwen3 q/k norms and
    head_dim, Llama-3 rope scaling survive the config round trip)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "workers"))
    from weight_sync_common import save_hf_model, tiny_config

    from megatron_dgpo.weight_sync import HFCheckpoint, iter_hf_weights, megatron_state_from_hf

    cfg = tiny_config(variant, **over)
    src = save_hf_model(cfg, tmp_path / "hf", seed=5)
    with HFCheckpoint(tmp_path / "hf") as ck:
        assert ck.model_config() == cfg
    eng = HFRolloutEngine.from_hf_config(cfg.to_hf_config(), init_seed=1, eos_token_ids=[EOS])
    eng.update_weights(iter_hf_weights(megatron_state_from_hf(tmp_path / "hf"), cfg, bucket_bytes=20_000), 1)
    ids = torch.tensor([[1, 5, 9, 33, 7, 2, 100, 150, 3, 4, 60, 61]])
    with torch.no_grad():
        torch.testing.assert_close(eng.model(input_ids=ids).logits, src(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("max_batch_size", [64, 6])  # 6: batches that cut a prompt's group of 4
def test_shared_prefill_equals_one_prefill_per_row(arch, max_batch_size):
    """The samples of a prompt share one prefill (KV cache and logits selected per row): the
    same tokens and log-probs as prefilling every row, with the same generator."""
    shared, per_row = _engine(arch, max_batch_size=max_batch_size), _engine(arch, max_batch_size=max_batch_size)
    per_row.share_prefill = False
    sp = SamplingParams(n=4, max_new_tokens=8, temperature=1.0, seed=3)
    got, want = shared.generate(PROMPTS, sp), per_row.generate(PROMPTS, sp)
    assert [s.response_ids for s in got] == [s.response_ids for s in want]
    assert [s.prompt_index for s in got] == [s.prompt_index for s in want]
    for a, b in zip(got, want):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-6)
    assert len({tuple(s.response_ids) for s in got}) > 3  # sampling, not one repeated answer
