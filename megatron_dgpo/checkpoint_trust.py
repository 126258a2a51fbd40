"""Loading a checkpoint from elsewhere executes nothing, and a damaged one is refused.

Unpickling. Megatron's dist_checkpointing (torch DCP underneath) reads three pickled things:
`common.pt` (torch.load, `weights_only=True` by default since torch 2.6: already refused when
malicious), DCP's `.metadata` (plain `pickle.load`) and the byte items of ShardedObjects, e.g. our
RNG states (`torch.load(weights_only=False)`). Inside `restricted_unpickling()` the last two go
through allow-lists: `.metadata` may only reference the DCP metadata classes below (dataclasses and
enums with no side effects), byte items load with `weights_only=True` plus the numpy types of an
RNG state. Anything else raises `UntrustedCheckpointError` naming the class.

Integrity. `write_digests` stores a SHA-256 of every file of a checkpoint in `dgpo_digests.json`
(computed in parallel: rank r hashes files r, r + world, ...); `verify_digests` checks them before
a load (same split) and raises `CheckpointIntegrityError` naming the first bad file. Checkpoints
written before this existed have no manifest and load with a warning.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
from typing import Optional

import torch
import torch.distributed as dist

DIGESTS = "dgpo_digests.json"
_CHUNK = 8 << 20


class UntrustedCheckpointError(RuntimeError):
    """A pickle in the checkpoint references something outside the allow-list."""


class CheckpointIntegrityError(RuntimeError):
    """A checkpoint file is missing, has the wrong size or the wrong digest."""


# ----------------------------------------------------------------------------- unpickling
_DCP = "torch.distributed.checkpoint."
_ALLOWED = {
    (_DCP + "metadata", n) for n in ("Metadata", "TensorStorageMetadata", "ChunkStorageMetadata",
                                     "TensorProperties", "BytesStorageMetadata", "MetadataIndex",
                                     "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    (_DCP + "planner", n) for n in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData",
                                    "ReadItem", "LoadItemType", "LoadPlan")
} | {
    (_DCP + "filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        raise _refuse(f"checkpoint metadata (.metadata) references {module[:80]}.{name[:80]}, which is not among "
                      "the classes torch distributed-checkpoint metadata needs: refusing to unpickle it")


_REFUSED: list[str] = []  # refusals inside the current restricted_unpickling() (DCP wraps errors)


def _refuse(msg: str) -> UntrustedCheckpointError:
    _REFUSED.append(msg)
    return UntrustedCheckpointError(msg)


class _RestrictedPickle:
    """Stands in for the `pickle` module inside torch.distributed.checkpoint.filesystem while a
    checkpoint is read: `load` is restricted, everything else (dump on a concurrent save) is pickle's."""

    @staticmethod
    def load(f, **_):
        return _MetadataUnpickler(f).load()

    @staticmethod
    def loads(data, **_):
        return _MetadataUnpickler(io.BytesIO(data)).load()

    def __getattr__(self, name):
        return getattr(pickle, name)


def _rng_safe_globals() -> list:
    import numpy as np

    out = [np.ndarray, np.dtype]
    for mod, name in (("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")):
        try:
            out.append(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in ("UInt32DType", "Float64DType", "Int64DType") if hasattr(dtypes, n)]
    return out


def _safe_torch_load(value):
    try:
        with torch.serialization.safe_globals(_rng_safe_globals()):
            return torch.load(value, weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refuse("a checkpoint object (ShardedObject bytes) failed the weights_only check: "
                      f"{str(e)[:300]}") from None


def _safe_load_bytes(self, read_item, value) -> None:
    """DefaultLoadPlanner.load_bytes with weights_only=True (upstream: weights_only=False)."""
    from torch.distributed.checkpoint import default_planner

    obj = _safe_torch_load(value)
    if self.flatten_state_dict:
        default_planner.set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
    else:
        self.state_dict[read_item.dest_index.fqn] = obj


@contextlib.contextmanager
def restricted_unpickling():
    """Checkpoint reads inside use the allow-lists; a refusal surfaces as UntrustedCheckpointError
    even where DCP wraps it in its own exception."""
    from torch.distributed.checkpoint import default_planner, filesystem

    saved_pickle = filesystem.pickle
    saved_load_bytes = default_planner.DefaultLoadPlanner.load_bytes
    filesystem.pickle = _RestrictedPickle()
    default_planner.DefaultLoadPlanner.load_bytes = _safe_load_bytes
    _REFUSED.clear()
    try:
        yield
    except BaseException:  # DCP's CheckpointException derives from BaseException
        if _REFUSED:
            raise UntrustedCheckpointError(_REFUSED[0]) from None
        raise
    finally:
        filesystem.pickle = saved_pickle
        default_planner.DefaultLoadPlanner.load_bytes = saved_load_bytes


# ----------------------------------------------------------------------------- digests
def _files(path: str) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(path):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), path)
            if rel != DIGESTS:
                out.append(rel)
    return sorted(out)


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _share(items: list, rank: int, world: int) -> list:
    return items[rank::world]


def _gather(obj) -> list:
    rank, world = _world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def write_digests(path: str) -> None:
    """Collective: hash every file of `path` (the files rank 0 sees), rank 0 writes the manifest."""
    rank, world = _world()
    names = [_files(path) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(names, src=0)
    mine = {n: {"sha256": file_digest(os.path.join(path, n)), "size": os.path.getsize(os.path.join(path, n))}
            for n in _share(names[0], rank, world)}
    allparts = _gather(mine)
    if rank == 0:
        files = {}
        for part in allparts:
            files.update(part)
        with open(os.path.join(path, DIGESTS), "w") as f:
            json.dump({"algorithm": "sha256", "files": dict(sorted(files.items()))}, f, indent=0)


def verify_digests(path: str, warn=print) -> Optional[int]:
    """Collective: raise CheckpointIntegrityError (every rank) when a listed file is missing or
    differs, or a file is not listed; returns the number of files checked (None: no manifest)."""
    rank, world = _world()
    manifest = os.path.join(path, DIGESTS)
    if not os.path.isfile(manifest):
        if rank == 0:
            warn(f"warning: {path} has no {DIGESTS} (written before digests existed): not verified")
        return None
    try:
        with open(manifest) as f:
            files = json.load(f)["files"]
        assert isinstance(files, dict)
    except (ValueError, KeyError, AssertionError) as e:
        raise CheckpointIntegrityError(f"{manifest}: unreadable manifest ({str(e)[:200]})") from None
    errors = []
    names = sorted(files)
    for n in _share(names, rank, world):
        full = os.path.normpath(os.path.join(path, n))
        if not full.startswith(os.path.normpath(path) + os.sep) or not os.path.isfile(full):
            errors.append(f"{n}: missing")
        elif os.path.getsize(full) != files[n].get("size"):
            errors.append(f"{n}: size {os.path.getsize(full)} != {files[n].get('size')} when saved")
        elif file_digest(full) != files[n].get("sha256"):
            errors.append(f"{n}: content differs from its SHA-256 at save time")
    if rank == 0:
        extra = sorted(set(_files(path)) - set(names))
        errors += [f"{n}: not in the manifest" for n in extra[:5]]
    errors = [e for part in _gather(errors) for e in part]
    if errors:
        raise CheckpointIntegrityError(f"checkpoint {path} is damaged: {errors[0]}"
                                       + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
    return len(names)
