"""The policy forward's last step: GPTModel output -> per-token (log-prob, entropy), either way.

* Materialised (`fused=False`): GPTModel returns this rank's vocab-parallel logits `[B, S, V/TP]`;
  vocabulary padding is masked to -inf and `ops.vocab_parallel_logprobs` reduces them.
* Fused (`fused=True`): `fuse_next_forward(model, target, head)` makes the next call of the last
  pipeline stage's output layer (a Megatron ColumnParallelLinear) run
  `ops.fused_lm_head_logprobs` on exactly what that layer receives: the final-norm hidden states
  (sequence-sharded with SP) and the weight GPTModel passes it (the shared embedding weight when
  embeddings are tied, else its own weight). It returns `[S, B, 1 or 2]` float32 (log-prob and
  entropy) in place of the logits, which GPTModel transposes to `[B, S, .]` as it would the
  logits (megatron-core 0.16 and 0.19 both call `self.output_layer(hidden_states,
  weight=output_weight, runtime_gather_output=...)` and return `logits.transpose(0, 1)` when
  `labels` is None). No `[T, V/TP]` tensor exists in forward or backward.
  Earlier pipeline stages have no output layer: nothing changes there.
The override is an instance attribute removed by the call itself (one forward), so a model used
elsewhere (weight streaming, checkpoints, the HF engine comparison) is untouched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

__all__ = ["LMHead", "fuse_next_forward", "logprobs_from_output", "mask_vocab_padding"]


@dataclass(frozen=True)
class LMHead:
    """How the policy forward turns the model's output into log-probs (see the module docstring)."""
    fused: bool = False
    temperature: float = 1.0
    with_entropy: bool = True
    chunk_tokens: Optional[int] = None  # fused: tokens per chunk (None: ops.default_lm_head_chunk)
    logprob_chunk: Optional[int] = None  # materialised: the log-prob op's chunk_size
    vocab_size: Optional[int] = None  # ids >= vocab_size are padding (masked)


def _output_layer(model):
    from megatron_dgpo.model.builder import unwrap_model

    gpt = unwrap_model(model)
    if not getattr(gpt, "post_process", False):
        return None, None
    return gpt, gpt.output_layer


def fuse_next_forward(model, target: torch.Tensor, head: Optional[LMHead]) -> None:
    """With `head.fused`, the next forward of `model` (one micro-batch) returns `[B, S, 1 or 2]`
    (log-prob of `target` [B, S], entropy) instead of logits. Off the last stage: nothing.
    Otherwise the output layer is restored (a stale override of a failed forward is removed)."""
    gpt, layer = _output_layer(model)
    if layer is None:
        return
    if getattr(layer.__dict__.get("forward"), "_dgpo_fused_head", False):
        del layer.forward  # left over by a forward that failed before the output layer
    if head is None or not head.fused:
        return
    cfg = gpt.config
    if getattr(cfg, "mtp_num_layers", None) or getattr(cfg, "use_mup", False):
        # MTP calls the output layer once per prediction depth; MuP rescales the logits after it.
        raise NotImplementedError("algo.fused_lm_head supports neither multi-token prediction nor MuP: "
                                  "set algo.fused_lm_head=false")
    target_sb = target.transpose(0, 1)  # GPTModel's output layer works in [S, B, H]

    def forward(input_, weight=None, runtime_gather_output=None):
        del layer.forward  # one forward only: back to ColumnParallelLinear.forward
        from megatron_dgpo.ops import fused_lm_head_logprobs

        w = weight if weight is not None else layer.weight
        logp, ent = fused_lm_head_logprobs(
            input_, w, target_sb.to(input_.device), tp_group=getattr(layer, "tp_group", None),
            temperature=head.temperature, with_entropy=head.with_entropy, chunk_tokens=head.chunk_tokens,
            vocab_size=head.vocab_size, sequence_parallel=bool(getattr(layer, "sequence_parallel", False)))
        out = torch.stack([logp, ent], -1) if ent is not None else logp.unsqueeze(-1)
        return out, None

    forward._dgpo_fused_head = True
    layer.forward = forward


def mask_vocab_padding(logits: torch.Tensor, vocab_size: Optional[int]) -> torch.Tensor:
    """Set this rank's logits of padding ids (>= vocab_size) to -inf, in place (GPTModel's output
    is a fresh transposed copy)."""
    if vocab_size is None:
        return logits
    from megatron.core import parallel_state as ps

    v_local = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * v_local
    lo = max(vocab_size - start, 0)
    if lo < v_local:
        logits[..., lo:] = float("-inf")
    return logits


def logprobs_from_output(out: torch.Tensor, target: torch.Tensor, head: LMHead, logits_hook=None
                         ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(logp [B, S], entropy [B, S] or None) from what the model returned for `target` [B, S].
    `logits_hook(logits)` (materialised only) may replace the masked logits (tests)."""
    if tuple(out.shape[:2]) != tuple(target.shape):
        raise RuntimeError(f"expected model output [B, S, ...] for targets {tuple(target.shape)}, "
                           f"got {tuple(out.shape)}")
    if head.fused:
        want = 2 if head.with_entropy else 1
        if out.dim() != 3 or out.shape[-1] != want or out.dtype != torch.float32:
            raise RuntimeError(f"fused LM head: expected [B, S, {want}] float32 from the model, got "
                               f"{tuple(out.shape)} {out.dtype} (was fuse_next_forward called?)")
        return out[..., 0], (out[..., 1] if head.with_entropy else None)
    from megatron_dgpo.ops import vocab_parallel_logprobs

    logits = mask_vocab_padding(out, head.vocab_size)
    if logits_hook is not None:
        replaced = logits_hook(logits)
        logits = logits if replaced is None else replaced
    return vocab_parallel_logprobs(logits, target, temperature=head.temperature,
                                   with_entropy=head.with_entropy, chunk_size=head.logprob_chunk)
