"""The builder's GPTModel equals transformers' Qwen2 / Qwen3 / Llama (incl. Llama-3 rope scaling) (TP=1, fp32).

Runs in the pytest process (world of one, gloo): weights are copied by hand, so this pins the
architecture mapping (fused QKV per query group [q_g..., k_g, v_g], fc1 = [gate; up]).
"""
import pytest
import torch

from megatron_dgpo.model.config import ModelConfig


@pytest.fixture(scope="module")
def megatron_world():
    from megatron_dgpo import distributed

    distributed.initialize(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, seed=1)
    yield
    distributed.destroy()


def copy_hf_to_megatron(hf, model, cfg: ModelConfig):
    """Hand-written HF -> Megatron copy for the test (the real converter lives elsewhere)."""
    hd, nq, ng = cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups
    per = nq // ng
    sd = {}
    sd["embedding.word_embeddings.weight"] = hf.model.embed_tokens.weight
    for i, layer in enumerate(hf.model.layers):
        a = layer.self_attn
        p = f"decoder.layers.{i}."
        q = a.q_proj.weight.view(ng, per * hd, -1)
        k = a.k_proj.weight.view(ng, hd, -1)
        v = a.v_proj.weight.view(ng, hd, -1)
        sd[p + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], 1).reshape(-1, cfg.hidden_size)
        if cfg.qkv_bias:
            qb = a.q_proj.bias.view(ng, per * hd)
            kb = a.k_proj.bias.view(ng, hd)
            vb = a.v_proj.bias.view(ng, hd)
            sd[p + "self_attention.linear_qkv.bias"] = torch.cat([qb, kb, vb], 1).reshape(-1)
        if cfg.qk_layernorm:
            sd[p + "self_attention.q_layernorm.weight"] = a.q_norm.weight
            sd[p + "self_attention.k_layernorm.weight"] = a.k_norm.weight
        sd[p + "self_attention.linear_proj.weight"] = a.o_proj.weight
        sd[p + "input_layernorm.weight"] = layer.input_layernorm.weight
        sd[p + "pre_mlp_layernorm.weight"] = layer.post_attention_layernorm.weight
        sd[p + "mlp.linear_fc1.weight"] = torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight], 0)
        sd[p + "mlp.linear_fc2.weight"] = layer.mlp.down_proj.weight
    sd["decoder.final_layernorm.weight"] = hf.model.norm.weight
    if not cfg.tie_word_embeddings:
        sd["output_layer.weight"] = hf.lm_head.weight
    own = model.state_dict()
    with torch.no_grad():
        for name, t in sd.items():
            assert own[name].shape == t.shape, (name, own[name].shape, t.shape)
            own[name].copy_(t)
    missing = {k for k in own if not k.endswith("_extra_state")} - set(sd)
    assert not missing, missing


# Llama-3 rope scaling with a short original context so that all three frequency bands (kept,
# smoothed, divided by factor) occur at head_dim 16 and the 17-token test length.
LLAMA3_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)


@pytest.mark.parametrize("arch,tied,extra", [
    ("qwen2", False, {}), ("llama", True, {}),
    ("qwen3", False, dict(kv_channels=24)),  # head_dim independent of hidden / heads
    ("llama", False, dict(rope_scaling=LLAMA3_SCALING)),
    ("qwen2", False, dict(kv_channels=8)),  # head_dim != hidden / heads outside Qwen3 too
], ids=["qwen2", "llama_tied", "qwen3", "llama3_rope_scaling", "qwen2_head_dim_8"])
def test_builder_matches_transformers(megatron_world, arch, tied, extra):
    import transformers

    from megatron_dgpo.model.builder import build_gpt_model

    cfg = ModelConfig(arch=arch, vocab_size=256, hidden_size=64, num_layers=2, num_attention_heads=4,
                      num_query_groups=2, ffn_hidden_size=96, rope_theta=5000.0, rms_norm_eps=1e-5,
                      qkv_bias=arch == "qwen2", tie_word_embeddings=tied, **extra)
    torch.manual_seed(0)
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf_config())
    hf_cfg._attn_implementation = "eager"
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).float().eval()
    with torch.no_grad():  # non-trivial norms so a swapped norm weight would show
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    model = build_gpt_model(cfg, transformer_impl="local").eval()
    assert model.pre_process and model.post_process
    copy_hf_to_megatron(hf, model, cfg)
    tokens = torch.randint(0, cfg.vocab_size, (3, 17))
    pos = torch.arange(17).unsqueeze(0).expand(3, -1)
    with torch.no_grad():
        ours = model(input_ids=tokens, position_ids=pos, attention_mask=None)
        ref = hf(input_ids=tokens).logits
    # GPTModel returns [B, S, V] when labels is None in 0.16 (logits transposed back).
    if ours.shape[0] != 3:
        ours = ours.transpose(0, 1)
    ours = ours[..., : cfg.vocab_size]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_transformer_engine_impl_needs_te(megatron_world):
    import importlib.util

    from megatron_dgpo.model.builder import build_gpt_model

    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("transformer_engine is installed")
    with pytest.raises(ImportError, match=r"pip install '\.\[te\]'"):
        build_gpt_model(ModelConfig(), transformer_impl="transformer_engine")


def test_transformer_config_fields(megatron_world):
    from megatron_dgpo.model.builder import transformer_config

    cfg = ModelConfig(num_query_groups=2, qkv_bias=True)
    tc = transformer_config(cfg, recompute_granularity=None)
    assert tc.normalization == "RMSNorm" and tc.gated_linear_unit and not tc.add_bias_linear
    assert tc.add_qkv_bias and tc.num_query_groups == 2 and tc.hidden_dropout == 0.0
    assert tc.kv_channels == cfg.head_dim and tc.gradient_accumulation_fusion is False


def test_cpu_backend_idempotent_and_narrow(megatron_world):
    import megatron.core.pipeline_parallel.schedules as schedules

    from megatron_dgpo.compat import cpu

    if torch.cuda.is_available():
        assert cpu.enable_cpu_backend() is False
        return
    assert cpu.enable_cpu_backend() is True and cpu.enable_cpu_backend() is True
    assert schedules.torch is not torch and schedules.torch.cuda.current_device() == torch.device("cpu")
    assert schedules.torch.zeros(2, device="cuda").device.type == "cpu"
    # global torch is untouched
    assert torch.Tensor.type is torch._C.TensorBase.type or "type" not in torch.Tensor.__dict__
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()


def test_pad_sequences_layout():
    from megatron_dgpo.train import pad_sequences

    b = pad_sequences([[5, 6], [7]], [[1, 2, 3], [4]], [1.0, -1.0], rollout_logp=[[-.1, -.2, -.3], [-.4]],
                      pad_to_multiple=4)
    assert b.tokens.tolist() == [[5, 6, 1, 2, 3, 0, 0, 0], [7, 4, 0, 0, 0, 0, 0, 0]]
    assert b.loss_mask.tolist()[0] == [False, False, True, True, True, False, False, False]
    assert b.lengths.tolist() == [5, 2]
    assert torch.allclose(b.rollout_logp[1, :2], torch.tensor([0.0, -0.4]))
    assert b.micro_batches(1)[1].tokens.shape == (1, 8)
    assert b.dp_shard(1, 2).tokens.tolist() == [[7, 4, 0, 0, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="loss_mask"):
        type(b)(tokens=b.tokens, loss_mask=torch.ones_like(b.loss_mask), advantages=b.advantages)


def test_llama3_rope_frequencies_match_transformers(megatron_world):
    """Megatron's inv_freq equals transformers' llama3 rope init, for Llama 3.1's own parameters too."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_dgpo.model.builder import build_gpt_model

    for scaling in (LLAMA3_SCALING, dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_position_embeddings=8192)):
        cfg = ModelConfig(arch="llama", hidden_size=128, num_attention_heads=2, num_query_groups=1,
                          rope_theta=500000.0, qkv_bias=False, rope_scaling=scaling)
        hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf_config())
        want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
        plain = 1.0 / (cfg.rope_theta ** (torch.arange(0, 64, 2).float() / 64))
        got = build_gpt_model(cfg).rotary_pos_emb.inv_freq
        assert not torch.allclose(want, plain)  # the scaling is active
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
