"""Build Megatron-Core GPTModels for the Qwen2 / Qwen3 (dense) / Llama family from a `ModelConfig`.

Architecture mapping (HF -> Megatron): RMSNorm (eps rms_norm_eps), SwiGLU MLP
(`gated_linear_unit=True`, silu; fc1 = [gate; up]), RoPE (non-interleaved, base rope_theta),
GQA (`num_query_groups`), q/k/v bias only (`add_qkv_bias`, all other linears bias-free),
tied embeddings -> `share_embeddings_and_output_weights`, Qwen3's per-head q/k RMSNorm ->
`qk_layernorm` with `kv_channels` = head_dim, Llama 3.x rope scaling -> Megatron's `rope_scaling`
(see `_apply_llama3_rope_scaling`), no dropout, vocab padded to
`model_cfg.padded_vocab_size(tp)` (the padding rows are real parameters; the train step masks
their logits).

`transformer_impl="local"` uses Megatron's local spec with `compat.TorchNorm` norms (Apex-free,
sequence-parallel capable); `"transformer_engine"` uses the TE spec (needed for FP8).
`attention_backend="sdpa"` swaps the local spec's core attention for `model.attention.SDPAttention`.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
from typing import List, Optional, Union

import torch
import torch.nn.functional as F

from megatron_dgpo.compat.cpu import TorchNorm
from megatron_dgpo.model.config import ModelConfig
from megatron_dgpo.model.fp8 import TE_INSTALL_HINT, FP8Config

__all__ = ["transformer_config", "layer_spec", "build_gpt_model", "build_model_chunks",
           "unwrap_model", "TRANSFORMER_IMPLS"]

TRANSFORMER_IMPLS = ("local", "transformer_engine")
# Core attention: Megatron's unfused local DotProductAttention, the project's SDPA module
# (model/attention.py, local spec), or Transformer Engine's (TE spec).
ATTENTION_BACKENDS = ("local", "sdpa", "te")


def resolve_attention_backend(transformer_impl: str, attention_backend: Optional[str]) -> str:
    """`None`/"auto": te with the TE spec, local otherwise; checks the pair is consistent."""
    if attention_backend in (None, "auto"):
        return "te" if transformer_impl == "transformer_engine" else "local"
    if attention_backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend={attention_backend!r}: expected one of {ATTENTION_BACKENDS} or 'auto'")
    if (attention_backend == "te") != (transformer_impl == "transformer_engine"):
        raise ValueError(f"attention_backend={attention_backend!r} needs transformer_impl="
                         f"{'transformer_engine' if attention_backend == 'te' else 'local'!r}, "
                         f"got {transformer_impl!r}")
    return attention_backend


def _ps():
    from megatron.core import parallel_state
    return parallel_state


def _mp_sizes():
    ps = _ps()
    if ps.model_parallel_is_initialized():
        return (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                ps.get_virtual_pipeline_model_parallel_world_size())
    return 1, 1, None


def transformer_config(model_cfg: ModelConfig, *, params_dtype: torch.dtype = torch.float32,
                       sequence_parallel: bool = False, fp8=None,
                       num_layers_in_first_pipeline_stage: Optional[int] = None,
                       num_layers_in_last_pipeline_stage: Optional[int] = None, **overrides):
    """The Megatron TransformerConfig for `model_cfg` in the current parallel layout.

    TP/PP/VPP sizes are read from `megatron.core.parallel_state` (1 if not initialised).
    `num_layers_in_first/last_pipeline_stage`: Megatron's uneven pipeline split (the remaining
    layers are divided evenly over the middle stages); None: all stages equal.
    `fp8` is an FP8Config, a dict, a recipe name, or None. `overrides` are applied last
    (e.g. `recompute_granularity="full"`).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    tp, pp, vpp = _mp_sizes()
    fp8_cfg = FP8Config.coerce(fp8)
    on_cpu = not torch.cuda.is_available()
    kwargs = dict(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
        kv_channels=model_cfg.head_dim,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        sequence_parallel=bool(sequence_parallel) and tp > 1,
        normalization="RMSNorm",
        layernorm_epsilon=model_cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model_cfg.qkv_bias,
        qk_layernorm=model_cfg.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
        # Fused kernels need CUDA (and TE / Apex for some).
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=not on_cpu,
        masked_softmax_fusion=not on_cpu,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        use_cpu_initialization=on_cpu,
        # The train step normalises the loss itself (global token / sequence count); with this
        # flag the schedule does not divide by num_microbatches and DDP sums over DP instead of
        # averaging (see megatron_dgpo/train/step.py).
        calculate_per_token_loss=True,
        # gloo: batched isend/irecv between the same pair of ranks (PP=2: prev == next) can match
        # a forward activation with a backward gradient of the same shape (wrong losses in the
        # interleaved schedule, crashes with 4 ranks). Unbatched, ordered p2p is exact.
        batch_p2p_comm=not on_cpu,
        num_layers_in_first_pipeline_stage=num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=num_layers_in_last_pipeline_stage,
    )
    if fp8_cfg is not None:
        kwargs.update(fp8_cfg.transformer_config_kwargs())
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def layer_spec(config, transformer_impl: str = "local", vp_stage: Optional[int] = None,
               attention_backend: Optional[str] = None):
    """The transformer-layer (or block) spec for `transformer_impl` and `attention_backend`."""
    from megatron.core.models.gpt import gpt_layer_specs

    if transformer_impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"transformer_impl={transformer_impl!r}: expected one of {TRANSFORMER_IMPLS}")
    backend = resolve_attention_backend(transformer_impl, attention_backend)
    if transformer_impl == "transformer_engine":
        if importlib.util.find_spec("transformer_engine") is None:
            raise ImportError(
                "transformer_impl='transformer_engine' needs Transformer Engine, which is not "
                f"importable. Install it with: {TE_INSTALL_HINT}, or use transformer_impl='local'.")
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=None, moe_grouped_gemm=False, qk_layernorm=bool(config.qk_layernorm))

    from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                              get_num_layers_to_build)

    qk_norm = bool(config.qk_layernorm)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=None, moe_grouped_gemm=False, qk_layernorm=qk_norm, normalization="RMSNorm")
    spec = copy.copy(spec)
    spec.submodules = dataclasses.replace(
        spec.submodules, input_layernorm=TorchNorm, pre_mlp_layernorm=TorchNorm)
    attn = copy.copy(spec.submodules.self_attention)
    if qk_norm:  # Apex-free per-head RMSNorm (the local spec would pick Apex / WrappedTorchNorm)
        attn.submodules = dataclasses.replace(attn.submodules, q_layernorm=TorchNorm, k_layernorm=TorchNorm)
    if backend == "sdpa":
        from megatron_dgpo.model.attention import SDPAttention

        attn.submodules = dataclasses.replace(attn.submodules, core_attention=SDPAttention)
    spec.submodules = dataclasses.replace(spec.submodules, self_attention=attn)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * num_layers, layer_norm=TorchNorm)


def build_gpt_model(model_cfg: ModelConfig, *, pre_process: Optional[bool] = None,
                    post_process: Optional[bool] = None, transformer_impl: str = "local", fp8=None,
                    params_dtype: torch.dtype = torch.float32, sequence_parallel: bool = False,
                    vp_stage: Optional[int] = None, config=None, move_to_device: bool = True,
                    attention_backend: Optional[str] = None):
    """One GPTModel (chunk) for the current pipeline stage.

    pre_process / post_process default from the pipeline (and virtual pipeline) stage.
    `config` overrides the TransformerConfig built from `model_cfg`.
    """
    from megatron.core.models.gpt import GPTModel

    fp8_cfg = FP8Config.coerce(fp8)
    if fp8_cfg is not None:
        fp8_cfg.validate(transformer_impl=transformer_impl)
    if config is None:
        config = transformer_config(model_cfg, params_dtype=params_dtype,
                                    sequence_parallel=sequence_parallel, fp8=fp8_cfg)
    ps = _ps()
    tp = config.tensor_model_parallel_size
    if ps.model_parallel_is_initialized():
        if pre_process is None:
            pre_process = _is_first_stage(vp_stage)
        if post_process is None:
            post_process = _is_last_stage(vp_stage)
    pre_process = True if pre_process is None else pre_process
    post_process = True if post_process is None else post_process

    extra = {"vp_stage": vp_stage} if vp_stage is not None else {}
    if model_cfg.rope_scaling is not None:
        extra.update(rope_scaling=True, rope_scaling_factor=model_cfg.rope_scaling["factor"])
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(config, transformer_impl, vp_stage=vp_stage,
                                          attention_backend=attention_backend),
        vocab_size=model_cfg.padded_vocab_size(tp),
        max_sequence_length=model_cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=model_cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=model_cfg.rope_theta,
        **extra,
    )
    if model_cfg.rope_scaling is not None:
        _apply_llama3_rope_scaling(model, model_cfg)
    model.model_cfg = model_cfg  # handy for the train step / converters
    if move_to_device:
        from megatron_dgpo.distributed import device
        model.to(device())
    return model


def _apply_llama3_rope_scaling(model, model_cfg: ModelConfig) -> None:
    """Llama 3.x RoPE frequencies with all four HF parameters.

    Megatron-Core (0.16 to 0.20) exposes only `rope_scaling_factor` and hard-codes
    low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=8192 (Llama 3.1-3.3's
    values). Its `RotaryEmbedding._apply_scaling` takes all four, so the frequencies are recomputed
    from the unscaled ones with the config's values (identical to Megatron's for the defaults).
    Must run before the first forward (RotaryEmbedding.forward is lru-cached).
    """
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is None:
        return
    dim = model.config.kv_channels
    inv = rope.inv_freq
    base = 1.0 / (model_cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=inv.device) / dim))
    r = model_cfg.rope_scaling
    rope.inv_freq = rope._apply_scaling(base, factor=r["factor"], low_freq_factor=r["low_freq_factor"],
                                        high_freq_factor=r["high_freq_factor"],
                                        original_max_position_embeddings=r["original_max_position_embeddings"])


def _is_first_stage(vp_stage):
    ps = _ps()
    if vp_stage is None:
        return ps.is_pipeline_first_stage(ignore_virtual=True)
    return ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)


def _is_last_stage(vp_stage):
    ps = _ps()
    if vp_stage is None:
        return ps.is_pipeline_last_stage(ignore_virtual=True)
    return ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)


def build_model_chunks(model_cfg: ModelConfig, *, transformer_impl: str = "local", fp8=None,
                       params_dtype: torch.dtype = torch.float32, sequence_parallel: bool = False,
                       wrap_ddp: bool = False, ddp_config=None, overrides: Optional[dict] = None,
                       attention_backend: Optional[str] = None,
                       num_layers_in_first_pipeline_stage: Optional[int] = None,
                       num_layers_in_last_pipeline_stage: Optional[int] = None) -> List[torch.nn.Module]:
    """The list of model chunks of this pipeline rank (one per virtual stage), on the device.

    `num_layers_in_first/last_pipeline_stage`: uneven pipeline split (see `transformer_config`).

    With `wrap_ddp=True` each chunk is wrapped in megatron.core.distributed.DistributedDataParallel
    (`ddp_config`: a DistributedDataParallelConfig or a dict of its fields; defaults: fp32 grad
    accumulation, no overlap), as `train.step` expects.
    """
    ps = _ps()
    vpp = ps.get_virtual_pipeline_model_parallel_world_size() if ps.model_parallel_is_initialized() else None
    config = transformer_config(model_cfg, params_dtype=params_dtype, sequence_parallel=sequence_parallel,
                                fp8=fp8, num_layers_in_first_pipeline_stage=num_layers_in_first_pipeline_stage,
                                num_layers_in_last_pipeline_stage=num_layers_in_last_pipeline_stage,
                                **(overrides or {}))
    stages = [None] if not vpp or vpp == 1 else list(range(vpp))
    chunks = [build_gpt_model(model_cfg, transformer_impl=transformer_impl, fp8=fp8,
                              params_dtype=params_dtype, sequence_parallel=sequence_parallel,
                              vp_stage=s, config=config, attention_backend=attention_backend)
              for s in stages]
    for chunk in chunks:
        # Megatron-LM sets this on every param; DDP / optimizer / checkpoint code reads it.
        from megatron.core import tensor_parallel
        for p in chunk.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(p)
    if config.bf16 or config.fp16:
        from megatron.core.transformer.module import Float16Module
        chunks = [Float16Module(config, c) for c in chunks]
    if wrap_ddp:
        chunks = wrap_with_ddp(chunks, ddp_config)
    return chunks


def wrap_with_ddp(chunks, ddp_config=None):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    if ddp_config is None:
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=False)
    elif isinstance(ddp_config, dict):
        ddp_config = DistributedDataParallelConfig(**ddp_config)
    out = []
    for i, chunk in enumerate(chunks):
        out.append(DistributedDataParallel(
            config=chunk.config, ddp_config=ddp_config, module=chunk,
            # Only the first chunk's grads are bucketed for overlap in Megatron-LM's convention.
            disable_bucketing=i > 0))
    return out


def unwrap_model(model: Union[torch.nn.Module, List[torch.nn.Module]]):
    """Strip DDP / Float16Module wrappers (a list in, a list out)."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    def one(m):
        while isinstance(m, (DistributedDataParallel, Float16Module)) or hasattr(m, "module") and \
                type(m).__name__ in ("DistributedDataParallel", "Float16Module", "FullyShardedDataParallel"):
            m = m.module
        return m

    if isinstance(model, (list, tuple)):
        return [one(m) for m in model]
    return one(model)
