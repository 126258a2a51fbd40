"""FP8 switch: config mapping and validation errors (CPU), numerics on an FP8 GPU (te mark)."""
import importlib.util

import pytest
import torch

from megatron_dgpo.model.fp8 import FP8Config, FP8ConfigError

HAS_TE = importlib.util.find_spec("transformer_engine") is not None


def test_disabled_is_empty():
    cfg = FP8Config()
    assert cfg.transformer_config_kwargs() == {} and cfg.sequence_multiple() == 1
    assert FP8Config.coerce(None) is None and FP8Config.coerce({"enabled": False}) is None
    cfg.validate(transformer_impl="local", te_available=False)  # nothing to check


@pytest.mark.parametrize("recipe,multiple", [("tensorwise", 16), ("delayed", 16), ("blockwise", 16), ("mxfp8", 32)])
def test_mapping_and_padding(recipe, multiple):
    cfg = FP8Config(enabled=True, recipe=recipe, format="e4m3", amax_history_len=16)
    kw = cfg.transformer_config_kwargs()
    assert kw["fp8"] == "e4m3" and kw["fp8_recipe"] == recipe and kw["fp8_amax_history_len"] == 16
    assert cfg.sequence_multiple() == multiple
    assert FP8Config.coerce(recipe).recipe == recipe


def test_field_names_exist_on_transformer_config():
    from megatron.core.transformer.transformer_config import TransformerConfig

    names = set(TransformerConfig.__dataclass_fields__)
    assert set(FP8Config(enabled=True).transformer_config_kwargs()) <= names


@pytest.mark.parametrize("bad,match", [
    (dict(format="e5m2"), "format"), (dict(recipe="nvfp4"), "recipe"),
    (dict(amax_compute_algo="mean"), "amax_compute_algo"), (dict(fp8_param=True), "enabled=True"),
    (dict(enabled=True, interval=0), "interval"),
])
def test_invalid_fields(bad, match):
    with pytest.raises(FP8ConfigError, match=match):
        FP8Config(**bad)


def test_validation_needs_te():
    with pytest.raises(FP8ConfigError, match=r"pip install '\.\[te\]'"):
        FP8Config(enabled=True).validate(te_available=False)


def test_validation_needs_te_spec():
    with pytest.raises(FP8ConfigError, match="transformer_impl='transformer_engine'"):
        FP8Config(enabled=True).validate(transformer_impl="local", te_available=True)


@pytest.mark.parametrize("recipe,cap,ok", [
    ("tensorwise", (8, 0), False), ("tensorwise", (8, 9), True), ("delayed", (9, 0), True),
    ("mxfp8", (9, 0), False), ("mxfp8", (10, 0), True), ("blockwise", (8, 9), False),
])
def test_validation_compute_capability(recipe, cap, ok):
    cfg = FP8Config(enabled=True, recipe=recipe)
    if ok:
        cfg.validate(te_available=True, device_capability=cap)
    else:
        with pytest.raises(FP8ConfigError, match="compute capability"):
            cfg.validate(te_available=True, device_capability=cap)


def test_validation_needs_cuda_device():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(FP8ConfigError, match="CUDA device"):
        FP8Config(enabled=True).validate(te_available=True)


def test_fp8_param_needs_distributed_optimizer():
    with pytest.raises(FP8ConfigError, match="distributed optimizer"):
        FP8Config(enabled=True, fp8_param=True).validate(
            te_available=True, device_capability=(9, 0), use_distributed_optimizer=False)


def test_builder_rejects_fp8_without_te():
    if HAS_TE:
        pytest.skip("transformer_engine is installed")
    from megatron_dgpo.model.builder import build_gpt_model
    from megatron_dgpo.model.config import ModelConfig

    with pytest.raises(FP8ConfigError, match="Transformer Engine"):
        build_gpt_model(ModelConfig(), transformer_impl="transformer_engine", fp8="tensorwise")


@pytest.mark.te
@pytest.mark.gpu
def test_fp8_forward_close_to_bf16():
    """On an FP8 GPU with TE: the FP8 model's logits stay close to the bf16 model's."""
    from megatron_dgpo import distributed
    from megatron_dgpo.model.builder import build_gpt_model
    from megatron_dgpo.model.config import ModelConfig

    cap = torch.cuda.get_device_capability()
    if cap < (8, 9):
        pytest.skip(f"compute capability {cap} < 8.9")
    distributed.initialize(seed=3)
    try:
        cfg = ModelConfig(vocab_size=512, hidden_size=256, num_layers=2, num_attention_heads=8,
                          num_query_groups=4, ffn_hidden_size=512)
        ref = build_gpt_model(cfg, transformer_impl="transformer_engine", params_dtype=torch.bfloat16).eval()
        fp8 = build_gpt_model(cfg, transformer_impl="transformer_engine", params_dtype=torch.bfloat16,
                              fp8=FP8Config(enabled=True, recipe="tensorwise")).eval()
        fp8.load_state_dict(ref.state_dict(), strict=False)
        tokens = torch.randint(0, cfg.vocab_size, (2, 64), device="cuda")
        pos = torch.arange(64, device="cuda").unsqueeze(0).expand(2, -1)
        from megatron.core.fp8_utils import get_fp8_context
        with torch.no_grad():
            a = ref(input_ids=tokens, position_ids=pos, attention_mask=None).float()
            with get_fp8_context(fp8.config):
                b = fp8(input_ids=tokens, position_ids=pos, attention_mask=None).float()
        rel = ((a - b).norm() / a.norm()).item()
        assert rel < 0.1, rel
    finally:
        distributed.destroy()
