#!/usr/bin/env python
"""Benchmark one policy-update step (forward + backward + optimizer) of a Megatron GPTModel on a
realistic RL length distribution, for each micro-batch layout and attention backend.

Lengths: prompts ~U[prompt_len - 50, prompt_len + 50] tokens; responses from a seeded long-tailed
(log-normal) distribution clipped at --max-new-tokens (median max_new_tokens / 6), the shape of
chain-of-thought RL batches (most responses short, a tail at the limit).

Layouts (train/microbatch.py), each with the attention backends it supports:
  padded   micro_batch_size rows, every row padded to the batch's longest sequence (the original path)
  budget   token-budget micro-batches (--max-tokens), each padded to its own longest row
  packed   token-budget THD rows (cu_seqlens), sdpa or te attention only
  prefix   token-budget packed rows in which the --group-size samples of a prompt share it (tree
           mask, algo.share_prompt_prefix), sdpa only
Backends: local (Megatron's unfused DotProductAttention), sdpa (model/attention.py), te (CUDA with
Transformer Engine installed).

Columns: useful = real tokens / computed tokens (padding included); time = median wall time of
--repeats steps after one warm-up (CUDA: synchronised); tokens/s = real tokens / time; x = ratio
to padded/local measured in this run; loss = the first step's loss from the same initial weights
(all layouts must agree: they are exact); MFU (CUDA) = model FLOPs of the real tokens
(6 x parameters x tokens + causal attention 6 x layers x q-width x sum(len^2)) / time / --peak-tflops.
A second table gives the useful-token efficiency of the layouts on a larger batch of the same
distribution (planning only, no model).

Examples:
  python tools/bench_train_step.py                                   # CPU, small model, ~1-2 min on 2 cores
  python tools/bench_train_step.py --device cuda --config examples/configs/r1_distill_qwen_1p5b.yaml \\
      --dtype bfloat16 --batch 64 --max-new-tokens 8192 --max-tokens 16384 --micro-batch-size 2
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_dgpo.model.config import ModelConfig  # noqa: E402
from megatron_dgpo.train import microbatch  # noqa: E402
from megatron_dgpo.train.batch import RolloutBatch  # noqa: E402

CPU_MODEL = ModelConfig(arch="qwen2", vocab_size=4096, hidden_size=128, num_layers=2, num_attention_heads=4,
                        num_query_groups=2, ffn_hidden_size=352, max_position_embeddings=16384,
                        qkv_bias=True, tie_word_embeddings=False, make_vocab_size_divisible_by=128)
LAYOUTS = (("padded", "local"), ("padded", "sdpa"), ("budget", "local"), ("budget", "sdpa"),
           ("packed", "sdpa"), ("prefix", "sdpa"), ("padded", "te"), ("budget", "te"), ("packed", "te"))


def lengths(n, prompt_len, max_new, seed, group=1):
    """Prompt and response lengths of n rows; rows i // group share a prompt."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(max(prompt_len - 50, 1), prompt_len + 51, (-(-n // group),), generator=g)
    prompts = prompts.repeat_interleave(group)[:n]
    mu = math.log(max(max_new / 6, 1.0))
    resp = torch.exp(mu + 1.0 * torch.randn(n, generator=g)).ceil().clamp(1, max_new).long()
    return prompts, resp


def make_batch(prompts, resp, vocab, seed, group=1):
    g = torch.Generator().manual_seed(seed + 1)
    total = prompts + resp
    s = int(total.max())
    pos = torch.arange(s)[None, :]
    tokens = torch.randint(0, vocab, (len(total), s), generator=g)
    first = torch.arange(len(total)) // group * group  # the group's first row holds its prompt
    tokens = torch.where(pos < prompts[:, None], tokens[first], tokens)
    tokens = torch.where(pos < total[:, None], tokens, 0)
    mask = (pos >= prompts[:, None]) & (pos < total[:, None])
    adv = torch.randn(len(total), generator=g)
    return RolloutBatch(tokens=tokens, loss_mask=mask, advantages=adv, lengths=total)


def model_flops(cfg: ModelConfig, n_params: int, lens) -> float:
    q_width = cfg.num_attention_heads * cfg.head_dim
    return 6.0 * n_params * float(sum(lens)) + 6.0 * cfg.num_layers * q_width * float(sum(x * x for x in lens))


def run_layout(layout, backend, args, model_cfg, init_state, batch, device):
    from megatron_dgpo.loss import PolicyLossConfig
    from megatron_dgpo.model.builder import build_model_chunks
    from megatron_dgpo.train import build_optimizer, train_step

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    impl = "transformer_engine" if backend == "te" else "local"
    chunks = build_model_chunks(model_cfg, transformer_impl=impl, params_dtype=dtype, wrap_ddp=True,
                                attention_backend=backend)
    if init_state is not None:
        from megatron_dgpo.model.builder import unwrap_model

        unwrap_model(chunks)[0].load_state_dict(init_state, strict=False)
    opt = build_optimizer(chunks, lr=1e-7, clip_grad=1.0)
    opt.reload_model_params()
    kw = dict(micro_batch_size=args.micro_batch_size)
    if layout != "padded":
        kw.update(max_tokens_per_micro_batch=args.max_tokens,
                  pack_sequences="prefix" if layout == "prefix" else layout == "packed")
    loss_cfg = PolicyLossConfig(name="dgpo")
    times, first = [], None
    for i in range(args.repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        m = train_step(chunks, opt, batch, loss_cfg, **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        if i == 0:
            first = m
        else:
            times.append(time.perf_counter() - t0)
    n_params = sum(p.numel() for c in chunks for p in c.parameters())
    del chunks, opt
    return dict(time=statistics.median(times), loss=first["loss"], tokens=first["tokens"],
                computed=first["computed_tokens"], n_mb=int(first["num_microbatches"]), n_params=n_params)


def efficiency_table(args):
    prompts, resp = lengths(args.plan_batch, args.prompt_len, args.plan_max_new_tokens, args.seed + 7, args.group_size)
    batch = make_batch(prompts, resp, 16, args.seed, args.group_size)
    real = float(batch.lengths.sum())
    rows = []
    for layout in ("padded", "budget", "packed", "prefix"):
        kw = dict(micro_batch_size=args.micro_batch_size, equalise_over_dp=False)
        if layout != "padded":
            kw.update(max_tokens=args.plan_max_tokens, pack="prefix" if layout == "prefix" else layout == "packed")
        mbs = microbatch.split(batch, **kw)
        computed = sum(m.computed_tokens for m in mbs)
        rows.append((layout, len(mbs), real / computed))
    print(f"\nUseful-token efficiency, {args.plan_batch} sequences, prompts ~{args.prompt_len}, responses "
          f"clipped at {args.plan_max_new_tokens} (median {int(resp.median())}, "
          f"{int((resp == args.plan_max_new_tokens).sum())} at the limit), budget {args.plan_max_tokens} tokens, "
          f"micro_batch_size {args.micro_batch_size} (padded), {args.group_size} samples per prompt "
          f"(useful > 100 %: a shared prompt is computed once for several rows):")
    print("| layout | micro-batches | useful tokens |\n|---|---|---|")
    for layout, n, eff in rows:
        print(f"| {layout} | {n} | {eff:.1%} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--config", help="YAML whose model section is benchmarked (default: a small CPU model)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--batch", type=int, default=16, help="sequences in the update batch")
    ap.add_argument("--prompt-len", type=int, default=200)
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=4096, help="token budget per micro-batch")
    ap.add_argument("--micro-batch-size", type=int, default=2, help="rows per micro-batch of the padded layout")
    ap.add_argument("--group-size", type=int, default=1, help="samples per prompt (rows sharing a prompt)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--layouts", default=",".join(f"{a}/{b}" for a, b in LAYOUTS),
                    help="comma-separated layout/backend pairs (te ones are skipped without TE)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100/H200: 989)")
    ap.add_argument("--plan-batch", type=int, default=256)
    ap.add_argument("--plan-max-new-tokens", type=int, default=8192)
    ap.add_argument("--plan-max-tokens", type=int, default=16384)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import importlib.util

    from megatron_dgpo import distributed

    if args.config:
        from megatron_dgpo.config import TrainConfig
        from megatron_dgpo.configio import load_config

        model_cfg = load_config(TrainConfig, args.config, []).model
    else:
        model_cfg = CPU_MODEL
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")
    distributed.initialize(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, seed=args.seed)
    prompts, resp = lengths(args.batch, args.prompt_len, args.max_new_tokens, args.seed, args.group_size)
    batch = make_batch(prompts, resp, model_cfg.vocab_size, args.seed, args.group_size)
    have_te = args.device == "cuda" and importlib.util.find_spec("transformer_engine") is not None
    pairs = [tuple(x.split("/")) for x in args.layouts.split(",") if x]
    pairs = [(a, b) for a, b in pairs if b != "te" or have_te]

    from megatron_dgpo.model.builder import build_model_chunks, unwrap_model

    init = {k: v.clone() for k, v in unwrap_model(build_model_chunks(model_cfg))[0].state_dict().items()
            if torch.is_tensor(v)}
    results = {}
    for layout, backend in pairs:
        results[(layout, backend)] = run_layout(layout, backend, args, model_cfg, init, batch, args.device)
        if args.device == "cuda":
            torch.cuda.empty_cache()

    base = results.get(("padded", "local")) or next(iter(results.values()))
    lens = batch.lengths.tolist()
    print(f"One policy-update step on {args.device} ({torch.__version__}, {torch.get_num_threads()} threads), "
          f"model hidden {model_cfg.hidden_size} x {model_cfg.num_layers} layers, vocab {model_cfg.vocab_size}, "
          f"{args.dtype}; {args.batch} sequences ({args.group_size} per prompt), prompts ~{args.prompt_len}, responses median "
          f"{int(resp.median())} max {int(resp.max())} (clip {args.max_new_tokens}); {int(sum(lens))} real tokens; "
          f"padded micro_batch_size {args.micro_batch_size}, budget {args.max_tokens} tokens; median of {args.repeats}.")
    mfu_col = args.device == "cuda"
    print("| layout | attention | micro-batches | useful tokens | time (s) | tokens/s | x padded/local | loss |"
          + (" MFU |" if mfu_col else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|" if mfu_col else ""))
    for (layout, backend), r in results.items():
        tps = r["tokens"] / r["time"]
        line = (f"| {layout} | {backend} | {r['n_mb']} | {r['tokens'] / r['computed']:.1%} | {r['time']:.3f} | "
                f"{tps:,.0f} | {base['time'] / r['time']:.2f} | {r['loss']:.6f} |")
        if mfu_col:
            mfu = model_flops(model_cfg, r["n_params"], lens) / r["time"] / (args.peak_tflops * 1e12)
            line += f" {mfu:.1%} |"
        print(line)
    efficiency_table(args)
    distributed.destroy()


if __name__ == "__main__":
    main()
