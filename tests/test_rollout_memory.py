"""The embedded engine's decode step (issue 18): one float32 [B, V] tensor per step, and the same
samples and log-probs for a fixed seed as the batched sampler it replaced."""
import pytest
import torch

from megatron_dgpo.model.config import ModelConfig
from megatron_dgpo.ops._memprofile import peak_extra_bytes
from megatron_dgpo.rollout import HFRolloutEngine, SamplingParams, filter_logits
from megatron_dgpo.rollout import hf_engine

EOS = 2


def _engine(vocab, hidden=32, seed=0):
    mc = ModelConfig(vocab_size=vocab, hidden_size=hidden, num_layers=1, num_attention_heads=2, num_query_groups=1,
                     ffn_hidden_size=2 * hidden, max_position_embeddings=64, arch="qwen2", qkv_bias=True)
    cfg = mc.to_hf_config()
    cfg["initializer_range"] = 0.3
    return HFRolloutEngine.from_hf_config(cfg, init_seed=seed, eos_token_ids=[EOS], pad_token_id=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batched_reference(buf, sp, gen):
    """The decode step before issue 18, verbatim: logits / T, log_softmax, and one
    torch.multinomial over the whole batch of softmax(filter_logits(...))."""
    logits = buf / sp.logprob_temperature
    logp = torch.log_softmax(logits, dim=-1)
    if sp.greedy:
        nxt = logits.argmax(dim=-1)
    else:
        probs = torch.softmax(filter_logits(logits, sp.top_k, sp.top_p), dim=-1)
        nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
    buf.copy_(logp)
    return nxt


SAMPLING = [dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.9),
            dict(temperature=0.8, top_k=20, top_p=0.8), dict(temperature=0.0)]


@pytest.mark.parametrize("kw", SAMPLING, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_step_equals_batched_sampler(kw):
    torch.manual_seed(0)
    sp = SamplingParams(**kw)
    g_new, g_ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    # 40 rows of 4096: chunks of 16, 16 and 8 rows (hf_engine.SAMPLE_CHUNK_ELEMENTS)
    assert 40 * 4096 > 2 * hf_engine.SAMPLE_CHUNK_ELEMENTS
    for _ in range(20):  # consecutive steps: the generator state must also advance identically
        logits = torch.randn(40, 4096) * 4
        ref, new = logits.clone(), logits.clone()
        want = _batched_reference(ref, sp, g_ref)
        got = hf_engine.sample_next_(new, sp, g_new)
        assert torch.equal(got, want)
        assert torch.equal(new, ref)  # the log-probs left in the buffer, bit for bit


@pytest.mark.parametrize("kw", SAMPLING[:4], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_generate_equals_batched_sampler(kw, monkeypatch):
    eng = _engine(vocab=512)
    prompts = [[1, 5, 6, 7, 8], [1, 9], [1, 10, 11]]
    sp = SamplingParams(n=4, max_new_tokens=8, seed=11, **kw)
    got = eng.generate(prompts, sp)
    monkeypatch.setattr(hf_engine, "sample_next_", _batched_reference)
    want = eng.generate(prompts, sp)
    assert [s.response_ids for s in got] == [s.response_ids for s in want]
    assert [s.logprobs for s in got] == [s.logprobs for s in want]
    assert len({len(s.response_ids) for s in got}) > 1 or len({tuple(s.response_ids) for s in got}) > 1


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_k=50, top_p=0.9)],
                         ids=["plain", "top_k_top_p"])
def test_decode_step_holds_one_batch_by_vocab_buffer(kw):
    """Peak bytes allocated during generate() above the model's own: at most one float32 [B, V]
    buffer (the model's last-position logits, reused in place) plus per-row temporaries. The
    batched sampler held about four (logits / T, log-probs, probabilities, the sampler's noise)."""
    B, V = 32, 65536
    eng = _engine(vocab=V, hidden=16)
    sp = SamplingParams(n=B, max_new_tokens=3, seed=5, **kw)
    eng.generate([[1, 5, 6]], sp)  # warm-up: lazy initialisation outside the measurement
    _, peak = peak_extra_bytes(lambda: eng.generate([[1, 5, 6]], sp))
    one = B * V * 4
    assert peak < 1.5 * one, f"peak {peak / one:.2f} x [B, V] float32"
