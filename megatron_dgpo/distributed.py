"""Process-group and Megatron model-parallel initialisation.

`initialize()` works under torchrun (reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT) and in a plain single process (it then creates a world of one). It uses NCCL when
CUDA is available and gloo otherwise, in which case it also enables the CPU backend
(`megatron_dgpo.compat.cpu`).
"""
from __future__ import annotations

import os
import random
import socket
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from megatron_dgpo.compat.cpu import enable_cpu_backend

__all__ = ["initialize", "destroy", "is_initialized", "device", "rank", "world_size"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device() -> torch.device:
    """The device tensors of this rank live on."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_initialized() -> bool:
    from megatron.core import parallel_state

    return dist.is_initialized() and parallel_state.model_parallel_is_initialized()


def initialize(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    *,
    context_parallel_size: int = 1,
    timeout_minutes: float = 30.0,
    backend: Optional[str] = None,
) -> None:
    """Initialise torch.distributed (if needed), Megatron's parallel state and RNG.

    Re-initialising with another layout in the same process destroys the previous model
    parallel state first (the default process group is kept).
    Seeds: python/numpy/torch get `seed + 100 * pp_rank` and Megatron's RNG tracker is seeded
    with it (the Megatron-LM convention: TP ranks differ in the model-parallel tracker state,
    DP replicas share it).
    """
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # a plain single process
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ["RANK"] = "0"
            os.environ["WORLD_SIZE"] = "1"
            os.environ.setdefault("LOCAL_RANK", "0")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))

    enable_cpu_backend()

    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
    )
    set_seed(seed)


def set_seed(seed: int) -> None:
    """Seed python, numpy, torch and Megatron's model-parallel RNG tracker for this rank."""
    import numpy as np
    from megatron.core import parallel_state, tensor_parallel

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    """Tear down Megatron's parallel state and the default process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
