"""torchrun worker (4 CPU processes): the model shapes and layouts of issue 14 end to end.

Per case: HF folder -> Megatron (load) -> stream -> HF bit-exact, Megatron logits == transformers
logits (fp32), inference-TP shards == slicing the HF tensors. Cases: fewer KV heads than TP
(2 KV heads at TP 4; Qwen3 with 1 KV head at TP 2 x PP 2), uneven pipeline stages (3 layers on
PP 2 split 1+2 and 2+1), Llama-3 rope scaling active at the tested length (TP 2). Plus gradients:
for Qwen3 at TP 2 (2 KV heads, and 1 KV head: fewer than TP) and Qwen2 with 2 KV heads at TP 4, every
parameter's gradient after Megatron's finalize_model_grads (DDP over DP, q/k-norm sums over TP) equals
transformers' gradient of the same loss, mapped to the Megatron shard by the loading rules.
Rank 0 writes {check: {"ok": bool, "detail": ...}} to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from weight_sync_common import (  # noqa: E402
    RESULTS, check, reference_inference_shards, save_hf_model, tiny_config,
)
from weight_sync_worker import logits_match_transformers, shards_match  # noqa: E402

from megatron_dgpo import distributed as mdist  # noqa: E402
from megatron_dgpo.model.builder import build_model_chunks, unwrap_model  # noqa: E402
from megatron_dgpo.weight_sync import HFCheckpoint, WeightStreamer, load_hf_into_megatron  # noqa: E402

# Llama-3 scaling with a 16-token original context: at 12 tokens and head_dim 8 all bands occur.
LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)

# name: (variant, config overrides, TP, PP, layers in first stage, layers in last stage, inference TP)
CASES = {
    "kv2_tp4": ("qwen2", {}, 4, 1, None, None, 4),
    "qwen3_kv1_tp2pp2": ("qwen3", dict(num_query_groups=1), 2, 2, None, None, 2),
    "llama_3layers_pp2_first1": ("llama", dict(num_layers=3), 1, 2, 1, None, 2),
    "qwen2_3layers_tp2pp2_last1": ("qwen2", dict(num_layers=3), 2, 2, None, 1, 2),
    "llama3_rope_tp2": ("llama", dict(rope_scaling=LLAMA3, rope_theta=500000.0), 2, 1, None, None, 2),
}


# name: (variant, overrides, TP, HF folder of a case above); PP 1, the rest of the 4 ranks is DP
GRAD_CASES = {
    "qwen3_tp2": ("qwen3", {}, 2, "hf_qwen3_grads"),
    "qwen3_kv1_tp2": ("qwen3", dict(num_query_groups=1), 2, "hf_qwen3_kv1_tp2pp2"),
    "kv2_tp4": ("qwen2", {}, 4, "hf_kv2_tp4"),
}


def grads_match(cfg, tp: int, folder: Path, tokens: torch.Tensor):
    """d(sum(logits * R))/d(param) on every Megatron shard == transformers' gradient, sliced by the rules."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from transformers import AutoModelForCausalLM

    from megatron_dgpo.weight_sync.layouts import get_layout, megatron_matcher
    from megatron_dgpo.weight_sync.transforms import megatron_shard_from_hf

    mdist.initialize(tp, 1, timeout_minutes=3)
    chunks = build_model_chunks(cfg, wrap_ddp=True)
    load_hf_into_megatron(chunks, folder, cfg)
    R = torch.randn(*tokens.shape, cfg.vocab_size, generator=torch.Generator().manual_seed(11))
    b, s = tokens.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    for c in chunks:
        c.zero_grad_buffer()
    out = gather_from_tensor_model_parallel_region(chunks[0](input_ids=tokens, position_ids=pos, attention_mask=None))
    # DDP sums over DP here (calculate_per_token_loss): each DP replica carries 1/dp of the loss
    ((out[..., : cfg.vocab_size] * R).sum() / ps.get_data_parallel_world_size()).backward()
    finalize_model_grads(chunks)

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    (hf(input_ids=tokens).logits * R).sum().backward()
    ref = {n: p.grad for n, p in hf.named_parameters()}
    scale = max(g.abs().max().item() for g in ref.values())

    def read(name, dim, start, stop):
        return ref[name] if dim is None else ref[name].narrow(dim, start, stop - start)
    matcher = megatron_matcher(get_layout(cfg))
    tp_rank, worst, bad = ps.get_tensor_model_parallel_rank(), 0.0, []
    for pname, p in unwrap_model(chunks)[0].named_parameters():
        rule, layer = matcher.match(pname)
        want = megatron_shard_from_hf(rule, layer, cfg, tp, tp_rank, read)
        err = (p.main_grad - want).abs().max().item() / scale
        worst = max(worst, err)
        if err > 1e-5:
            bad.append(pname)
    return not bad, f"max err / max|grad| {worst:.1e}; bad {bad[:3]}"


def stage_layers(cfg, pp: int, first, last) -> list[int]:
    """Independent statement of Megatron's split: first/last as given, the rest even over the middle."""
    n = [None] * pp
    if first is not None:
        n[0] = first
    if last is not None:
        n[-1] = last
    rest = cfg.num_layers - sum(x for x in n if x is not None)
    free = [i for i, x in enumerate(n) if x is None]
    for i in free:
        n[i] = rest // len(free)
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    mdist.initialize(1, 1, timeout_minutes=3)
    rank = dist.get_rank()
    work = Path(os.getcwd())
    for seed, (name, (variant, over, *_)) in enumerate(CASES.items()):
        if rank == 0:
            save_hf_model(tiny_config(variant, **over), work / f"hf_{name}", seed=10 + seed)
    if rank == 0:
        save_hf_model(tiny_config("qwen3"), work / "hf_qwen3_grads", seed=20)
    dist.barrier()
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 200, (2, 12), generator=g)

    for name, (variant, over, tp, pp, first, last, itp) in CASES.items():
        from megatron.core import parallel_state as ps
        mdist.initialize(tp, pp, timeout_minutes=3)
        cfg = tiny_config(variant, **over)
        folder = work / f"hf_{name}"
        with HFCheckpoint(folder) as ck:
            ref = {n: ck.read(n) for n in ck.names()}
        chunks = build_model_chunks(cfg, num_layers_in_first_pipeline_stage=first,
                                    num_layers_in_last_pipeline_stage=last)
        for c in chunks:
            c.eval()
        check(f"{name}/load", lambda: (load_hf_into_megatron(chunks, folder, cfg), True)[1])

        if first is not None or last is not None:
            def placement():
                want = stage_layers(cfg, pp, first, last)
                p = ps.get_pipeline_model_parallel_rank()
                layers = unwrap_model(chunks)[0].decoder.layers
                offset = sum(want[:p])
                bad = [i for i, layer in enumerate(layers)  # a norm: replicated over TP
                       if not torch.equal(layer.input_layernorm.weight,
                                          ref[f"model.layers.{offset + i}.input_layernorm.weight"])]
                return len(layers) == want[p] and not bad, f"stage {p}: {len(layers)} layers, want {want}; bad {bad}"
            check(f"{name}/layer_placement", placement)

        received = {}

        def round_trip():
            for bkt in WeightStreamer(chunks, cfg, bucket_bytes=12_000).stream():
                received.update({n: t.clone() for n, t in bkt.named_tensors()})
            bad = [n for n in ref if n not in received or not torch.equal(received[n], ref[n])]
            return not bad and set(received) == set(ref), f"bad={bad[:3]} extra={sorted(set(received) - set(ref))[:3]}"
        check(f"{name}/round_trip_bitexact", round_trip)

        check(f"{name}/logits_match_transformers", lambda: logits_match_transformers(cfg, received, chunks, tokens))

        def inference_shards():
            receivers = list(range(itp))[::-1]
            got = {}
            for bkt in WeightStreamer(chunks, cfg, receivers=receivers, target_tp=itp, bucket_bytes=8_000).stream():
                got.update({n: t.clone() for n, t in bkt.named_tensors()})
            if rank not in receivers:
                return not got, ""
            return shards_match(got, reference_inference_shards(cfg, ref, itp, receivers.index(rank)))
        check(f"{name}/inference_tp{itp}_shards", inference_shards)
        del chunks

    for name, (variant, over, tp, folder) in GRAD_CASES.items():
        check(f"{name}/grads_match_transformers",
              lambda: grads_match(tiny_config(variant, **over), tp, work / folder, tokens))

    if rank == 0:
        Path(args.out).write_text(json.dumps(RESULTS, indent=1))
    dist.barrier()
    mdist.destroy()


if __name__ == "__main__":
    main()
