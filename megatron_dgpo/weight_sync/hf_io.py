"""Hugging Face checkpoint folders: lazy sliced reads and atomic writes (safetensors only).

Reading never unpickles anything: only ``*.safetensors`` (single file or sharded with
``model.safetensors.index.json``) and ``config.json`` are read; a folder with only ``*.bin`` /
``*.pt`` weights is rejected. Writing goes to a temporary sibling folder that is renamed into
place when complete, so a reader never sees a half-written folder that looks like a checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_dgpo.model.config import ModelConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class CheckpointError(ValueError):
    """A HF folder is not a usable checkpoint (the message names the file or tensor)."""


class HFCheckpoint:
    """Read-only view of a HF safetensors checkpoint folder; tensors are opened lazily.

    `read(name, dim, start, stop)` returns only the slice [start, stop) along `dim` (all of it
    when dim is None), through safetensors' memory-mapped `get_slice`, so a TP rank reads only
    its shard.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: not a directory")
        cfg_path = self.folder / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{self.folder}: no config.json, not a HF checkpoint folder")
        try:
            self.hf_config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
        self.weight_map: dict[str, str] = self._index()
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}

    def _index(self) -> dict[str, str]:
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            for f in set(wm.values()):
                if not (self.folder / f).is_file():
                    raise CheckpointError(f"{index} names {f}, which does not exist in {self.folder}")
            return dict(wm)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            other = sorted(p.name for p in self.folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
            if other:
                raise CheckpointError(f"{self.folder}: weights only in {other}; only safetensors are "
                                      "accepted (no pickle): convert them to safetensors first")
            raise CheckpointError(f"{self.folder}: no *.safetensors weights found")
        wm = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    wm[k] = f.name
        return wm

    def model_config(self) -> ModelConfig:
        """ModelConfig of config.json; features the Megatron model would silently ignore are rejected."""
        where = self.folder / "config.json"
        hf = self.hf_config
        unsupported = []
        rope = hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else rope
        if rope_type not in (None, "default", "llama3"):
            unsupported.append(f"rope_scaling={rope!r}")
        params = hf.get("rope_parameters") or {}
        if isinstance(params, dict) and params.get("rope_type", "default") not in ("default", "llama3"):
            unsupported.append(f"rope_parameters={params!r}")
        if hf.get("hidden_act", "silu") != "silu":
            unsupported.append(f"hidden_act={hf.get('hidden_act')!r}")
        if hf.get("mlp_bias"):
            unsupported.append("mlp_bias=true")
        if hf.get("use_sliding_window"):
            unsupported.append("use_sliding_window=true")
        if unsupported:
            raise CheckpointError(f"{where}: unsupported by the Megatron model: {', '.join(unsupported)}")
        try:
            return ModelConfig.from_hf_config(hf)
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{where}: {e}") from None

    def _handle(self, name: str):
        if name not in self.weight_map:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint {self.folder}")
        f = self.weight_map[name]
        if f not in self._handles:
            self._handles[f] = self._stack.enter_context(safe_open(str(self.folder / f), framework="pt"))
        return self._handles[f]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        sl = self._handle(name).get_slice(name)
        if dim is None:
            return sl[:]
        idx = [slice(None)] * len(sl.get_shape())
        idx[dim] = slice(start, stop)
        return sl[tuple(idx)]

    def names(self) -> list[str]:
        return list(self.weight_map)

    def close(self):
        self._stack.close()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_hf_folder(out_dir: str | os.PathLike, named_tensors: Iterable[tuple[str, torch.Tensor]], *,
                    model_cfg: ModelConfig | None = None, source_dir: str | os.PathLike | None = None,
                    max_shard_bytes: int = 2 << 30, overwrite: bool = False) -> Path:
    """Write (name, tensor) pairs as a HF safetensors folder, atomically.

    Non-weight files of `source_dir` (config.json, generation_config.json, tokenizer files, chat
    template, ...) are copied; without a source config.json one is written from `model_cfg`.
    Weights are held in memory only up to `max_shard_bytes` before a shard is flushed. The folder
    appears at `out_dir` only when complete (temp sibling + rename); an existing `out_dir` is
    replaced only with `overwrite=True`.
    """
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        shard: dict[str, torch.Tensor] = {}
        shard_bytes = 0
        files: list[tuple[str, list[str]]] = []
        total = 0
        dtype = None

        def flush():
            nonlocal shard, shard_bytes
            if not shard:
                return
            name = f"part-{len(files):05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            files.append((name, list(shard)))
            shard, shard_bytes = {}, 0

        seen = set()
        for name, t in named_tensors:
            if name in seen:
                raise ValueError(f"tensor {name!r} written twice")
            seen.add(name)
            nbytes = t.numel() * t.element_size()
            if shard and shard_bytes + nbytes > max_shard_bytes:
                flush()
            # Own copy: the streamed tensor is a view of a bucket buffer shared with its neighbours.
            shard[name] = t.detach().to("cpu", copy=True).contiguous()
            shard_bytes += nbytes
            total += nbytes
            dtype = dtype or t.dtype
        flush()
        if not files:
            raise ValueError("no tensors to write")
        weight_map = {}
        if len(files) == 1:
            os.rename(tmp / files[0][0], tmp / SINGLE_NAME)
            _fsync(tmp / SINGLE_NAME)
        else:
            n = len(files)
            for i, (f, names) in enumerate(files):
                final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                os.rename(tmp / f, tmp / final)
                _fsync(tmp / final)
                weight_map.update({k: final for k in names})
            (tmp / INDEX_NAME).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        _copy_side_files(source_dir, tmp, model_cfg, dtype)
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        return out
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _copy_side_files(source_dir, tmp: Path, model_cfg: ModelConfig | None, dtype):
    src = Path(source_dir) if source_dir is not None else None
    if src is not None:
        for p in src.iterdir():
            if p.is_file() and p.suffix not in _WEIGHT_SUFFIXES and p.name != INDEX_NAME:
                shutil.copy2(p, tmp / p.name)
    cfg_path = tmp / "config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
    elif model_cfg is not None:
        cfg = model_cfg.to_hf_config()
    else:
        raise ValueError("write_hf_folder needs source_dir with a config.json or model_cfg")
    if dtype in _DTYPE_NAMES:
        for key in ("torch_dtype", "dtype"):
            if key in cfg or key == "torch_dtype":
                cfg[key] = _DTYPE_NAMES[dtype]
    cfg_path.write_text(json.dumps(cfg, indent=2))
