"""Helpers shared by the weight_sync tests and torchrun workers (tiny random HF models)."""
from __future__ import annotations

import traceback
from pathlib import Path

import torch

from megatron_dgpo.model.config import ModelConfig

# Variants covering QKV bias + GQA + untied, tied embeddings, Llama (no bias), and Qwen3 (q/k norms,
# head_dim 6 != hidden / heads = 8, no bias).
# vocab 200 is not a multiple of 128*TP, so Megatron pads it (exercises vocab padding).
VARIANTS = {
    "qwen2": dict(arch="qwen2", qkv_bias=True, tie_word_embeddings=False),
    "qwen2_tied": dict(arch="qwen2", qkv_bias=True, tie_word_embeddings=True),
    "llama": dict(arch="llama", qkv_bias=False, tie_word_embeddings=False),
    "qwen3": dict(arch="qwen3", qkv_bias=False, tie_word_embeddings=False, kv_channels=6),
}


def tiny_config(variant: str, **over) -> ModelConfig:
    kw = dict(vocab_size=200, hidden_size=64, num_layers=4, num_attention_heads=8, num_query_groups=2,
              ffn_hidden_size=96, max_position_embeddings=128, rms_norm_eps=1e-6)
    kw.update(VARIANTS[variant])
    kw.update(over)
    return ModelConfig(**kw)


def make_hf_model(cfg: ModelConfig, seed: int = 0):
    """A transformers model of `cfg` with every weight random (norms too), float32."""
    from transformers import AutoConfig, AutoModelForCausalLM
    hf_cfg = AutoConfig.for_model(**cfg.to_hf_config())
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_cfg).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def save_hf_model(cfg: ModelConfig, folder: str | Path, seed: int = 0, max_shard_size: str | None = None):
    model = make_hf_model(cfg, seed)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(folder), safe_serialization=True, **kw)
    return model


def hf_state(model) -> dict[str, torch.Tensor]:
    """HF tensors as they are saved (tied lm_head dropped)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def load_hf_from_tensors(cfg: ModelConfig, named_tensors):
    """A transformers model whose weights are exactly the streamed tensors (strict)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg.to_hf_config())).float().eval()
    sd = dict(named_tensors)
    if cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if "inv_freq" not in m]
    if missing or unexpected:
        raise AssertionError(f"missing={missing} unexpected={unexpected}")
    return model


def reference_inference_shards(cfg: ModelConfig, sd: dict[str, torch.Tensor], tp: int, rank: int):
    """Independent statement of the inference TP convention (vLLM/SGLang style), for tests."""
    out = {}
    for name, t in sd.items():
        if any(k in name for k in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            if ("k_proj" in name or "v_proj" in name) and cfg.num_query_groups < tp:
                hd = cfg.head_dim
                h = rank * cfg.num_query_groups // tp
                out[name] = t[h * hd:(h + 1) * hd]
            else:
                out[name] = t.chunk(tp, dim=0)[rank]
        elif "o_proj" in name or "down_proj" in name:
            out[name] = t.chunk(tp, dim=1)[rank]
        elif "embed_tokens" in name or "lm_head" in name:
            c = -(-t.shape[0] // tp)
            out[name] = t[rank * c:(rank + 1) * c]
        else:
            out[name] = t
    return out


RESULTS: dict = {}


def check(name, fn):
    """Run check `fn` on every rank; it passes only if it passes everywhere (rank 0 reports)."""
    import torch.distributed as dist

    try:
        res = fn()
        ok, detail = (res if isinstance(res, tuple) else (bool(res), ""))
    except Exception:  # noqa: BLE001
        ok, detail = False, traceback.format_exc()[-3000:]
    allres = [None] * dist.get_world_size()
    dist.all_gather_object(allres, (bool(ok), detail, dist.get_rank()))
    bad = [r for r in allres if not r[0]]
    if bad:
        detail = f"rank {bad[0][2]}: {bad[0][1]}"
    else:
        detail = "; ".join(sorted({f"{d}" for _, d, _ in allres if d}))[:500]
    RESULTS[name] = {"ok": not bad, "detail": detail}
