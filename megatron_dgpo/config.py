"""The typed configuration of a training run: one dataclass per RL stage, loaded from YAML with
`key.sub=value` command-line overrides (megatron_dgpo.configio)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from megatron_dgpo.checkpoint import OPTIM_FORMATS
from megatron_dgpo.data import ArithmeticConfig, PromptDataConfig
from megatron_dgpo.loss import PolicyLossConfig
from megatron_dgpo.model.config import ModelConfig
from megatron_dgpo.reward import RewardConfig


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    transformer_impl: Literal["local", "transformer_engine"] = "local"
    params_dtype: Literal["float32", "bfloat16"] = "float32"
    # Core attention: local = Megatron's unfused DotProductAttention, sdpa = torch SDPA /
    # varlen_attn in the local spec (model/attention.py), te = Transformer Engine's (TE spec);
    # auto = te with transformer_engine, local otherwise.
    attention_backend: Literal["auto", "local", "sdpa", "te"] = "auto"
    # Uneven pipeline stages (Megatron-Core's split): layers on the first / last stage; the other
    # stages share the rest equally. None: every stage holds num_layers / PP.
    num_layers_in_first_pipeline_stage: Optional[int] = None
    num_layers_in_last_pipeline_stage: Optional[int] = None

    def __post_init__(self):
        from megatron_dgpo.model.builder import resolve_attention_backend

        try:
            resolve_attention_backend(self.transformer_impl, self.attention_backend)
        except ValueError as e:
            raise ValueError(f"parallel.{e}") from None


@dataclass
class FP8Settings:
    enabled: bool = False
    format: Literal["e4m3", "hybrid"] = "hybrid"
    recipe: Literal["tensorwise", "delayed", "mxfp8", "blockwise"] = "tensorwise"
    fp8_param: bool = False


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8


@dataclass
class DataConfig:
    task: Literal["arithmetic", "file"] = "arithmetic"
    arithmetic: ArithmeticConfig = field(default_factory=ArithmeticConfig)
    train: PromptDataConfig = field(default_factory=PromptDataConfig)
    eval: Optional[PromptDataConfig] = None
    # HF tokenizer folder; None builds the character tokenizer of the arithmetic task.
    tokenizer: Optional[str] = None


@dataclass
class SGLangSettings:
    mode: Literal["colocated", "server"] = "server"
    server_urls: list[str] = field(default_factory=list)  # server mode: one URL per engine
    model_path: Optional[str] = None  # colocated: the HF folder the engine starts from
    tp_size: int = 1
    mem_fraction_static: float = 0.5
    # Server-mode weight-broadcast rendezvous, on trainer rank 0's host; "" = its own host name.
    nccl_master_address: str = ""
    nccl_master_port: int = 29600
    request_timeout_s: float = 3600.0  # one HTTP request (a whole /generate share)
    # Ranks other than 0 wait this long for rank 0's rollout and rewards (not the 30-minute
    # process-group default: a long rollout must not kill the job).
    wait_timeout_s: float = 86400.0
    retries: int = 3  # per request, for refused/reset connections and HTTP 500/502-504, with backoff
    # SGLang honours per-request seeds only with --enable-deterministic-inference: when true the
    # launcher passes that flag and every sample gets its own seed; when false no seed is sent.
    deterministic: bool = False
    api_key_env: str = "DGPO_SGLANG_API_KEY"  # environment variable holding the servers' --api-key


@dataclass
class RolloutConfig:
    engine: Literal["embedded", "sglang"] = "embedded"
    group_size: int = 8  # G responses per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 8
    weight_sync_bucket_mb: int = 64
    # Rows the embedded engine decodes as one batch (each batch's KV cache lives until it ends).
    embedded_batch_size: int = 128
    sglang: SGLangSettings = field(default_factory=SGLangSettings)

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError("rollout.group_size must be >= 2 (GRPO advantages need a group)")
        if self.embedded_batch_size < 1:
            raise ValueError("rollout.embedded_batch_size must be >= 1")


@dataclass
class AlgoConfig:
    steps: int = 20  # RL steps (rollout batches)
    prompts_per_step: int = 16
    mini_batches: int = 2  # optimizer steps per rollout batch (one PPO epoch, split)
    epochs: int = 1
    micro_batch_size: int = 16
    # > 0: micro-batches cut by tokens (rows x own longest row, or packed length) instead of
    # micro_batch_size rows, balanced over DP ranks (train/microbatch.py); exact.
    max_tokens_per_micro_batch: int = 0
    # Pack each micro-batch's sequences into one THD row (needs attention_backend sdpa or te).
    pack_sequences: bool = False
    # Rows of a micro-batch with the same prompt share one copy of it in a packed row (a tree
    # attention mask; the same logits as their own rows): a group of G samples computes its prompt
    # once instead of G times. Needs parallel.attention_backend sdpa; replaces pack_sequences.
    share_prompt_prefix: bool = False
    advantage: Literal["grpo", "drgrpo"] = "grpo"
    filter_zero_variance: bool = True
    # auto: the rollout engine's log-probs where they are the trainer's numbers (embedded engine,
    # fp32 trainer), a trainer forward otherwise (SGLang, bf16); see rl/old_logp.py. An on-policy
    # update (mini_batches 1, epochs 1, no tis_cap) uses its own forward's, whatever the source.
    old_logp_source: Literal["auto", "trainer", "rollout"] = "auto"
    tis_cap: Optional[float] = None  # truncated IS correction min(pi_old / pi_rollout, cap)
    max_skipped_steps: int = 3  # abort after this many non-finite updates
    # LM head + log-prob + entropy fused on the last pipeline stage (ops/lm_head.py): no [T, V/TP]
    # logits or logit gradient in the policy update and the old-log-prob pass; same values.
    fused_lm_head: bool = True
    lm_head_chunk_tokens: Optional[int] = None  # tokens per tile (None: square tiles, ~256 MiB fp32 on CUDA, 32 MiB on CPU)
    # Abort after this many consecutive RL steps in which no group had reward variance (a policy
    # that diverged, or a solved task: no gradient left); 0 disables.
    max_steps_without_variance: int = 10
    # Seed of the RL phase (prompt order, rollout sampling); the warm start depends only on the
    # top-level seed, so runs that differ here share one cached warm start.
    seed: int = 0

    def __post_init__(self):
        if self.lm_head_chunk_tokens is not None and self.lm_head_chunk_tokens < 1:
            raise ValueError(f"algo.lm_head_chunk_tokens must be >= 1 or null, got {self.lm_head_chunk_tokens}")


@dataclass
class WarmStartConfig:
    init_hf_path: Optional[str] = None  # start from a HF checkpoint (e.g. R1-Distill-Qwen)
    sft_steps: int = 0  # supervised warm start on the task's answers (cached on disk)
    sft_lr: float = 3e-3
    sft_batch_size: int = 64
    cache_dir: str = "outputs/cache"


@dataclass
class EvalConfig:
    every: int = 0  # RL steps between evaluations (0: only before and after)
    num_prompts: int = 200
    samples_per_prompt: int = 1  # k of avg@k / pass@k
    temperature: float = 0.0  # 0: greedy


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    fp8: FP8Settings = field(default_factory=FP8Settings)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "outputs/dgpo"
    seed: int = 1234
    save_every: int = 0  # RL steps between checkpoints (0: only at the end)
    # Distributed-optimizer checkpoints: "fully_reshardable" (resume in any TP/PP/DP layout; the
    # state is gathered over DP while saving) or "dp_reshardable" (parallel writes; DP may change).
    optimizer_checkpoint_format: str = "fully_reshardable"
    # Writer processes per rank while saving a checkpoint (Megatron's thread_count; each is a fork
    # of the rank, so the RSS they add is a multiple of it). 0: 1 on CPU, Megatron's 2 on CUDA.
    checkpoint_writers: int = 0
    resume: bool = False
    overwrite: bool = False  # a fresh run may replace the checkpoints/metrics in output_dir
    tensorboard: bool = True

    def __post_init__(self):
        if self.algo.pack_sequences and self.parallel.attention_backend not in ("sdpa", "te") and not (
                self.parallel.attention_backend == "auto" and self.parallel.transformer_impl == "transformer_engine"):
            raise ValueError("algo.pack_sequences needs parallel.attention_backend sdpa or te "
                             f"(got {self.parallel.attention_backend!r}: Megatron's local attention has no THD path)")
        if self.algo.share_prompt_prefix and self.parallel.attention_backend != "sdpa":
            raise ValueError("algo.share_prompt_prefix needs parallel.attention_backend sdpa (its tree mask "
                             f"is an explicit attention mask), got {self.parallel.attention_backend!r}")
        if self.algo.max_tokens_per_micro_batch < 0:
            raise ValueError(f"algo.max_tokens_per_micro_batch={self.algo.max_tokens_per_micro_batch} must be >= 0")
        if self.optimizer_checkpoint_format not in OPTIM_FORMATS:
            raise ValueError(f"optimizer_checkpoint_format must be one of {OPTIM_FORMATS}, "
                             f"got {self.optimizer_checkpoint_format!r}")
        if self.checkpoint_writers < 0:
            raise ValueError(f"checkpoint_writers={self.checkpoint_writers} must be >= 0 (0: 1 on CPU, 2 on CUDA)")
        from megatron_dgpo.config_checks import check_train_config

        check_train_config(self)  # every field: finite, in range, layout consistent
