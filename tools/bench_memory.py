"""Memory of the embedded engine's decode step: the batched sampler before issue 18 (baseline,
measured in the same run) against `rollout.hf_engine.sample_next_` (one float32 [B, V] buffer).

Peak bytes allocated by torch during `generate()` above the level at entry (CPU: replayed from the
profiler's allocation events, megatron_dgpo/ops/_memprofile.py; CUDA: max_memory_allocated). The
model is a one-layer Qwen2 with a tiny hidden size, so vocabulary-sized tensors dominate.

    PYTHONPATH=. OMP_NUM_THREADS=1 python tools/bench_memory.py --vocab 262144 --batch 64
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_dgpo.model.config import ModelConfig  # noqa: E402
from megatron_dgpo.ops._memprofile import peak_extra_bytes  # noqa: E402
from megatron_dgpo.rollout import HFRolloutEngine, SamplingParams, filter_logits, hf_engine  # noqa: E402


def batched_sampler(buf, sp, gen):
    """The decode step before issue 18 (logits / T, log_softmax, softmax of the filtered copy,
    one torch.multinomial over the batch); leaves the log-probs in `buf` like sample_next_."""
    logits = buf / sp.logprob_temperature
    logp = torch.log_softmax(logits, dim=-1)
    probs = torch.softmax(filter_logits(logits, sp.top_k, sp.top_p), dim=-1)
    nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
    buf.copy_(logp)
    return nxt


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=262144)
    p.add_argument("--batch", type=int, default=64, help="rows per decode step (engine max_batch_size)")
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    mc = ModelConfig(vocab_size=a.vocab, hidden_size=16, num_layers=1, num_attention_heads=2, num_query_groups=1,
                     ffn_hidden_size=32, max_position_embeddings=64, arch="qwen2", qkv_bias=True)
    eng = HFRolloutEngine.from_hf_config(mc.to_hf_config(), eos_token_ids=[2], pad_token_id=0,
                                         device=a.device, max_batch_size=a.batch)
    one = a.batch * a.vocab * 4
    print(f"vocab {a.vocab}, batch {a.batch}, {a.new_tokens} new tokens, device {a.device}; "
          f"one float32 [B, V] = {one / 2**20:.0f} MiB")
    print(f"{'sampling':<26} {'sampler':<10} {'peak MiB':>9} {'x [B,V]':>8} {'ratio':>6} {'s/step':>7}")
    cases = (("T=1", dict(temperature=1.0)), ("T=0.7 top_k=50 top_p=0.9", dict(temperature=0.7, top_k=50, top_p=0.9)))
    for name, kw in cases:
        sp = SamplingParams(n=a.batch, max_new_tokens=a.new_tokens, seed=5, **kw)
        base = None
        results = {}
        for label, fn in (("batched", batched_sampler), ("in-place", hf_engine.sample_next_)):
            hf_engine.sample_next_ = fn
            try:
                eng.generate([[1, 5, 6]], sp)  # warm-up
                out, peak = peak_extra_bytes(lambda: eng.generate([[1, 5, 6]], sp), a.device)
                t0 = time.perf_counter()  # timed without the profiler
                eng.generate([[1, 5, 6]], sp)
                dt = (time.perf_counter() - t0) / max(max(len(s.response_ids) for s in out), 1)
            finally:
                hf_engine.sample_next_ = sample_next_
            results[label] = [s.response_ids for s in out]
            base = base or peak
            print(f"{name:<26} {label:<10} {peak / 2**20:>9.1f} {peak / one:>8.2f} {peak / base:>6.2f} {dt:>7.3f}")
        print(f"{'':<26} same samples: {results['batched'] == results['in-place']}")


sample_next_ = hf_engine.sample_next_

if __name__ == "__main__":
    main()
