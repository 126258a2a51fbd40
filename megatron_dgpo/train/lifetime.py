"""Lifetime of a trained model's state: fresh optimizer state in place, and the release of model
chunks without waiting for the cyclic garbage collector.

Why: Megatron's DDP keeps the parameters' gradient accumulators in `ddp.grad_accs` with backward
hooks whose closures hold the DDP wrapper, and the schedule's hooks on the shared
TransformerConfig (`grad_scale_func = optimizer.scale_loss`, set by train.step.prepare_model_config)
point from the model to the optimizer. Model, DDP wrapper, gradient buffers and optimizer are then
in reference cycles and survive their last reference until a cyclic gc runs (measured: +516 MiB
per rank at the end of start-up with a 262k vocabulary). On a GPU that is a second copy of model,
gradients and Adam state in HBM.
"""
from __future__ import annotations

from typing import List

import torch

__all__ = ["reset_optimizer_state", "release_chunks", "inner_optimizers"]

# Hooks that Megatron's schedules read from the model's TransformerConfig.
_CONFIG_HOOKS = ("grad_scale_func", "finalize_model_grads_func", "no_sync_func", "grad_sync_func",
                 "param_sync_func")


def inner_optimizers(optimizer) -> List[torch.optim.Optimizer]:
    """The torch optimizers inside a Megatron (possibly chained) optimizer."""
    subs = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [getattr(o, "optimizer", o) for o in subs]


def reset_optimizer_state(optimizer) -> None:
    """Optimizer state as a freshly built optimizer has it: no Adam moments or step counts (Adam
    creates them at its next step, as it does after construction), the learning rate and other
    hyper-parameters of each parameter group as they were when it was built. The fp32 master
    copies are not touched: `reload_model_params()` refreshes them from the model."""
    for opt in inner_optimizers(optimizer):
        initial = getattr(opt, "_dgpo_initial_groups", None)
        opt.state.clear()
        if initial is not None:
            for group, init in zip(opt.param_groups, initial):
                group.update(init)


def remember_initial_groups(optimizer) -> None:
    """Record each parameter group's hyper-parameters (not its parameters) at construction, so
    that reset_optimizer_state can restore them."""
    for opt in inner_optimizers(optimizer):
        opt._dgpo_initial_groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def release_chunks(chunks) -> None:
    """Break the reference cycles between DDP-wrapped model chunks, their gradient buffers, the
    TransformerConfig hooks and the optimizer. The chunks are unusable afterwards."""
    for chunk in chunks:
        config = getattr(chunk, "config", None)
        for name in _CONFIG_HOOKS:
            if config is not None and getattr(config, name, None) is not None:
                setattr(config, name, None)
        handles = getattr(chunk, "remove_forward_pre_hook_handles", None)
        for h in list((handles or {}).values()):
            h.remove()
        if handles:
            handles.clear()
        grad_accs = getattr(chunk, "grad_accs", None)
        if grad_accs is not None:
            grad_accs.clear()  # drops the backward hooks (the nodes are held weakly by the params)
        for p in chunk.parameters():
            for attr in ("main_grad", "grad"):
                if getattr(p, attr, None) is not None:
                    setattr(p, attr, None) if attr == "grad" else delattr(p, attr)
        for attr in ("buffers", "expert_parallel_buffers", "bucket_groups", "expert_parallel_bucket_groups"):
            if isinstance(getattr(chunk, attr, None), list):
                getattr(chunk, attr).clear()
        for attr in ("param_to_bucket_group", "param_to_buffer"):
            if isinstance(getattr(chunk, attr, None), dict):
                getattr(chunk, attr).clear()
