"""Model building for the conversion tools (thin wrapper over megatron_dgpo.model.builder)."""
from __future__ import annotations

import torch

from megatron_dgpo.model.config import ModelConfig


def build_chunks(model_cfg: ModelConfig, **kw):
    """`build_model_chunks(model_cfg, **kw)`; on CPU-only torch, `Tensor.cuda()` is a no-op during the
    build: megatron's LanguageModule.setup_embeddings_and_output_layer calls `weight.data.cuda()` for
    tied embeddings, which compat.cpu does not redirect (megatron-core 0.16.1)."""
    from megatron_dgpo.model.builder import build_model_chunks

    if torch.cuda.is_available():
        return build_model_chunks(model_cfg, **kw)
    orig = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        return build_model_chunks(model_cfg, **kw)
    finally:
        torch.Tensor.cuda = orig
