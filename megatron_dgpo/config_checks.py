"""Value checks of a training configuration, run when it is loaded (TrainConfig.__post_init__),
before anything is built: every float finite, every count in its range, the parallel layout
consistent with the model and the world size. Each failure names the dotted key and the value
(shortened: messages never embed unbounded input).

The per-class checks in the dataclasses' own `__post_init__` stay where they are; this table adds
what they did not cover, in one place.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

from megatron_dgpo.configio import short


def _int(lo: int, hi: Optional[int] = None) -> Callable[[Any], Optional[str]]:
    def check(v):
        if v < lo or (hi is not None and v > hi):
            return f"must be an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "")
    return check


def _float(lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False):
    def check(v):
        if v is None:
            return None
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ok:
            return f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    return check


def _top_k(v):
    if v != -1 and v < 1:
        return "must be -1 (off) or >= 1"


# dotted key -> check returning an error text or None. Floats are also checked for finiteness
# generically (every float field of every config dataclass), so NaN never slips through a `<`.
RULES: dict[str, Callable[[Any], Optional[str]]] = {
    "optim.lr": _float(0.0),
    "optim.weight_decay": _float(0.0),
    "optim.clip_grad": _float(0.0),
    "optim.adam_beta1": _float(0.0, 1.0, hi_open=True),
    "optim.adam_beta2": _float(0.0, 1.0, hi_open=True),
    "optim.adam_eps": _float(0.0, lo_open=True),
    "algo.steps": _int(0),
    "algo.prompts_per_step": _int(1),
    "algo.mini_batches": _int(1),
    "algo.epochs": _int(1),
    "algo.micro_batch_size": _int(1),
    "algo.tis_cap": _float(0.0, lo_open=True),
    "algo.max_skipped_steps": _int(1),
    "algo.max_steps_without_variance": _int(0),
    "rollout.group_size": _int(2),
    "rollout.temperature": _float(0.0, lo_open=True),
    "rollout.top_p": _float(0.0, 1.0, lo_open=True),
    "rollout.top_k": _top_k,
    "rollout.max_new_tokens": _int(1),
    "rollout.weight_sync_bucket_mb": _int(1),
    "rollout.sglang.tp_size": _int(1),
    "rollout.sglang.mem_fraction_static": _float(0.0, 1.0, lo_open=True, hi_open=True),
    "rollout.sglang.nccl_master_port": _int(1, 65535),
    "eval.every": _int(0),
    "eval.num_prompts": _int(1),
    "eval.samples_per_prompt": _int(1),
    "eval.temperature": _float(0.0),
    "warmstart.sft_steps": _int(0),
    "warmstart.sft_lr": _float(0.0, lo_open=True),
    "warmstart.sft_batch_size": _int(1),
    "reward.num_workers": _int(1),
    # wait() and deadlines overflow beyond this; a day per answer is no limit in practice
    "reward.timeout_s": _float(0.0, 86400.0, lo_open=True),
    "save_every": _int(0),
    "parallel.tensor_model_parallel_size": _int(1),
    "parallel.pipeline_model_parallel_size": _int(1),
    "model.make_vocab_size_divisible_by": _int(1),
    "model.rope_theta": _float(0.0, lo_open=True),
    "model.rms_norm_eps": _float(0.0, lo_open=True),
    "data.train.max_prompt_length": _int(1),
    "data.train.limit": lambda v: None if v is None or v >= 1 else "must be >= 1 or null",
    "data.eval.max_prompt_length": _int(1),
}


def _leaves(obj, prefix=""):
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            yield from _leaves(v, key + ".")
        else:
            yield key, v


def _check_leaf(key: str, value) -> Optional[str]:
    if isinstance(value, float) and not math.isfinite(value):
        return "must be finite"
    rule = RULES.get(key)
    if rule is None or value is None:
        return None
    return rule(value)


def check_train_config(cfg) -> None:
    """ValueError naming the first bad key of a TrainConfig (values, then cross-field rules)."""
    for key, value in _leaves(cfg):
        err = _check_leaf(key, value)
        if err:
            raise ValueError(f"{key}={short(value)}: {err}")
    a, r, m, p = cfg.algo, cfg.rollout, cfg.model, cfg.parallel
    rows = a.prompts_per_step * r.group_size
    if a.mini_batches > rows:
        raise ValueError(f"algo.mini_batches={a.mini_batches} exceeds the {rows} sequences of a step "
                         f"(algo.prompts_per_step x rollout.group_size)")
    if cfg.eval.samples_per_prompt > 1 and cfg.eval.temperature == 0:
        raise ValueError("eval.samples_per_prompt > 1 needs eval.temperature > 0 (greedy samples are identical)")
    check_model_layout(m, p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                       p.num_layers_in_first_pipeline_stage, p.num_layers_in_last_pipeline_stage)


_PARALLEL_KEYS = dict(tp="parallel.tensor_model_parallel_size", pp="parallel.pipeline_model_parallel_size",
                     first="parallel.num_layers_in_first_pipeline_stage",
                     last="parallel.num_layers_in_last_pipeline_stage", vpp="virtual_pipeline_model_parallel_size")


def check_model_layout(model, tp: int, pp: int, first: Optional[int] = None, last: Optional[int] = None,
                       vpp: Optional[int] = None, keys: Optional[dict] = None) -> None:
    """What Megatron-Core accepts, as one ValueError naming the keys (`keys`: names of tp, pp, first,
    last, vpp for the message, default the TrainConfig's dotted keys):

    TP divides the attention heads, and TP divides the KV heads or is a multiple of them (fewer KV
    heads than TP: Megatron-Core gives each rank a copy of its group's k/v); the layers split over
    PP stages as `pipeline_stage_layers` says.
    """
    k = dict(_PARALLEL_KEYS, **(keys or {}))
    ng = model.num_query_groups
    if model.num_attention_heads % tp or (ng % tp and tp % ng):
        raise ValueError(f"{k['tp']}={tp} must divide model.num_attention_heads={model.num_attention_heads}, and "
                         f"divide or be a multiple of model.num_query_groups={ng}")
    pipeline_stage_layers(model.num_layers, pp, first, last, vpp, keys=k)


def pipeline_stage_layers(num_layers: int, pp: int, first: Optional[int] = None, last: Optional[int] = None,
                          vpp: Optional[int] = None, keys: Optional[dict] = None) -> list:
    """Decoder layers per pipeline stage, by Megatron-Core's rule (TransformerConfig.__post_init__):
    the first / last stage hold `first` / `last` layers when given, the other stages an equal share."""
    k = dict(_PARALLEL_KEYS, **(keys or {}))
    if first is None and last is None:
        if num_layers % pp:
            raise ValueError(f"{k['pp']}={pp} must divide model.num_layers={num_layers}, or set {k['first']} / "
                             f"{k['last']} (uneven stages)")
        counts = [num_layers // pp] * pp
    else:
        if pp < 2:
            raise ValueError(f"{k['first']} / {k['last']} need {k['pp']} >= 2")
        for key, v in ((k["first"], first), (k["last"], last)):
            if v is not None and v < 1:
                raise ValueError(f"{key}={v} must be >= 1")
        fixed = [x for x in (first, last) if x is not None]
        middle, rest = pp - len(fixed), num_layers - sum(fixed)
        if rest < 0 or bool(middle) != bool(rest) or (middle and rest % middle):
            raise ValueError(f"model.num_layers={num_layers} with {k['first']}={first}, {k['last']}={last} leaves "
                             f"{rest} layers for {middle} other stage(s) of {k['pp']}={pp}: they must split evenly, "
                             f"at least one layer each")
        share = rest // middle if middle else 0
        counts = [share] * pp
        if first is not None:
            counts[0] = first
        if last is not None:
            counts[-1] = last
    if vpp and vpp > 1 and any(c % vpp for c in counts):
        raise ValueError(f"{k['vpp']}={vpp} must divide the layers of every pipeline stage ({counts})")
    return counts


def check_world_size(cfg, world_size: int) -> None:
    """TP x PP must divide the number of processes (the rest is data parallelism)."""
    mp = cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size
    if world_size % mp:
        raise ValueError(f"tensor_model_parallel_size x pipeline_model_parallel_size = {mp} does not divide "
                         f"the {world_size} processes of the job")
