"""Load a HF safetensors folder into a Megatron model of any TP/PP layout.

Each rank reads only the slices of the HF tensors that its own parameters need (safetensors
`get_slice`, memory-mapped), so no rank materialises the whole model.
"""
from __future__ import annotations

import math
import os
import re

import torch

from megatron_dgpo.model.config import ModelConfig
from megatron_dgpo.weight_sync.hf_io import CheckpointError, HFCheckpoint
from megatron_dgpo.weight_sync.layouts import (
    TIED_OUTPUT, get_layout, hf_shapes, hf_tensor_names, iter_rule_instances, megatron_matcher,
)
from megatron_dgpo.weight_sync.stream import _unwrap, WeightSyncError
from megatron_dgpo.weight_sync.transforms import megatron_shard_from_hf

# HF tensors that carry no weights (old checkpoints stored rotary buffers).
_IGNORED_HF = re.compile(r".*rotary_emb\.inv_freq\Z")

# Every ModelConfig field (or property) that changes the math (features ModelConfig cannot express,
# e.g. yarn rope scaling or sliding windows, are refused by HFCheckpoint.model_config).
_CONFIG_FIELDS = ("arch", "vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_query_groups",
                  "ffn_hidden_size", "qkv_bias", "tie_word_embeddings", "max_position_embeddings",
                  "rope_theta", "rms_norm_eps", "head_dim", "rope_scaling")


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _checked_reader(ckpt: HFCheckpoint):
    """ckpt.read that refuses integer / boolean tensors and NaN or infinite values, naming the tensor."""
    def read(name, dim=None, start=0, stop=0):
        t = ckpt.read(name, dim, start, stop)
        if not t.is_floating_point():
            raise CheckpointError(f"tensor {name!r} in {ckpt.folder} has dtype {t.dtype}: weights must be floating point")
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"tensor {name!r} in {ckpt.folder} holds NaN or infinite values")
        return t
    return read


def _tp_info() -> tuple[int, int]:
    try:
        from megatron.core import parallel_state as ps
        if ps.model_parallel_is_initialized():
            return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    except ImportError:  # pragma: no cover
        pass
    return 1, 0


def check_hf_tensors(ckpt: HFCheckpoint, cfg: ModelConfig, *, strict: bool = True) -> None:
    """Every tensor the layout needs is present with the right shape; with strict, nothing else is."""
    need = {}
    for layer, rule in iter_rule_instances(cfg):
        for name, shape in zip(rule.hf_names(layer), hf_shapes(cfg, rule)):
            need[name] = shape
    have = set(ckpt.names())
    missing = [n for n in need if n not in have]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"tensor {missing[0]!r} is missing from the checkpoint {ckpt.folder}{more}")
    for name, shape in need.items():
        got = ckpt.shape(name)
        if got != tuple(shape):
            raise CheckpointError(f"tensor {name!r} in {ckpt.folder} has shape {list(got)}, "
                                  f"the config implies {list(shape)}")
    if strict:
        extra = sorted(n for n in have - set(need) if not _IGNORED_HF.match(n)
                       and not (cfg.tie_word_embeddings and n == "lm_head.weight"))
        if extra:
            raise CheckpointError(f"tensor {extra[0]!r} in {ckpt.folder} is not used by the {cfg.arch} layout "
                                  f"({len(extra)} unused; pass strict=False to ignore)")


def load_hf_into_megatron(model, hf_dir: str | os.PathLike | HFCheckpoint, model_cfg: ModelConfig | None = None,
                          *, strict: bool = True) -> ModelConfig:
    """Copy the HF checkpoint's weights into `model` (GPTModel or list of chunks), in place.

    Returns the ModelConfig read from config.json. If `model_cfg` is given it must agree with it.
    Raises CheckpointError / WeightSyncError naming the offending file, tensor or parameter.
    """
    ckpt = hf_dir if isinstance(hf_dir, HFCheckpoint) else HFCheckpoint(hf_dir)
    try:
        cfg = ckpt.model_config()
        if model_cfg is not None:
            for f in _CONFIG_FIELDS:
                if not _same(getattr(model_cfg, f), getattr(cfg, f)):
                    raise CheckpointError(f"{ckpt.folder / 'config.json'}: {f}={getattr(cfg, f)!r} but the model "
                                          f"was built with {f}={getattr(model_cfg, f)!r}")
            cfg = model_cfg
        check_hf_tensors(ckpt, cfg, strict=strict)
        rules = get_layout(cfg)
        matcher = megatron_matcher(rules)
        tp, tp_rank = _tp_info()
        chunks = model if isinstance(model, (list, tuple)) else [model]

        read = _checked_reader(ckpt)

        vocab_rule = next(r for r in rules if r.rule == "vocab")
        for chunk in chunks:
            chunk = _unwrap(chunk)
            layers = getattr(getattr(chunk, "decoder", None), "layers", None)
            for pname, p in chunk.named_parameters():
                m = matcher.match(pname)
                if m is None:
                    if cfg.tie_word_embeddings and pname == TIED_OUTPUT[0]:
                        rule, layer = vocab_rule, None  # last stage's copy of the tied embedding
                    else:
                        raise WeightSyncError(
                            f"Megatron parameter {pname!r} has no rule in the {cfg.arch} layout table")
                else:
                    rule, local = m
                    layer = None if local is None else (
                        int(layers[local].layer_number) - 1 if layers is not None else local)
                shard = megatron_shard_from_hf(rule, layer, cfg, tp, tp_rank, read)
                if tuple(shard.shape) != tuple(p.shape):
                    raise WeightSyncError(
                        f"Megatron parameter {pname!r} has shape {list(p.shape)} but HF "
                        f"{list(rule.hf_names(layer))} give {list(shard.shape)} at TP={tp} (rank {tp_rank})")
                with torch.no_grad():
                    p.copy_(shard)
        return cfg
    finally:
        if not isinstance(hf_dir, HFCheckpoint):
            ckpt.close()


def megatron_state_from_hf(hf_dir: str | os.PathLike, tp: int = 1, tp_rank: int = 0) -> dict[str, torch.Tensor]:
    """{megatron name (global layer index): TP shard} straight from a HF folder (no model needed)."""
    with HFCheckpoint(hf_dir) as ckpt:
        cfg = ckpt.model_config()
        check_hf_tensors(ckpt, cfg)
        out = {}
        for layer, rule in iter_rule_instances(cfg):
            out[rule.megatron.format(i=layer)] = megatron_shard_from_hf(rule, layer, cfg, tp, tp_rank,
                                                                        _checked_reader(ckpt))
        return out


__all__ = ["load_hf_into_megatron", "check_hf_tensors", "megatron_state_from_hf", "hf_tensor_names"]
