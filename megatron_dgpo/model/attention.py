"""Fused core attention for Megatron's local (non-TE) layer spec: `parallel.attention_backend: sdpa`.

Megatron's local `DotProductAttention` materialises the `[b, heads, s, s]` scores and rejects
packed (THD) sequences. `SDPAttention` is a drop-in `core_attention` submodule with the same
constructor and forward signature (called by keyword by `SelfAttention` in megatron-core 0.16 and
0.19) that computes

* padded rows (`sbhd`, causal): `torch.nn.functional.scaled_dot_product_attention(is_causal=True)`
  (flash / memory-efficient kernels on CUDA, a fused kernel on CPU), GQA without repeating K/V;
* packed rows (`PackedSeqParams(qkv_format="thd")`): on CUDA in fp16/bf16
  `torch.nn.attention.varlen.varlen_attn` (causal, per-sequence; torch >= 2.10) when it exists;
  otherwise (CPU, fp32, older torch) SDPA with the exact block-diagonal causal mask built from
  `cu_seqlens` (T x T booleans: for tests and short rows, not for 8k-token packs).

Softmax scale, GQA grouping and per-partition head counts follow `DotProductAttention`.
"""
from __future__ import annotations

import inspect
import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["SDPAttention", "block_causal_mask", "varlen_attn_available"]


def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_attn_available() -> bool:
    return _varlen_attn() is not None and torch.cuda.is_available()


def block_causal_mask(cu_seqlens: torch.Tensor, total: int, device) -> torch.Tensor:
    """[T, T] bool, True where query i may attend key j: same segment and j <= i."""
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    seg = torch.bucketize(torch.arange(total, device=device), cu[1:], right=True)
    pos = torch.arange(total, device=device)
    return (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])


def _causal_varlen(q, k, v, cu, max_len, scale, gqa):
    """varlen_attn with a causal mask; its keyword for causality changed across torch versions."""
    fn = _varlen_attn()
    params = inspect.signature(fn).parameters
    kw = {"scale": scale}
    if "window_size" in params:
        kw["window_size"] = (-1, 0)
    elif "is_causal" in params:
        kw["is_causal"] = True
    else:
        return None
    if gqa:
        if "enable_gqa" not in params:
            return None
        kw["enable_gqa"] = True
    return fn(q, k, v, cu, cu, max_len, max_len, **kw)


def _megatron_module():
    from megatron.core.transformer.module import MegatronModule
    return MegatronModule


class SDPAttention(_megatron_module()):
    """Core attention (`SelfAttentionSubmodules.core_attention`) on torch SDPA / varlen_attn."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str = "self",
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, **_unused):
        super().__init__(config=config)
        if getattr(config, "context_parallel_size", 1) != 1:
            raise NotImplementedError("attention_backend='sdpa' does not support context parallelism")
        self.config = config
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        tp = pg_collection.tp.size() if pg_collection is not None and hasattr(pg_collection, "tp") else _tp_size()
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp if config.num_query_groups else self.heads
        head_dim = config.kv_channels
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        if getattr(config, "apply_query_key_layer_scaling", False):
            self.softmax_scale /= self.layer_number
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def _dropout(self) -> float:
        return self.dropout_p if self.training else 0.0

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None, **_unused):
        if attention_bias is not None:
            raise NotImplementedError("attention_backend='sdpa': attention_bias is not supported")
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._thd(query, key, value, packed_seq_params)
        # sbhd: [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        mask, causal = None, attention_mask is None
        if attention_mask is not None:  # Megatron masks are True where attention is forbidden
            mask = ~attention_mask.bool()
        elif q.shape[2] != k.shape[2]:
            raise NotImplementedError("attention_backend='sdpa': causal attention needs sq == sk")
        with self._rng():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self._dropout(),
                                                 is_causal=causal, scale=self.softmax_scale,
                                                 enable_gqa=self.heads != self.groups)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, self.heads * query.shape[-1])

    def _thd(self, query, key, value, p):
        # [T, heads, d]
        cu = p.cu_seqlens_q_padded if p.cu_seqlens_q_padded is not None else p.cu_seqlens_q
        total = query.shape[0]
        gqa = self.heads != self.groups
        if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and _varlen_attn() is not None \
                and self._dropout() == 0.0:
            out = _causal_varlen(query, key, value, cu.to(torch.int32), int(p.max_seqlen_q),
                                 self.softmax_scale, gqa)
            if out is not None:
                return out.reshape(total, -1)
        mask = block_causal_mask(cu, total, query.device)
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query, key, value))  # [1, heads, T, d]
        with self._rng():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self._dropout(),
                                                 scale=self.softmax_scale, enable_gqa=gqa)
        return out[0].transpose(0, 1).reshape(total, -1)

    def _rng(self):
        """Dropout draws from Megatron's model-parallel RNG stream, as DotProductAttention does."""
        import contextlib

        if self._dropout() == 0.0:
            return contextlib.nullcontext()
        from megatron.core import tensor_parallel

        return tensor_parallel.get_cuda_rng_tracker().fork()


def _tp_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
