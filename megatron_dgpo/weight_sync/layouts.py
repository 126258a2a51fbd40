"""Declarative HF <-> Megatron parameter tables, one per architecture.

A table is a tuple of `TensorRule`s. Each rule relates one Megatron parameter (a name pattern,
with `{i}` standing for the decoder layer index) to one or more Hugging Face tensors, with

* ``rule``: how the HF tensors become the Megatron tensor (see `transforms`):
  ``"copy"`` (same tensor), ``"qkv"`` (q/k/v interleaved per query group), ``"gate_up"``
  (gate and up stacked per TP shard), ``"vocab"`` (rows padded to the Megatron padded vocab);
* ``tp_dim``: the dimension along which Megatron partitions the parameter over tensor-parallel
  ranks (``None``: replicated). For this model family the HF tensors split along the same
  dimension, which is also the inference-engine TP convention (see `inference_shard_dim`);
* ``megatron_alt``: alternative Megatron names for the same tensor (the Transformer-Engine layer
  spec fuses the norms into the next linear: ``linear_qkv.layer_norm_weight`` and
  ``linear_fc1.layer_norm_weight``); a model built with either spec matches the table;
* ``when``: an optional `ModelConfig` predicate (``"qkv_bias"``, ``"untied"``, ``"qk_layernorm"``).

Adding an architecture whose tensors follow these rules is adding a table to `LAYOUTS`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from megatron_dgpo.model.config import ModelConfig

RULES = ("copy", "qkv", "gate_up", "vocab")


@dataclass(frozen=True)
class TensorRule:
    megatron: str
    hf: tuple[str, ...]
    rule: str = "copy"
    tp_dim: int | None = None
    megatron_alt: tuple[str, ...] = ()
    when: str | None = None

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r} (known: {RULES})")
        expected = {"qkv": 3, "gate_up": 2}.get(self.rule, 1)
        if len(self.hf) != expected:
            raise ValueError(f"rule {self.rule!r} for {self.megatron} needs {expected} HF names")
        if self.rule in ("qkv", "gate_up", "vocab") and self.tp_dim != 0:
            raise ValueError(f"rule {self.rule!r} is column-/vocab-parallel: tp_dim must be 0")

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.megatron

    def megatron_names(self) -> tuple[str, ...]:
        return (self.megatron,) + tuple(self.megatron_alt)

    def hf_names(self, layer: int | None) -> tuple[str, ...]:
        return tuple(n.format(i=layer) for n in self.hf) if self.per_layer else self.hf

    def applies(self, cfg: ModelConfig) -> bool:
        if self.when is None:
            return True
        if self.when == "qkv_bias":
            return cfg.qkv_bias
        if self.when == "untied":
            return not cfg.tie_word_embeddings
        if self.when == "qk_layernorm":
            return cfg.qk_layernorm
        raise ValueError(f"unknown predicate when={self.when!r}")


_L = "decoder.layers.{i}."
_H = "model.layers.{i}."

# Qwen2, Qwen3 (dense) and Llama share the decoder layout; Qwen2 has q/k/v biases (config qkv_bias),
# Qwen3 per-head q/k RMSNorms (config qk_layernorm; one [head_dim] weight shared by all heads).
_DECODER_FAMILY: tuple[TensorRule, ...] = (
    TensorRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab", 0),
    TensorRule(_L + "input_layernorm.weight", (_H + "input_layernorm.weight",),
               megatron_alt=(_L + "self_attention.linear_qkv.layer_norm_weight",)),
    TensorRule(_L + "self_attention.linear_qkv.weight",
               (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight", _H + "self_attn.v_proj.weight"),
               "qkv", 0),
    TensorRule(_L + "self_attention.linear_qkv.bias",
               (_H + "self_attn.q_proj.bias", _H + "self_attn.k_proj.bias", _H + "self_attn.v_proj.bias"),
               "qkv", 0, when="qkv_bias"),
    TensorRule(_L + "self_attention.q_layernorm.weight", (_H + "self_attn.q_norm.weight",), when="qk_layernorm"),
    TensorRule(_L + "self_attention.k_layernorm.weight", (_H + "self_attn.k_norm.weight",), when="qk_layernorm"),
    TensorRule(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",), "copy", 1),
    TensorRule(_L + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",),
               megatron_alt=(_L + "mlp.linear_fc1.layer_norm_weight",)),
    TensorRule(_L + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
               "gate_up", 0),
    TensorRule(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), "copy", 1),
    TensorRule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    TensorRule("output_layer.weight", ("lm_head.weight",), "vocab", 0, when="untied"),
)

LAYOUTS: dict[str, tuple[TensorRule, ...]] = {
    "qwen2": _DECODER_FAMILY,
    "qwen3": _DECODER_FAMILY,
    "llama": _DECODER_FAMILY,
}

# With tied embeddings HF has no lm_head; a Megatron last pipeline stage (PP > 1) still holds a
# copy of the embedding as output_layer.weight, loaded from this HF tensor and never streamed.
TIED_OUTPUT = ("output_layer.weight", "model.embed_tokens.weight")


def get_layout(cfg: ModelConfig) -> tuple[TensorRule, ...]:
    """The rules that apply to this model (predicates evaluated)."""
    if cfg.arch not in LAYOUTS:
        raise ValueError(f"architecture {cfg.arch!r} has no weight_sync layout (have: {sorted(LAYOUTS)})")
    if cfg.arch in ("llama", "qwen3") and cfg.qkv_bias:
        # HF Llama's / Qwen3's attention_bias also adds an o_proj bias, which Megatron's add_qkv_bias lacks.
        raise ValueError(f"{cfg.arch} with attention_bias=True (o_proj bias) is not supported by the weight_sync "
                         f"layout (set model.qkv_bias=false)")
    return tuple(r for r in LAYOUTS[cfg.arch] if r.applies(cfg))


@dataclass
class _Matcher:
    rules: tuple[TensorRule, ...]
    patterns: list[tuple[re.Pattern, TensorRule]] = field(default_factory=list)

    def __post_init__(self):
        for r in self.rules:
            for name in r.megatron_names():
                rx = re.escape(name).replace(re.escape("{i}"), r"(\d+)")
                self.patterns.append((re.compile(rx + r"\Z"), r))

    def match(self, megatron_name: str) -> tuple[TensorRule, int | None] | None:
        for rx, rule in self.patterns:
            m = rx.match(megatron_name)
            if m:
                return rule, (int(m.group(1)) if rule.per_layer else None)
        return None


def megatron_matcher(rules: tuple[TensorRule, ...]) -> _Matcher:
    """`matcher.match(name) -> (rule, local_layer_index | None) | None` for Megatron names."""
    return _Matcher(rules)


def hf_tensor_names(cfg: ModelConfig) -> list[str]:
    """Every HF tensor name of the model, in streaming order."""
    out: list[str] = []
    for layer, rule in iter_rule_instances(cfg):
        out.extend(rule.hf_names(layer))
    return out


def iter_rule_instances(cfg: ModelConfig):
    """(layer | None, rule) in streaming order: embedding, layers 0..L-1, final norm, lm_head."""
    rules = get_layout(cfg)
    pre = [r for r in rules if not r.per_layer and r.megatron.startswith("embedding.")]
    per = [r for r in rules if r.per_layer]
    post = [r for r in rules if not r.per_layer and not r.megatron.startswith("embedding.")]
    for r in pre:
        yield None, r
    for i in range(cfg.num_layers):
        for r in per:
            yield i, r
    for r in post:
        yield None, r


def hf_shapes(cfg: ModelConfig, rule: TensorRule) -> tuple[tuple[int, ...], ...]:
    """Shapes of the HF tensors of `rule` (unpadded vocab)."""
    H, hd = cfg.hidden_size, cfg.head_dim
    nq, nkv, F, V = cfg.num_attention_heads, cfg.num_query_groups, cfg.ffn_hidden_size, cfg.vocab_size
    m = rule.megatron
    if rule.rule == "vocab":
        return ((V, H),)
    if rule.rule == "qkv":
        if m.endswith(".bias"):
            return ((nq * hd,), (nkv * hd,), (nkv * hd,))
        return ((nq * hd, H), (nkv * hd, H), (nkv * hd, H))
    if rule.rule == "gate_up":
        return ((F, H), (F, H))
    if m.endswith("linear_proj.weight"):
        return ((H, nq * hd),)
    if m.endswith("linear_fc2.weight"):
        return ((H, F),)
    if m.endswith("q_layernorm.weight") or m.endswith("k_layernorm.weight"):
        return ((hd,),)
    if m.endswith("layernorm.weight") or m.endswith("layer_norm_weight"):
        return ((H,),)
    raise ValueError(f"no shape rule for {m}")


def megatron_shape(cfg: ModelConfig, rule: TensorRule, tp: int) -> tuple[int, ...]:
    """Shape of the local Megatron shard of `rule` at tensor-parallel size `tp`."""
    shapes = hf_shapes(cfg, rule)
    if rule.rule == "vocab":
        return (cfg.padded_vocab_size(tp) // tp, cfg.hidden_size)
    if rule.rule in ("qkv", "gate_up"):
        rows = sum(s[0] for s in shapes) // tp
        return (rows,) + tuple(shapes[0][1:])
    s = list(shapes[0])
    if rule.tp_dim is not None:
        s[rule.tp_dim] //= tp
    return tuple(s)


def inference_shard_dim(rule: TensorRule) -> int | None:
    """Dimension an inference engine with TP=k shards this rule's HF tensors along.

    q/k/v/gate/up: 0 (column-parallel, output features); o_proj/down_proj: 1 (row-parallel,
    input features); embed_tokens/lm_head: 0 (vocab rows); norms: replicated (None).
    """
    return rule.tp_dim
