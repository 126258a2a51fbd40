#!/usr/bin/env python
"""Benchmark LM head + log-prob + entropy, forward + backward: materialised logits vs the fused op.

Methods (TP = 1; hidden x [T, H], output weight W [V, H], targets, random upstream gradients for
the log-prob and the entropy, backward to x and W):
  materialised  what the policy update did before: logits = x @ W^T ([T, V], Megatron's
                ColumnParallelLinear at TP = 1), `ops.vocab_parallel_logprobs` (Triton on CUDA,
                the torch backend on CPU), autograd through both (the [T, V] logits gradient exists).
  fused         `ops.fused_lm_head_logprobs` (chunked; no [T, V] tensor in forward or backward).
The weight carries Megatron DDP's float32 `main_grad` (counted in the inputs) and a hook that
adds `weight.grad` to it as DDP's does, so d W ends where it does in training.

Every case (method, T) runs in a fresh subprocess. Time: median wall time of --repeats
iterations after --warmup (CUDA: synchronised); on CPU also the process's CPU time (all threads),
steadier than wall time on a shared machine. Memory above the inputs (x, W, main_grad,
targets, upstream gradients), from the same process:
  CPU   peak RSS (ru_maxrss) minus the RSS once the inputs exist, i.e. what the OS had to give;
  CUDA  torch.cuda.max_memory_allocated minus the allocated bytes once the inputs exist.
"d x" (T x H in the inputs' dtype) is counted in both; the floor of any method.

Examples:
  OMP_NUM_THREADS=2 python tools/bench_lm_head.py                    # CPU, float32, H=1536, V=151936, T=512,2048
  python tools/bench_lm_head.py --tokens 1024,4096,8192              # T up to 8k (minutes per case on 2 cores)
  python tools/bench_lm_head.py --device cuda                        # bf16, T=16384,65536 (1.5B shape)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_TOKENS = {"cpu": "512,2048", "cuda": "16384,65536"}
DEFAULT_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_case(method, t, h, v, dtype, device, chunk, temperature, warmup, repeats, seed) -> dict:
    """One (method, T) in this process; returns times and the peak memory above the inputs."""
    from megatron_dgpo.ops import fused_lm_head_logprobs, lm_head_tile, vocab_parallel_logprobs

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    w = (torch.randn(v, h, generator=g) * 0.02).to(device=device, dtype=dtype).requires_grad_(True)
    target = torch.randint(0, v, (t,), generator=g).to(device)
    g1 = torch.randn(t, generator=g).to(device)
    g2 = torch.randn(t, generator=g).to(device)
    w.main_grad = torch.zeros(v, h, dtype=torch.float32, device=device)
    w.grad_added_to_main_grad = False

    def ddp_hook(p):  # megatron.core.distributed DistributedDataParallel's post-accumulate hook
        if p.grad is not None and not p.grad_added_to_main_grad:
            p.main_grad.add_(p.grad)
        p.grad = None

    w.register_post_accumulate_grad_hook(ddp_hook)

    def step():
        x.grad = None
        w.grad_added_to_main_grad = False
        if method == "fused":
            logp, ent = fused_lm_head_logprobs(x, w, target, temperature=temperature, with_entropy=True,
                                               chunk_tokens=chunk)
        else:
            logits = x @ w.t()
            logp, ent = vocab_parallel_logprobs(logits, target, temperature=temperature, with_entropy=True)
        ((logp * g1).sum() + (ent * g2).sum()).backward()

    sync(device)
    if device == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_bytes()
    times, cpu_times = [], []
    for i in range(warmup + repeats):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    tile = "x".join(map(str, lm_head_tile(t, v, chunk, device=device))) if method == "fused" else None
    return {"times": times, "cpu_times": cpu_times, "peak_extra": peak, "tile": tile}


def child_main(args):
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    res = run_case(args.method, args.t, args.hidden, args.vocab, DTYPES[args.dtype], args.device, args.chunk,
                   args.temperature, args.warmup, args.repeats, args.seed)
    print("RESULT " + json.dumps(res))


def spawn(args, method, t) -> dict:
    cmd = [sys.executable, __file__, "--child", "--method", method, "--t", str(t), "--hidden", str(args.hidden),
           "--vocab", str(args.vocab), "--dtype", args.dtype, "--device", args.device,
           "--temperature", str(args.temperature), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
           "--seed", str(args.seed)]
    if args.chunk:
        cmd += ["--chunk", str(args.chunk)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"rc={proc.returncode}: {err[:200]}"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--tokens", default=None, help="comma-separated T values (default: CPU 512,2048; CUDA 16384,65536)")
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--chunk", type=int, default=None, help="fused: tokens per tile (default: the op's lm_head_tile)")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--methods", default="materialised,fused")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--t", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.dtype = args.dtype or DEFAULT_DTYPE[args.device]
    if args.warmup is None:
        args.warmup = 2 if args.device == "cuda" else 0
    if args.repeats is None:
        args.repeats = 5 if args.device == "cuda" else 1
    if args.child:
        return child_main(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is available")

    tokens = [int(s) for s in (args.tokens or DEFAULT_TOKENS[args.device]).split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"CPU ({os.environ.get('OMP_NUM_THREADS', torch.get_num_threads())} threads)"
    mem_kind = "peak allocated" if args.device == "cuda" else "peak RSS"
    print(f"# LM head + log-prob + entropy fwd+bwd, {dev_name}, torch {torch.__version__}, {args.dtype}, "
          f"H={args.hidden}, V={args.vocab}, temperature {args.temperature}; median of {args.repeats} after "
          f"{args.warmup} warm-up, one fresh process per case; memory = {mem_kind} above the inputs")
    print()
    cpu = args.device == "cpu"
    print(f"| T | method | tile (tokens x vocab) | time (ms) | time / materialised |"
          + (" CPU time (s) | CPU time / materialised |" if cpu else "")
          + f" {mem_kind} extra (MiB) | mem / materialised | [T, V] logits (MiB) |")
    print("|---" * (10 if cpu else 8) + "|")
    esize = torch.tensor([], dtype=DTYPES[args.dtype]).element_size()
    for t in tokens:
        rows = {m: spawn(args, m, t) for m in methods}
        ref = rows.get("materialised")
        ok_ref = ref is not None and "error" not in ref
        logits_mib = t * args.vocab * esize / 2**20
        for m in methods:
            r = rows[m]
            if "error" in r:
                print(f"| {t} | {m} | - | failed ({r['error']}) | - |" + (" - | - |" if cpu else "")
                  + f" - | - | {logits_mib:.0f} |")
                continue
            sec = statistics.median(r["times"])
            mib = r["peak_extra"] / 2**20
            tr = f"{sec / statistics.median(ref['times']):.2f}x" if ok_ref else "-"
            mr = f"{r['peak_extra'] / ref['peak_extra']:.3f}x" if ok_ref and ref["peak_extra"] > 0 else "-"
            ct = ""
            if cpu:
                csec = statistics.median(r["cpu_times"])
                cr = f"{csec / statistics.median(ref['cpu_times']):.2f}x" if ok_ref else "-"
                ct = f" {csec:.1f} | {cr} |"
            print(f"| {t} | {m} | {r['tile'] or '-'} | {sec * 1e3:.0f} | {tr} |{ct} {mib:.0f} | {mr} "
                  f"| {logits_mib:.0f} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
