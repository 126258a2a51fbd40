#!/usr/bin/env python
"""Throughput of the HF-layout weight stream vs a plain memcpy of the same bytes (one process).

    python tools/bench_weight_sync.py [--hidden 768 --layers 8 --vocab 32000] [--buckets 16,64,256]
                                      [--reps 3] [--synthetic] [--device cpu|cuda]

Builds a Qwen2-shaped Megatron GPTModel (TP=PP=1; `--synthetic`: a {megatron name: tensor} dict,
no Megatron import) of a few hundred MB in fp32 and, for each bucket size, times

* memcpy: every parameter copied into a reused flat buffer of the bucket size (the same bytes the
  stream moves, with none of its work) -- the denominator of the ratios;
* stream: `WeightStreamer(...).stream()` fp32 -> fp32 (QKV un-interleave, gate/up split, vocab
  strip, bucket packing), with reused buffers; `+check`: integrity="always" (checksum written and
  verified: two extra reads of each bucket; the default "transfer" mode only checks buckets that
  cross processes, so a single process pays nothing); `bf16`: cast to bfloat16 on the way (GB/s of
  fp32 source bytes read); `default`: reuse_buffers=False (the default: a buffer is recycled only once
  nothing references it or its tensors; the consumer here drops each bucket after reading it).

Best of --reps (variants interleaved) after a warm-up; prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def build(args, device):
    from megatron_dgpo.model.config import ModelConfig
    from megatron_dgpo.weight_sync.layouts import iter_rule_instances, megatron_shape

    cfg = ModelConfig(arch="qwen2", vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                      num_attention_heads=args.heads, num_query_groups=args.kv_heads, ffn_hidden_size=args.ffn,
                      qkv_bias=True, tie_word_embeddings=False)
    if args.synthetic:
        g = torch.Generator().manual_seed(0)
        state = {r.megatron.format(i=l): torch.randn(megatron_shape(cfg, r, 1), generator=g).to(device)
                 for l, r in iter_rule_instances(cfg)}
        return cfg, state, list(state.values())
    from megatron_dgpo import distributed as mdist
    from megatron_dgpo.model.builder import build_model_chunks as build_chunks

    mdist.initialize(1, 1)
    chunks = build_chunks(cfg)
    return cfg, chunks, [p.detach() for p in chunks[0].parameters()]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_of(fn, reps, device):
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--buckets", default="16,64,256", help="bucket sizes in MiB")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--synthetic", action="store_true", help="dict of tensors instead of a GPTModel")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index if device.index is not None else 0)
        torch.cuda.set_device(device)

    from megatron_dgpo.weight_sync import WeightStreamer

    cfg, model, params = build(args, device)
    if device.type == "cuda" and not args.synthetic:
        for p in params:
            assert p.is_cuda
    total = sum(p.numel() * p.element_size() for p in params)
    gb = total / 1e9

    def memcpy_fn(bucket):
        buf = torch.empty(max(bucket, max(p.numel() * p.element_size() for p in params)), dtype=torch.uint8,
                          device=device)

        def run():
            off = 0
            for p in params:
                n = p.numel() * p.element_size()
                if off + n > buf.numel():
                    off = 0
                buf[off:off + n].view(p.dtype).copy_(p.view(-1))
                off += n
        return run

    whole_src = torch.empty(total, dtype=torch.uint8, device=device).fill_(1)
    whole_dst = torch.empty_like(whole_src)
    t_whole = best_of(lambda: whole_dst.copy_(whole_src), args.reps, device)
    del whole_src, whole_dst

    def stream_fn(bucket, **kw):
        st = WeightStreamer(model, cfg, bucket_bytes=bucket, **kw)

        def run():
            n = 0
            for b in st.stream():
                n += b.payload_bytes
            assert n > 0
        return run

    rows = []
    for mib in [int(x) for x in args.buckets.split(",")]:
        bucket = mib << 20
        fns = {
            "memcpy": memcpy_fn(bucket),
            "stream": stream_fn(bucket, reuse_buffers=True, integrity="off"),
            "stream+check": stream_fn(bucket, reuse_buffers=True, integrity="always"),
            "stream bf16": stream_fn(bucket, reuse_buffers=True, integrity="off", dtype=torch.bfloat16),
            "stream default": stream_fn(bucket, reuse_buffers=False, integrity="off"),
        }
        # Interleave the variants rep by rep (best of --reps each) so load changes hit them alike.
        res = {k: float("inf") for k in fns}
        for fn in fns.values():
            fn()  # warm-up
        for _ in range(args.reps):
            for k, fn in fns.items():
                sync(device)
                t = time.perf_counter()
                fn()
                sync(device)
                res[k] = min(res[k], time.perf_counter() - t)
        rows.append((mib, res))

    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores visible, " \
        f"torch threads {torch.get_num_threads()})"
    print(f"\nModel: Qwen2-shaped, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}: "
          f"{total / 2**20:.0f} MiB fp32 ({'synthetic dict' if args.synthetic else 'GPTModel'}), device {dev}")
    print(f"Single contiguous memcpy of all {total / 2**20:.0f} MiB: {gb / t_whole:.2f} GB/s\n")
    cols = ["memcpy", "stream", "stream+check", "stream bf16", "stream default"]
    print("| bucket MiB | " + " | ".join(f"{c} GB/s" for c in cols) + " | " +
          " | ".join(f"{c} / memcpy" for c in cols[1:]) + " |")
    print("|" + "---|" * (1 + 2 * len(cols) - 1))
    for mib, res in rows:
        rates = [gb / res[c] for c in cols]
        print(f"| {mib} | " + " | ".join(f"{r:.2f}" for r in rates) + " | " +
              " | ".join(f"{r / rates[0]:.2f}" for r in rates[1:]) + " |")
    if not args.synthetic:
        from megatron_dgpo import distributed as mdist
        mdist.destroy()


if __name__ == "__main__":
    main()
