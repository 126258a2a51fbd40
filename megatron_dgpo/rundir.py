"""The output folder of a run: one run at a time, never overwritten by accident.

`open_run_dir` (collective, before any model is built) decides on rank 0 and tells every rank:
- a lock (`<output_dir>/.lock`, `fcntl.flock`, held by rank 0 until `close()` or process exit)
  keeps a second run off the same folder;
- a fresh run into a folder that already holds checkpoints or metrics refuses to start unless
  `overwrite` (`--overwrite`), which removes the old checkpoints first;
- `resume` continues from `checkpoint.resume_checkpoint` (a broken `latest` falls back to the
  newest complete checkpoint, said in the note); a folder with metrics but no checkpoint, or with
  only incomplete checkpoints, is an error rather than a silent restart from step 0.
Errors are `RunDirError` (a ConfigError: the entry point prints one line and exits 2).
"""
from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from megatron_dgpo.configio import ConfigError

LOCK = ".lock"


class RunDirError(ConfigError):
    pass


@dataclass
class RunDir:
    resume_from: Optional[str]
    note: str
    _lock_fd: Optional[int] = None

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


def _lock(out: Path) -> int:
    import fcntl

    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
        os.close(fd)
        raise RunDirError(f"output_dir {out} is in use by another run (lock {out / LOCK} held"
                          + (f" by {holder}" if holder else "") + ")") from None
    except OSError as e:  # a file system without flock (some NFS mounts): say so, keep going
        print(f"warning: cannot lock {out / LOCK} ({e}); make sure no other run uses {out}", flush=True)
        return fd
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd


def _has_run(out: Path, ckpt_root: Path) -> list[str]:
    found = []
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    if ckpt_root.is_dir() and any(e == "latest" or e.startswith("step_") for e in os.listdir(ckpt_root)):
        found.append("checkpoints")
    return found


def _decide(out: Path, ckpt_root: Path, resume: bool, overwrite: bool) -> tuple[Optional[str], str]:
    from megatron_dgpo import checkpoint

    existing = _has_run(out, ckpt_root)
    if resume:
        try:
            path, note = checkpoint.resume_checkpoint(str(ckpt_root))
        except checkpoint.CheckpointError as e:
            raise RunDirError(str(e)) from None
        if path is None and existing:
            raise RunDirError(f"--resume: {out} holds {' and '.join(existing)} but no checkpoint to resume "
                              "from; start again with --overwrite (without --resume)")
        return path, note or ("" if path else f"--resume: nothing to resume in {out}; starting at step 0")
    if existing and not overwrite:
        raise RunDirError(f"output_dir {out} already holds a run ({' and '.join(existing)}): pass --resume "
                          "to continue it or --overwrite to replace it")
    if existing:
        shutil.rmtree(ckpt_root, ignore_errors=True)
        shutil.rmtree(out / "tb", ignore_errors=True)  # its TensorBoard events would mix with ours
        return None, f"--overwrite: removed the checkpoints and TensorBoard events of the earlier run in {out}"
    return None, ""


def open_run_dir(out_dir: str, *, resume: bool, overwrite: bool) -> RunDir:
    """Collective over the default group when it is initialised; see the module docstring."""
    out = Path(out_dir)
    ckpt_root = out / "checkpoints"
    rank = dist.get_rank() if dist.is_initialized() else 0
    msg: list = [None, "", None]  # resume_from, note, error
    fd = None
    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            fd = _lock(out)
            msg[0], msg[1] = _decide(out, ckpt_root, resume, overwrite)
        except (RunDirError, OSError) as e:
            msg[2] = str(e)[:500]
            if fd is not None:
                os.close(fd)
                fd = None
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(msg, src=0)
    if msg[2] is not None:
        raise RunDirError(msg[2])
    return RunDir(resume_from=msg[0], note=msg[1], _lock_fd=fd)
