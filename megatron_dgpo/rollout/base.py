"""The rollout interface shared by the embedded HF engine and the SGLang engines.

Log-prob convention (all engines): `RolloutSample.logprobs[t]` is log softmax(logits_t / T)
at the sampled token, over the full vocabulary, where T is the sampling temperature (T = 1 for
greedy decoding, temperature <= 0). top-k / top-p truncation changes which tokens can be drawn
but is NOT folded into the returned log-prob. This is what SGLang's /generate reports by default
(with SGLANG_RETURN_ORIGINAL_LOGPROB unset), and what a trainer computes with
log_softmax(logits / T): the trainer must divide its logits by the same temperature.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterable, Literal, Optional

import torch

FinishReason = Literal["stop", "length", "abort"]


@dataclass
class SamplingParams:
    n: int = 1  # samples per prompt; outputs are prompt-major (prompt i's n samples contiguous)
    temperature: float = 1.0  # <= 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # <= 0 disables (SGLang's convention is -1)
    max_new_tokens: int = 256
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the model's eos
    seed: Optional[int] = None  # None: the engine's own RNG stream

    def __post_init__(self):
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError("SamplingParams: n and max_new_tokens must be >= 1")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("SamplingParams.top_p must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1

    @property
    def logprob_temperature(self) -> float:
        """The T of the returned log-probs (see the module docstring)."""
        return 1.0 if self.temperature <= 0.0 else self.temperature


@dataclass
class RolloutSample:
    prompt_index: int  # index into the prompt list given to generate()
    prompt_ids: list[int]
    response_ids: list[int]  # includes the final stop/eos token when finish_reason == "stop"
    logprobs: list[float]  # one per response token, see the module docstring
    finish_reason: FinishReason
    weight_version: str  # the version of the weights that produced this sample


NamedTensors = Iterable[tuple[str, torch.Tensor]]


class RolloutEngine(ABC):
    """Generates responses with per-token log-probs and takes new weights from the trainer."""

    @abstractmethod
    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[RolloutSample]:
        """len(prompt_token_ids) * sampling.n samples, prompt-major."""

    @abstractmethod
    def update_weights(self, named_tensors: NamedTensors, version: int | str) -> None:
        """Load HF-named tensors (one full set of weights) and set the weight version."""

    def release_memory(self, tags: Optional[list[str]] = None) -> None:
        """Free accelerator memory ("weights", "kv_cache") while the trainer runs."""

    def resume_memory(self, tags: Optional[list[str]] = None) -> None:
        """Re-acquire what release_memory freed."""

    @property
    @abstractmethod
    def weight_version(self) -> str:
        ...

    def close(self) -> None:
        pass
