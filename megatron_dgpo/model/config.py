"""Architecture description shared by the Megatron builder, the HF converter and the rollout engines.

One dataclass describes a Qwen2 / Qwen3 (dense) / Llama (2, 3.x) family decoder in Hugging Face terms; the Megatron
`TransformerConfig` and the HF `config.json` are both derived from it, so the two layouts cannot
disagree about shapes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

SUPPORTED_ARCHITECTURES = ("qwen2", "qwen3", "llama")
# Llama 3.x rope scaling (HF rope_type "llama3"): the keys of rope_scaling / rope_parameters we read.
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class ModelConfig:
    arch: str = "qwen2"  # one of SUPPORTED_ARCHITECTURES (HF model_type)
    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    num_query_groups: int = 2  # HF num_key_value_heads (GQA)
    ffn_hidden_size: int = 128  # HF intermediate_size
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = True  # Qwen2 has q/k/v biases, Llama does not
    tie_word_embeddings: bool = False
    # Megatron pads the vocabulary to a multiple of this times TP size (padding rows are stripped
    # when streaming to HF / inference engines).
    make_vocab_size_divisible_by: int = 128
    # Per-head width (HF head_dim, Megatron kv_channels); None: hidden_size // num_attention_heads.
    # Qwen3 sets it independently of hidden_size (e.g. Qwen3-4B: hidden 2560, 32 heads, head_dim 128);
    # Qwen2 and Llama read it from config.json too.
    kv_channels: int | None = None
    # Llama 3.x rope scaling (rope_type "llama3"); None: plain RoPE. Keys as in HF: factor,
    # low_freq_factor, high_freq_factor, original_max_position_embeddings.
    rope_scaling: dict | None = None

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"ModelConfig.arch={self.arch!r}: supported are {SUPPORTED_ARCHITECTURES}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                     "num_query_groups", "ffn_hidden_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError("ModelConfig.hidden_size must be divisible by num_attention_heads (or set kv_channels)")
        if self.kv_channels is not None and self.kv_channels <= 0:
            raise ValueError(f"ModelConfig.kv_channels must be positive, got {self.kv_channels}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError("ModelConfig.num_attention_heads must be divisible by num_query_groups")
        if self.rope_scaling is not None:
            missing = [k for k in _LLAMA3_KEYS if k not in self.rope_scaling]
            if missing:
                raise ValueError(f"ModelConfig.rope_scaling needs {list(_LLAMA3_KEYS)}; missing {missing}")
            self.rope_scaling = {k: (int if k == "original_max_position_embeddings" else float)(self.rope_scaling[k])
                                 for k in _LLAMA3_KEYS}

    @property
    def qk_layernorm(self) -> bool:
        """Qwen3: RMSNorm over each q and k head before RoPE (HF q_norm / k_norm, Megatron qk_layernorm)."""
        return self.arch == "qwen3"

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp_size: int = 1) -> int:
        multiple = self.make_vocab_size_divisible_by * tp_size
        return ((self.vocab_size + multiple - 1) // multiple) * multiple

    @classmethod
    def from_hf_config(cls, hf: dict) -> "ModelConfig":
        """Build from a HF config.json dict (Qwen2ForCausalLM / Qwen3ForCausalLM / LlamaForCausalLM)."""
        arch = hf.get("model_type")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"config.json model_type={arch!r} is not supported; supported: {SUPPORTED_ARCHITECTURES}")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        rope = hf.get("rope_theta")
        if rope is None:
            rope = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        scaling = llama3_rope_scaling(hf)
        return cls(
            arch=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads", heads),
            ffn_hidden_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rope_theta=float(rope),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            qkv_bias=bool(hf.get("attention_bias", arch == "qwen2")),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            kv_channels=head_dim if head_dim * heads != hf["hidden_size"] else None,
            rope_scaling=scaling,
        )

    def to_hf_config(self) -> dict:
        """The config.json dict that `transformers` loads for this architecture."""
        common = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_query_groups,
            intermediate_size=self.ffn_hidden_size,
            max_position_embeddings=self.max_position_embeddings,
            rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            head_dim=self.head_dim,  # read by Qwen2 / Qwen3 / Llama attention (getattr with this default)
            hidden_act="silu",
            torch_dtype="float32",
        )
        if self.rope_scaling is not None:
            common["rope_scaling"] = dict(self.rope_scaling, rope_type="llama3")
        if self.arch == "qwen2":
            return dict(common, model_type="qwen2", architectures=["Qwen2ForCausalLM"])
        if self.arch == "qwen3":
            return dict(common, model_type="qwen3", architectures=["Qwen3ForCausalLM"],
                        attention_bias=self.qkv_bias)
        return dict(common, model_type="llama", architectures=["LlamaForCausalLM"],
                    attention_bias=self.qkv_bias, mlp_bias=False)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def llama3_rope_scaling(hf: dict) -> dict | None:
    """The llama3 rope-scaling parameters of a HF config.json (rope_scaling or rope_parameters), else None."""
    for key in ("rope_scaling", "rope_parameters"):
        r = hf.get(key)
        if isinstance(r, dict) and r.get("rope_type", r.get("type")) == "llama3":
            return {k: r[k] for k in _LLAMA3_KEYS if k in r}
    return None
