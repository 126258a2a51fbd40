"""Peak extra memory of a callable: CPU via the torch profiler's allocation events, CUDA via the allocator.

CPU: `torch.profiler` with `profile_memory=True` records every allocation and free made through
torch's CPU allocator (tensor storage, not Python objects or allocator/OS overhead). Replaying those
events in time order gives the exact peak of torch-allocated bytes above the level at entry, which
is what `torch.cuda.max_memory_allocated` measures on a GPU. Tensors freed during the call that
existed before it make the running total dip below 0; the peak is taken over the running total.
"""
from __future__ import annotations

from typing import Any, Callable

import torch


def peak_extra_bytes(fn: Callable[[], Any], device: str | torch.device = "cpu") -> tuple[Any, int]:
    """Run `fn()`; return (its result, peak bytes allocated above the level at entry)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, max(0, torch.cuda.max_memory_allocated(device) - base)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return out, peak
