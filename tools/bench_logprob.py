#!/usr/bin/env python
"""Benchmark token log-prob (+ entropy) forward+backward on [T, V] logits, TP=1.

Methods, each doing forward and backward with random upstream gradients:
  dgpo      megatron_dgpo.ops.vocab_parallel_logprobs(with_entropy=True): logp + entropy, default
            backend (Triton on CUDA when triton imports, torch otherwise)
  dgpo_torch / dgpo_triton   the same op with the backend forced
  naive     float32 torch.log_softmax on the whole logits: logp + entropy
  megatron  megatron.core.tensor_parallel.vocab_parallel_cross_entropy: logp only (= -loss)
  floor     not a method: the time to read the logits twice and write the gradient once at the
            device-to-device copy bandwidth measured at the start of the run ("time / floor").

Time: median wall time of `--repeats` fwd+bwd iterations after `--warmup` (CUDA: synchronised).
Peak extra memory: bytes allocated above the level before the iteration (inputs, target and
upstream grads already exist; the gradient w.r.t. the logits, T*V in the logits' dtype, is counted
since every method must produce it). CUDA: torch.cuda.max_memory_allocated delta. CPU: exact
replay of the torch profiler's allocation/free events (profile_memory=True), i.e. all tensor
storage torch allocated, the CPU analogue of max_memory_allocated (see
megatron_dgpo/ops/_memprofile.py); measured in a separate iteration from the timed ones.
Megatron overwrites float32 input logits in place, so it gets a fresh copy per iteration, made
outside the timed/measured region.

Examples:
  python tools/bench_logprob.py --device cpu                       # ~1 min on 2 cores
  python tools/bench_logprob.py --device cuda --dtype bfloat16     # includes T=16384, V=151936; both backends
  python tools/bench_logprob.py --device cpu --shapes 512:32768 --methods dgpo,naive
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_dgpo.ops import default_chunk_size, vocab_parallel_logprobs  # noqa: E402
from megatron_dgpo.ops.logprobs import resolve_backend  # noqa: E402
from megatron_dgpo.ops._memprofile import peak_extra_bytes  # noqa: E402

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DEFAULT_SHAPES = {
    "cpu": [(2048, 32768), (2048, 151936)],
    "cuda": [(4096, 32768), (4096, 151936), (16384, 151936)],
}


def init_megatron_world1(device: str) -> bool:
    """Single-process process group + megatron parallel state (TP=1), for vocab_parallel_cross_entropy."""
    import torch.distributed as dist

    try:
        from megatron.core import parallel_state
    except ImportError:
        return False
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo", world_size=1, rank=0)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    return True


def make_methods(chunk_size):
    def dgpo_with(backend):
        def run(logits, target, g1, g2):
            logp, ent = vocab_parallel_logprobs(logits, target, with_entropy=True, chunk_size=chunk_size,
                                                backend=backend)
            ((logp * g1).sum() + (ent * g2).sum()).backward()
        return run

    def naive(logits, target, g1, g2):
        ls = torch.log_softmax(logits.float(), dim=-1)
        logp = ls.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        ent = -(ls.exp() * ls).sum(-1)
        ((logp * g1).sum() + (ent * g2).sum()).backward()

    def megatron(logits, target, g1, g2):
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        loss = vocab_parallel_cross_entropy(logits, target)
        (-(loss * g1)).sum().backward()

    return {"dgpo": dgpo_with(None), "dgpo_torch": dgpo_with("torch"), "dgpo_triton": dgpo_with("triton"),

            "naive": naive, "megatron": megatron}


def copy_bandwidth(device, nbytes):
    """Bytes moved per second (read + write) by a device-to-device copy of `nbytes`, median of 5."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    b = torch.empty_like(a)
    times = []
    for _ in range(7):
        sync(device)
        t0 = time.perf_counter()
        b.copy_(a)
        sync(device)
        times.append(time.perf_counter() - t0)
    del a, b
    return 2 * nbytes / statistics.median(times[2:])


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def bench_one(fn, make_inputs, device, warmup, repeats):
    """Returns (median seconds, peak extra bytes)."""
    times = []
    for i in range(warmup + repeats):
        leaf, args = make_inputs()
        sync(device)
        t0 = time.perf_counter()
        fn(*args)
        sync(device)
        dt = time.perf_counter() - t0
        del leaf, args
        if i >= warmup:
            times.append(dt)
    leaf, args = make_inputs()
    _, peak = peak_extra_bytes(lambda: fn(*args), device)
    del leaf, args
    return statistics.median(times), peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--shapes", default=None, help="comma-separated T:V list (default depends on device)")
    ap.add_argument("--methods", default=None,
                    help="comma-separated (default cpu: dgpo,naive,megatron; cuda: dgpo_triton,dgpo_torch,naive,megatron)")
    ap.add_argument("--chunk-size", type=int, default=None, help="rows per chunk for dgpo (default: op's default)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is available")
    dtype = DTYPES[args.dtype]
    shapes = (
        [tuple(int(x) for x in s.split(":")) for s in args.shapes.split(",")]
        if args.shapes else DEFAULT_SHAPES[device]
    )
    warmup = args.warmup if args.warmup is not None else (3 if device == "cuda" else 1)
    repeats = args.repeats if args.repeats is not None else (10 if device == "cuda" else 3)
    default_methods = "dgpo_triton,dgpo_torch,naive,megatron" if device == "cuda" else "dgpo,naive,megatron"
    methods = [m.strip() for m in (args.methods or default_methods).split(",") if m.strip()]
    if "megatron" in methods and not init_megatron_world1(device):
        print("megatron-core not importable: skipping the megatron column", file=sys.stderr)
        methods.remove("megatron")
    fns = make_methods(args.chunk_size)

    dev_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    bw = copy_bandwidth(device, 2**30 if device == "cuda" else 2**28)
    print(f"# vocab log-prob fwd+bwd, {dev_name}, torch {torch.__version__}, dtype {args.dtype}, "
          f"median of {repeats} after {warmup} warmup; copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")
    print()
    print("| T | V | method | outputs | chunk rows | time (ms) | time / naive | time / floor | peak extra (MiB) "
          "| mem / naive | grad itself (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    for t, v in shapes:
        base = (torch.randn(t, v, generator=g) * 2).to(device=device, dtype=dtype)
        target = torch.randint(0, v, (t,), generator=g).to(device)
        g1 = torch.randn(t, generator=g).to(device)
        g2 = torch.randn(t, generator=g).to(device)
        grad_mib = t * v * base.element_size() / 2**20
        rows = {}
        for m in methods:
            if m == "megatron" and dtype == torch.float32:
                def make_inputs():  # megatron overwrites fp32 input: a fresh copy each time
                    leaf = base.clone().requires_grad_(True)
                    return leaf, (leaf, target, g1, g2)
            else:
                leaf0 = base.requires_grad_(True)

                def make_inputs(leaf0=leaf0):
                    leaf0.grad = None
                    return leaf0, (leaf0, target, g1, g2)
            try:
                rows[m] = bench_one(fns[m], make_inputs, device, warmup, repeats)
            except (RuntimeError, MemoryError) as e:  # e.g. CUDA OOM for naive at large T*V
                rows[m] = None
                print(f"<!-- {m} T={t} V={v} failed: {str(e).splitlines()[0][:200]} -->")
                if device == "cuda":
                    torch.cuda.empty_cache()
            base.requires_grad_(False)
            base.grad = None
        ref = rows.get("naive")
        floor = 3 * t * v * base.element_size() / bw  # read twice, write the gradient once
        for m in methods:
            r = rows[m]
            uses_chunks = m == "dgpo_torch" or (m == "dgpo" and resolve_backend(None, base) == "torch")
            chunk = (args.chunk_size or default_chunk_size(v, device)) if uses_chunks else "-"
            outs = "logp" if m == "megatron" else "logp+entropy"
            if r is None:
                print(f"| {t} | {v} | {m} | {outs} | {chunk} | failed | - | - | - | - | {grad_mib:.0f} |")
                continue
            sec, peak = r
            tr = f"{sec / ref[0]:.2f}x" if ref else "-"
            mr = f"{peak / ref[1]:.2f}x" if ref and ref[1] else "-"
            print(f"| {t} | {v} | {m} | {outs} | {chunk} | {sec * 1e3:.1f} | {tr} | {sec / floor:.1f}x "
                  f"| {peak / 2**20:.0f} | {mr} | {grad_mib:.0f} |")
        print(f"| {t} | {v} | floor | - | - | {floor * 1e3:.1f} | - | 1.0x | - | - | - |")
        del base
        sys.stdout.flush()


if __name__ == "__main__":
    main()
