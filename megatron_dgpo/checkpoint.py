"""Atomic Megatron distributed checkpoints: model, optimizer, RNG state and step.

Layout:
    <root>/latest                 text file with the name of the last complete checkpoint
    <root>/step_00000042/         a megatron.core.dist_checkpointing directory, plus
    <root>/step_00000042/dgpo_meta.json   step, parallel layout, versions, model config
    <root>/step_00000042/dgpo_digests.json  SHA-256 and size of every other file

Atomicity: every rank writes into `<root>/.tmp.step_00000042/`; after a barrier rank 0 writes
dgpo_meta.json, all ranks hash a share of the files into `dgpo_digests.json` (checkpoint_trust:
verified before every load, together with restricted unpickling), then rank 0 fsyncs
every file and the directory, renames it to `step_00000042/` (os.replace is atomic on POSIX),
fsyncs `<root>`, then writes `latest` through a temporary file + fsync + rename. A crash at any
point leaves `latest` naming the previous complete checkpoint; stale `.tmp.*` directories are
removed by the next save.

Resharding: model weights use Megatron's sharded state dict (global layer numbers, TP-sharded
tensors), so they load into any TP / PP / DP layout. The optimizer state of the non-distributed
optimizer is sharded like the model and reshards too; the distributed optimizer is saved by default
in Megatron's `fully_reshardable` format (gathered over DP while saving), which loads into any
TP / PP / DP layout; `dp_reshardable` (parallel writes, no gather) allows DP changes only. RNG
states are per (pp, tp, dp) rank and are restored only into the same layout.

Versions: megatron-core 0.19 reads checkpoints written by 0.16, not the reverse (0.19 stores the
common state differently).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_dgpo import checkpoint_trust

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "checkpoint_dir", "resume_checkpoint",
           "CheckpointError", "DISTRIB_OPTIM_FORMAT", "OPTIM_FORMATS"]

DISTRIB_OPTIM_FORMAT = "fully_reshardable"
_LATEST = "latest"
_META = "dgpo_meta.json"


def checkpoint_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{int(step):08d}")


_STEP_NAME = re.compile(r"step_\d{8}")


class CheckpointError(RuntimeError):
    """A checkpoint (or checkpoint root) that cannot be used; the message says why."""


def _step_of(name: str) -> Optional[int]:
    return int(name[5:]) if _STEP_NAME.fullmatch(name) else None


def is_complete(path: str) -> bool:
    """A finished save: the metadata of dist_checkpointing and ours are both there (ours is
    written last, just before the atomic rename)."""
    return os.path.isfile(os.path.join(path, _META)) and os.path.isfile(os.path.join(path, ".metadata"))


def _read_latest(root: str) -> tuple[Optional[str], str]:
    """(checkpoint `latest` names, or None; why not). `latest` must hold a bare `step_XXXXXXXX`
    name of a complete checkpoint directly under `root`: never a path that leaves the root."""
    path = os.path.join(root, _LATEST)
    if not os.path.isfile(path):
        return None, f"no {_LATEST!r} file"
    with open(path, "rb") as f:
        raw = f.read(256)
    name = raw.decode("utf-8", "replace").strip()
    if _step_of(name) is None:
        return None, f"{_LATEST!r} holds {name[:80]!r}, not a step_XXXXXXXX name inside {root}"
    full = os.path.join(root, name)
    if os.path.islink(full) or not os.path.isdir(full):
        return None, f"{_LATEST!r} names {name}, which is not a directory in {root}"
    if not is_complete(full):
        return None, f"{_LATEST!r} names {name}, which is incomplete"
    return full, ""


def latest_checkpoint(root: str) -> Optional[str]:
    """The complete checkpoint `latest` points to, or None (no, or a broken, `latest`)."""
    return _read_latest(root)[0]


def complete_checkpoints(root: str) -> List[str]:
    """Complete `step_*` directories of `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    names = sorted(e for e in os.listdir(root) if _step_of(e) is not None)
    return [os.path.join(root, n) for n in names
            if not os.path.islink(os.path.join(root, n)) and is_complete(os.path.join(root, n))]


def resume_checkpoint(root: str) -> tuple[Optional[str], str]:
    """Where `--resume` continues from: (checkpoint or None, a note to print, "" if none).

    `latest` when it names a complete checkpoint; else the newest complete `step_*` (the note says
    so); None when the root holds no checkpoint at all. A root with checkpoint leftovers but none
    complete raises CheckpointError: starting from step 0 there would overwrite the run."""
    path, why = _read_latest(root)
    if path is not None:
        return path, ""
    found = complete_checkpoints(root)
    if found:
        return found[-1], f"{why}; resuming from the newest complete checkpoint {found[-1]}"
    leftovers = sorted(os.listdir(root)) if os.path.isdir(root) else []
    leftovers = [e for e in leftovers if e == _LATEST or e.startswith("step_")]
    if leftovers:
        raise CheckpointError(f"cannot resume from {root}: {why} and no complete step_* checkpoint "
                              f"(found {leftovers[:5]}); fix it or start again with --overwrite")
    return None, ""


def _ps():
    from megatron.core import parallel_state
    return parallel_state


def _layout() -> dict:
    ps = _ps()
    return dict(tp=ps.get_tensor_model_parallel_world_size(),
                pp=ps.get_pipeline_model_parallel_world_size(),
                dp=ps.get_data_parallel_world_size(),
                vpp=ps.get_virtual_pipeline_model_parallel_world_size())


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _fsync_tree(path: str) -> None:
    for dirpath, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def _unwrapped(model_chunks):
    from megatron_dgpo.model.builder import unwrap_model
    return unwrap_model(list(model_chunks))


def _model_sharded_state_dict(model_chunks) -> dict:
    chunks = _unwrapped(model_chunks)
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


OPTIM_FORMATS = ("fully_reshardable", "dp_reshardable")


def _optimizer_metadata(fmt: str = DISTRIB_OPTIM_FORMAT, mem_efficient: Optional[bool] = None) -> dict:
    """Megatron's sharded-state-dict metadata for the distributed optimizer.

    fully_reshardable gathers each TP/PP shard's optimizer state over DP: through NCCL onto every
    DP rank (fast, CPU memory for the whole shard state on every rank) or, mem_efficient, through
    gloo onto DP rank 0 only. Without CUDA only the gloo path exists (the other calls .cuda()).
    """
    if mem_efficient is None:
        mem_efficient = not torch.cuda.is_available()
    return {"distrib_optim_sharding_type": fmt, "chained_optim_avoid_prefix": True,
            "distrib_optim_fully_reshardable_mem_efficient": bool(mem_efficient)}


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"random": random.getstate(), "np": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded(state) -> "object":
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    ps = _ps()
    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
             ps.get_data_parallel_world_size())
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_data_parallel_rank())
    return ShardedObject("rng_state", state, shape, offset, replica_id=0)


def save_checkpoint(root: str, step: int, model_chunks: List[torch.nn.Module], optimizer=None, *,
                    save_rng: bool = True, extra: Optional[dict] = None,
                    keep_last: Optional[int] = None, optimizer_format: str = DISTRIB_OPTIM_FORMAT,
                    mem_efficient: Optional[bool] = None) -> str:
    """Save atomically to `<root>/step_XXXXXXXX` and point `latest` at it. Collective.

    `optimizer_format` (distributed optimizer only): "fully_reshardable" (loads into any TP / PP /
    DP layout; the state is gathered over DP while saving, and loading holds each TP / PP shard's
    whole state in CPU memory on every rank, see load_checkpoint) or "dp_reshardable" (each rank
    writes and reads only its own buffer shard, in parallel; only the DP size may change on load:
    the choice for very large models). `mem_efficient`: see `_optimizer_metadata` (None: gloo onto
    DP rank 0 on CPU, NCCL all-gather onto every DP rank on CUDA).

    `extra`: small JSON-serialisable dict stored in dgpo_meta.json (e.g. data-loader position).
    `keep_last`: delete older complete checkpoints beyond this many (after the new one is live).
    Scripts calling this need an `if __name__ == "__main__":` guard (dist_checkpointing spawns a
    process).
    """
    from megatron.core import dist_checkpointing

    if optimizer_format not in OPTIM_FORMATS:
        raise ValueError(f"optimizer_format must be one of {OPTIM_FORMATS}, got {optimizer_format!r}")
    rank = dist.get_rank() if dist.is_initialized() else 0
    final = checkpoint_dir(root, step)
    name = os.path.basename(final)
    tmp = os.path.join(root, f".tmp.{name}")
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        for entry in os.listdir(root):  # leftovers of crashed saves
            if entry.startswith(".tmp."):
                shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
        os.makedirs(tmp)
    _barrier()

    sd = _model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        _ensure_optimizer_state(optimizer)
        sd["optimizer"] = optimizer.sharded_state_dict(
            sd, is_loading=False, metadata=_optimizer_metadata(optimizer_format, mem_efficient))
    if save_rng:
        sd["rng_state"] = _rng_sharded(_rng_state())
    sd["step"] = int(step)
    dist_checkpointing.save(sharded_state_dict=sd, checkpoint_dir=tmp)
    _barrier()

    if rank == 0:
        model_cfg = getattr(_unwrapped(model_chunks)[0], "model_cfg", None)
        distributed = optimizer is not None and _is_distributed(optimizer)
        meta = {"step": int(step), "layout": _layout(), "has_optimizer": optimizer is not None,
                "distributed_optimizer": distributed,
                "optimizer_format": optimizer_format if distributed else "model_space",
                "has_rng": save_rng, "megatron_core": _megatron_version(),
                "model_config": model_cfg.to_dict() if model_cfg is not None else None,
                "extra": extra or {}}
        with open(os.path.join(tmp, _META), "w") as f:
            json.dump(meta, f, indent=1)
    _barrier()
    checkpoint_trust.write_digests(tmp)  # collective: every rank hashes a share of the files
    if rank == 0:
        _fsync_tree(tmp)
        if os.path.exists(final):  # re-saving the same step: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _atomic_write(os.path.join(root, _LATEST), name + "\n")
        if keep_last:
            # Only checkpoints older than this one: after a resume from an earlier step, later
            # directories (e.g. one that failed to load) are left for the user to inspect.
            older = sorted(e for e in os.listdir(root) if _step_of(e) is not None and _step_of(e) < int(step))
            for old in older[:max(0, len(older) - (keep_last - 1))]:
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    _barrier()
    return final


def _ensure_optimizer_state(optimizer) -> None:
    """Give every parameter of the inner torch Adam a state (zero moments, step 0) if it has
    none yet, so that what is saved has the same keys whether or not a step was taken.

    Upstream quirks (megatron-core 0.16, no Apex/TE): DistributedOptimizer.state_dict() asserts
    that all params share one Adam 'step', which fails for a fresh optimizer (empty state); and
    an optimizer saved before its first step (e.g. every RL step so far skipped for lack of
    reward variance) writes no moments, while the loader asks for them. A zero state is exactly
    what torch Adam creates lazily on its first step, so this changes no numerics.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if "exp_avg" not in st:
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if "step" not in st:
                    st["step"] = torch.tensor(0.0, dtype=torch.float32)


def _restore_adam_steps(optimizer) -> None:
    """Upstream quirks (megatron-core 0.16, no Apex/TE), DistributedOptimizer.load_state_dict:
    it puts ONE `step` tensor object into the state of every parameter (torch Adam increments
    each param's step in place, so the shared counter would advance once per parameter), and
    `load_parameter_state_from_dp_reshardable` then copies per-parameter `step` values that come
    back as 0 on CPU, so Adam's bias correction restarted after a resume. The correct count is
    the `step` Megatron stores in each param group: give every parameter its own copy of it."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state.get(p)
                if not st or not isinstance(st.get("step"), torch.Tensor):
                    continue
                if "step" in group and group["step"] is not None:
                    st["step"] = torch.tensor(float(group["step"]), dtype=st["step"].dtype,
                                              device=st["step"].device)
                else:
                    st["step"] = st["step"].clone()


def _fill_zero_common_step(sd) -> None:
    """Upstream quirk (megatron-core 0.16 and 0.19, non-distributed optimizer): sharded_state_dict
    saves the shared Adam `step` as `common_step` only `if step:`, so a checkpoint taken before the
    first update (every RL step so far skipped, step 0) loads per-parameter states without `step`,
    which torch Adam's load_state_dict rejects (KeyError: 'step'). Put the 0 back where Megatron's
    loader restores it from (`state['common_step']`)."""
    if isinstance(sd, dict):
        st = sd.get("state")
        if isinstance(st, dict) and "param_groups" in sd and "common_step" not in st:
            if any(isinstance(v, dict) and v and "step" not in v for v in st.values()):
                st["common_step"] = torch.tensor(0.0)
        for v in sd.values():
            _fill_zero_common_step(v)
    elif isinstance(sd, (list, tuple)):
        for v in sd:
            _fill_zero_common_step(v)


@contextlib.contextmanager
def _adam_step_passthrough(optimizer):
    """Upstream quirk (megatron-core 0.16 and 0.19 with torch Adam, i.e. without TE/Apex):
    DistributedOptimizer.load_state_dict first puts a `step` tensor into every parameter's Adam
    state, then `load_parameter_state_from_fully_reshardable` skips `step` when it builds the
    tensors to copy while `_set_main_param_and_optimizer_states` copies every key of the state,
    so loading a fully_reshardable checkpoint raised KeyError('step'). During the load, the copy
    is given the parameter's own `step` (a self-copy, a no-op); `_restore_adam_steps` then sets
    the counts. TE's FusedAdam keeps no per-parameter step and is unaffected."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    patched = [o for o in getattr(optimizer, "chained_optimizers", [optimizer]) if isinstance(o, DistributedOptimizer)]
    for opt in patched:
        orig = opt._set_main_param_and_optimizer_states

        def passthrough(model_param, tensors, opt=opt, orig=orig):
            group_index, group_order = opt.model_param_group_index_map[model_param]
            main = opt.optimizer.param_groups[group_index]["params"][group_order]
            st = opt.optimizer.state.get(main, {}) if hasattr(opt.optimizer, "state") else {}
            if isinstance(st.get("step"), torch.Tensor) and "step" not in tensors:
                tensors = dict(tensors, step=st["step"])
            return orig(model_param, tensors)

        opt._set_main_param_and_optimizer_states = passthrough
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states  # back to the class method


def _is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(o, DistributedOptimizer) for o in opts)


def _megatron_version() -> str:
    try:
        from importlib.metadata import version
        return version("megatron-core")
    except Exception:  # pragma: no cover
        return "unknown"


def read_meta(path: str) -> dict:
    with open(os.path.join(path, _META)) as f:
        return json.load(f)


def load_checkpoint(path_or_root: str, model_chunks: List[torch.nn.Module], optimizer=None, *,
                    load_optimizer: bool = True, load_rng: Optional[bool] = None,
                    strict: bool = True) -> int:
    """Load a checkpoint (a step directory, or a root whose `latest` is used); return its step.

    Model weights load into any TP / PP / DP layout. The optimizer state is loaded when
    `optimizer` is given and `load_optimizer`: a plain optimizer's or a `fully_reshardable`
    distributed optimizer's into any layout, a `dp_reshardable` one only with the same TP / PP
    (ValueError otherwise). A fully_reshardable load materialises, on every rank, the whole
    optimizer state of its TP / PP shard in CPU memory (Megatron's loader; about 12 bytes per
    parameter / (TP * PP) with fp32 Adam) before keeping its DP slice. RNG states are restored when
    the layout is unchanged (`load_rng=None`: automatically; True: required).
    """
    from megatron.core import dist_checkpointing

    path = path_or_root
    if not os.path.exists(os.path.join(path, _META)):
        path = latest_checkpoint(path_or_root)
        if path is None:
            raise FileNotFoundError(f"no checkpoint at {path_or_root!r} (no {_META} and no '{_LATEST}')")
    meta = read_meta(path)
    layout, saved = _layout(), meta["layout"]
    same_layout = all(layout[k] == saved[k] for k in ("tp", "pp", "dp"))
    if load_rng is None:
        load_rng = meta.get("has_rng", False) and same_layout
    elif load_rng and not same_layout:
        raise ValueError(f"RNG state of {path} was saved with layout {saved}, current is {layout}")

    sd = _model_sharded_state_dict(model_chunks)
    want_opt = optimizer is not None and load_optimizer
    if want_opt:
        if not meta.get("has_optimizer"):
            raise ValueError(f"{path} has no optimizer state")
        fmt = meta.get("optimizer_format", DISTRIB_OPTIM_FORMAT)
        if bool(meta.get("distributed_optimizer")) != _is_distributed(optimizer):
            raise ValueError(f"{path}: optimizer state saved with distributed_optimizer="
                             f"{bool(meta.get('distributed_optimizer'))} cannot load into one with "
                             f"distributed_optimizer={_is_distributed(optimizer)}; pass load_optimizer=False")
        if fmt == "dp_reshardable" and (layout["tp"], layout["pp"]) != (saved["tp"], saved["pp"]):
            raise ValueError(f"{path}: distributed-optimizer state in the {fmt} format saved at "
                             f"TP{saved['tp']}/PP{saved['pp']} cannot load into TP{layout['tp']}/PP{layout['pp']}; "
                             "pass load_optimizer=False")
        _ensure_optimizer_state(optimizer)
        sd["optimizer"] = optimizer.sharded_state_dict(
            sd, is_loading=True, metadata=_optimizer_metadata(fmt if fmt in OPTIM_FORMATS else DISTRIB_OPTIM_FORMAT))
    if load_rng:
        sd["rng_state"] = _rng_sharded(_rng_state())
    checkpoint_trust.verify_digests(path)  # before anything is unpickled or copied
    with checkpoint_trust.restricted_unpickling():
        loaded = dist_checkpointing.load(sharded_state_dict=sd, checkpoint_dir=path)

    chunks = _unwrapped(model_chunks)
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for chunk, key in zip(chunks, keys):
        chunk.load_state_dict(loaded[key], strict=strict)
    if want_opt:
        if not _is_distributed(optimizer):
            _fill_zero_common_step(loaded["optimizer"])
        # no_grad: with fp32 params the distributed optimizer's main params are views of the
        # (requires_grad) model params, and its loader copies into them in place.
        with torch.no_grad(), _adam_step_passthrough(optimizer):
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer)
    elif optimizer is not None:
        optimizer.reload_model_params()  # refresh fp32 main params from the loaded weights
    if load_rng:
        _set_rng_state(loaded["rng_state"])
    _barrier()
    return int(meta["step"])
