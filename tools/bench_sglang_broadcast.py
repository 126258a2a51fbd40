#!/usr/bin/env python
"""Weight broadcast to SGLang servers: one broadcast per tensor (SGLang's default
update_weights_from_distributed path) vs one per flattened bucket (load_format "flattened_bucket",
what SGLangServerEngine sends), over a real process group.

    python tools/bench_sglang_broadcast.py [--receivers 2] [--layers 24 --hidden 1024 --vocab 32000]
                                           [--bucket-mb 64] [--reps 3] [--backend gloo|nccl]

The sender (rank 0) and `--receivers` processes form one group, as trainer rank 0 and the servers'
ranks do. Receivers allocate exactly as SGLang does (a tensor per name, or one uint8 buffer per
bucket split into views: model_runner_components/weight_updater.py), so the two columns differ
only in the number of collectives. Best of --reps after a warm-up; prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def model_tensors(layers: int, hidden: int, vocab: int, ffn: int) -> list[tuple[str, torch.Tensor]]:
    """A Qwen2-shaped HF state dict (names and shapes as the weight stream emits them)."""
    g = torch.Generator().manual_seed(0)
    kv = hidden // 4
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.q_proj.bias", (hidden,)),
                (p + "self_attn.k_proj.weight", (kv, hidden)), (p + "self_attn.k_proj.bias", (kv,)),
                (p + "self_attn.v_proj.weight", (kv, hidden)), (p + "self_attn.v_proj.bias", (kv,)),
                (p + "self_attn.o_proj.weight", (hidden, hidden)), (p + "mlp.gate_proj.weight", (ffn, hidden)),
                (p + "mlp.up_proj.weight", (ffn, hidden)), (p + "mlp.down_proj.weight", (hidden, ffn)),
                (p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
    out += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return [(n, torch.randn(s, generator=g).to(torch.bfloat16)) for n, s in out]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rank(rank: int, world: int, args, port: int, results):
    from megatron_dgpo.rollout import sglang_payloads as P

    dev = torch.device(f"cuda:{rank}" if args.backend == "nccl" else "cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(args.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    tensors = [(n, t.to(dev)) for n, t in model_tensors(args.layers, args.hidden, args.vocab, args.ffn)]
    buckets = list(P.bucket_named_tensors(tensors, args.bucket_mb << 20))

    def per_tensor():
        for _, t in tensors:
            buf = t if rank == 0 else torch.empty_like(t)
            dist.broadcast(buf, src=0)

    def flattened():
        for b in buckets:
            if rank == 0:
                buf = P.flatten_bucket(b)
            else:
                buf = torch.empty(sum(t.numel() * t.element_size() for _, t in b), dtype=torch.uint8, device=dev)
            dist.broadcast(buf, src=0)

    times = {}
    for name, fn in (("per_tensor", per_tensor), ("flattened", flattened)):
        best = float("inf")
        for _ in range(args.reps + 1):  # the first is the warm-up
            dist.barrier()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dist.barrier()
            best = min(best, time.perf_counter() - t0)
        times[name] = best
    if rank == 0:
        nbytes = sum(t.numel() * t.element_size() for _, t in tensors)
        results.update(times=times, tensors=len(tensors), buckets=len(buckets), nbytes=nbytes)
    dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--receivers", type=int, default=2)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--bucket-mb", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backend", default="nccl" if torch.cuda.device_count() > 1 else "gloo")
    args = ap.parse_args(argv)
    world = 1 + args.receivers
    with mp.Manager() as m:
        results = m.dict()
        port = free_port()
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        mp.spawn(run_rank, args=(world, args, port, results), nprocs=world, join=True)
        r = dict(results)
    t = r["times"]
    mb = r["nbytes"] / 2**20
    print(f"{r['tensors']} tensors, {mb:.0f} MiB bf16, {args.receivers} receivers, backend {args.backend}, "
          f"buckets of {args.bucket_mb} MiB ({r['buckets']} buckets)\n")
    print("| path | broadcasts | time (s) | GB/s | vs per-tensor |")
    print("|---|---|---|---|---|")
    for name, n in (("per_tensor", r["tensors"]), ("flattened", r["buckets"])):
        print(f"| {name} | {n} | {t[name]:.3f} | {r['nbytes'] / t[name] / 1e9:.2f} | "
              f"{t['per_tensor'] / t[name]:.2f}x |")


if __name__ == "__main__":
    main()
