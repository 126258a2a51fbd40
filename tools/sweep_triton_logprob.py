#!/usr/bin/env python
"""Time the Triton log-prob kernels (forward stats, backward gradient) for several block sizes and
warp counts on one CUDA device, against the HBM floor at the measured copy bandwidth.

    python tools/sweep_triton_logprob.py [--t 16384] [--v 151936]

Prints a table; used to pick the defaults of megatron_dgpo/ops/logprobs_triton.py (block_size and
the warp count in _launch_args).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_dgpo.ops import logprobs_triton as tk  # noqa: E402


def cuda_ms(fn, reps=10, warmup=3):
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--t", type=int, default=16384)
    ap.add_argument("--v", type=int, default=151936)
    ap.add_argument("--blocks", default="1024,2048,4096,8192")
    ap.add_argument("--warps", default="4,8,16")
    args = ap.parse_args(argv)
    t, v = args.t, args.v
    x = (torch.randn(t, v, device="cuda") * 2).to(torch.bfloat16)
    a = torch.empty(2**28, device="cuda")
    b = torch.empty_like(a)
    bw = 2 * a.numel() * 4 / (cuda_ms(lambda: b.copy_(a)) * 1e-3)
    del a, b
    lse = torch.randn(t, device="cuda")
    coef = torch.randn(t, device="cuda")
    tgt = torch.randint(0, v, (t,), device="cuda")
    elem = t * v * x.element_size()
    print(f"# {torch.cuda.get_device_name()}, T={t} V={v} bf16, copy bandwidth {bw / 1e9:.0f} GB/s; "
          f"floor: forward {elem / bw * 1e3:.2f} ms (read), backward {2 * elem / bw * 1e3:.2f} ms (read + write)")
    print("| block | warps | forward (ms) | fwd / floor | backward (ms) | bwd / floor |")
    print("|---|---|---|---|---|---|")
    for blk in (int(s) for s in args.blocks.split(",")):
        for w in (int(s) for s in args.warps.split(",")):
            try:
                f = cuda_ms(lambda: tk.row_stats(x, 0.7, True, block=blk, num_warps=w))
                g = cuda_ms(lambda: tk.row_grad(x, lse, coef, coef, coef, tgt, 0.7, x.dtype, block=blk, num_warps=w))
            except Exception as e:  # noqa: BLE001 (e.g. out of registers/shared memory for a config)
                print(f"| {blk} | {w} | failed: {type(e).__name__} | | | |")
                continue
            print(f"| {blk} | {w} | {f:.2f} | {f / (elem / bw * 1e3):.2f}x | {g:.2f} | {g / (2 * elem / bw * 1e3):.2f}x |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
