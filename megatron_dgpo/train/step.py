"""One optimizer step of the policy loss through Megatron's pipeline schedules.

Normalisation (exact, independent of TP, PP, DP size and the micro-batch split):
  * Before the step, the global normaliser N is computed: the number of loss tokens (token-mean)
    or of sequences with at least one loss token (seq-* aggregations) of this rank's batch,
    all-reduced over the data-parallel group.
  * Each micro-batch's loss is `policy_loss(..., normalizer=N)` = (sum of its per-token or
    per-sequence terms) / N, so the sum over micro-batches and DP ranks is the loss of the whole
    global batch, and its gradient is the sum of the micro-batch gradients.
  * Megatron's schedule divides a returned loss by num_tokens (3-tuple) and num_microbatches,
    unless `config.calculate_per_token_loss`; DDP then averages gradients over DP unless
    `calculate_per_token_loss`. The builder sets `calculate_per_token_loss=True`, the loss
    function returns `(loss, 1, stats)` and `finalize_model_grads` is called without
    `num_tokens` (no further scaling): the gradient is the plain sum. For models built with
    `calculate_per_token_loss=False` the loss is multiplied by `num_microbatches * dp_size`
    instead, which undoes both divisions.
Logits: GPTModel returns vocab-parallel logits `[B, S, V/TP]` when `labels=None` (it transposes
its `[S, B, V/TP]` output); they are never gathered over the vocabulary: log-probs come from
`megatron_dgpo.ops.vocab_parallel_logprobs`. Vocabulary padding rows (ids >= model_cfg.vocab_size)
are masked to -inf so the distribution equals the unpadded model's. With `fused_lm_head` no
logits exist: the output layer computes log-probs from the hidden states (train/lm_head.py).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_dgpo.train import microbatch
from megatron_dgpo.train.batch import RolloutBatch, shift_left
from megatron_dgpo.model.rope_positions import next_forward_positions
from megatron_dgpo.train.lm_head import LMHead, fuse_next_forward, logprobs_from_output
from megatron_dgpo.train.microbatch import MicroBatch

__all__ = ["train_step", "forward_logprobs", "prepare_model_config"]

_SUM_KEYS = ("loss",)
_WEIGHT_OF = {"w_ln_mean": "ln_tokens", "w_hp_mean": "hp_tokens"}


def _ps():
    from megatron.core import parallel_state
    return parallel_state


def _device():
    from megatron_dgpo.distributed import device
    return device()


def _finalize_model_grads(model, num_tokens=None, **kwargs):
    """finalize_model_grads without the per-token rescaling (our losses are already normalised)."""
    from megatron.core.distributed import finalize_model_grads

    return finalize_model_grads(model, num_tokens=None, **kwargs)


def prepare_model_config(model_chunks, optimizer=None):
    """Set the schedule hooks on the shared TransformerConfig (idempotent)."""
    from megatron.core.utils import get_model_config

    config = get_model_config(model_chunks[0])
    config.finalize_model_grads_func = _finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss if optimizer is not None else None
    if dist.is_initialized() and dist.get_backend() == "gloo":
        # batched isend/irecv on gloo can mismatch messages between one pair of ranks (see
        # model/builder.py); Megatron's ordered unbatched p2p is exact.
        config.batch_p2p_comm = False
    return config


def _vocab_size_of(model_chunks) -> Optional[int]:
    from megatron_dgpo.model.builder import unwrap_model

    cfg = getattr(unwrap_model(model_chunks[0]), "model_cfg", None)
    return None if cfg is None else cfg.vocab_size


def _forward_step_func(loss_builder, head: Optional[LMHead] = None):
    """Megatron forward step: one MicroBatch in, the model's output out (vocab-parallel logits, or
    with a fused head [B, S, 1 or 2] log-prob/entropy), and `loss_builder(idx, micro_batch, out)`."""
    dev = _device()

    def forward_step(data_iterator, model):
        idx, mb = next(data_iterator)
        fuse_next_forward(model, shift_left(mb.input_ids.to(dev)), head)  # no-op unless fused (last stage)
        next_forward_positions(model, mb.rope_positions)
        out = model(**mb.model_inputs(dev))
        return out, functools.partial(loss_builder, idx, mb)

    return forward_step


def _row_logprobs(mb: MicroBatch, out: torch.Tensor, head: LMHead, logits_hook=None):
    """Prediction-aligned log-probs (and entropies) `[n, L]` of the micro-batch's rows from the
    model's output for it (padded `[n, L, ...]` or packed `[1, T, ...]`)."""
    tokens = mb.input_ids.to(out.device)
    logp, ent = logprobs_from_output(out, shift_left(tokens), head, logits_hook)
    if mb.packing is not None:
        logp = mb.packing.unpack(logp)
        ent = None if ent is None else mb.packing.unpack(ent)
    return logp, ent


def _schedule(model_chunks, micro_batches, forward_step, forward_only, config):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if _ps().get_context_parallel_world_size() != 1:
        raise NotImplementedError("context parallelism is not supported by train_step")
    shapes = {tuple(mb.input_ids.shape) for mb in micro_batches}
    # Token-budget and packed micro-batches differ in shape: pipeline stages then exchange
    # shapes before activations (Megatron's variable_seq_lengths).
    config.variable_seq_lengths = len(shapes) > 1
    if config.variable_seq_lengths and len(model_chunks) > 1:
        # Measured on CPU/gloo with megatron-core 0.16.1: the interleaved schedule's shape
        # exchange deadlocked (one stage in send_forward_recv_forward, the other exchanging shapes).
        raise NotImplementedError("token-budget / packed micro-batches of different shapes are not supported "
                                  "with virtual pipeline parallelism; use a non-interleaved pipeline")
    seq_length = max(s[1] for s in shapes)
    mbs = max(s[0] for s in shapes)
    items = list(enumerate(micro_batches))
    iters = [iter(items) for _ in model_chunks]
    fb = get_forward_backward_func()
    return fb(
        forward_step_func=forward_step,
        data_iterator=iters if len(model_chunks) > 1 else iters[0],
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=mbs,
        decoder_seq_length=seq_length,
        forward_only=forward_only,
    )


def _pad_multiple(config) -> int:
    mult = 1
    if getattr(config, "sequence_parallel", False):
        mult = config.tensor_model_parallel_size
    if getattr(config, "fp8", None):
        recipe = str(getattr(config, "fp8_recipe", "tensorwise"))
        fp8_mult = 32 if "mxfp8" in recipe else 16
        mult = mult * fp8_mult // __import__("math").gcd(mult, fp8_mult)
    return mult


def _broadcast_from_last_stage(obj):
    """Send a python object from the last pipeline stage to every stage of this pipeline."""
    ps = _ps()
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                               group=ps.get_pipeline_model_parallel_group())
    return box[0]


def _dp_sum_and_max(sums: List[float], maxes: List[float]) -> List[float]:
    """[sums over DP..., maxes over DP...] of this rank's values, in one all-gather."""
    ps = _ps()
    local = torch.tensor(sums + maxes, dtype=torch.float64, device=_device())
    if ps.get_data_parallel_world_size() == 1:
        return local.tolist()
    parts = [torch.empty_like(local) for _ in range(ps.get_data_parallel_world_size())]
    dist.all_gather(parts, local, group=ps.get_data_parallel_group())
    every = torch.stack(parts).cpu()
    n = len(sums)
    return every[:, :n].sum(0).tolist() + every[:, n:].max(0).values.tolist()


def _dp_all_reduce(t: torch.Tensor) -> torch.Tensor:
    ps = _ps()
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(t, group=ps.get_data_parallel_group())
    return t


def _policy_stats(metrics: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Per-micro-batch metrics -> {name: [numerator, denominator]} for exact global reduction
    (a vector-valued sum, e.g. a histogram of token counts, -> [n, 2])."""
    out = {}
    n = metrics.get("valid_tokens")
    for key, value in metrics.items():
        if value.numel() > 1:  # vectors are sums (counts per bin)
            v = value.detach().double().reshape(-1)
            out[key] = torch.stack([v, torch.zeros_like(v)], -1)
            continue
        v = value.detach().double().reshape(())
        if key in _SUM_KEYS or key.endswith("_tokens"):
            out[key] = torch.stack([v, v.new_zeros(())])
        else:
            w = metrics.get(_WEIGHT_OF.get(key, "valid_tokens"), n)
            w = w.detach().double().reshape(()) if w is not None else v.new_ones(())
            out[key] = torch.stack([v * w, w])
    return out


_DEFERRED = "_deferred_stats"


def _sum_stats(stats_list: List[Dict[str, torch.Tensor]]):
    """(layout [(key, rows)], this rank's [R, 2] numerator/denominator sums over its micro-batches)."""
    keys = sorted(stats_list[0]) if stats_list else []
    dev = _device()
    if not keys:
        return [], torch.zeros((0, 2), dtype=torch.float64, device=dev)
    layout = [(k, stats_list[0][k].numel() // 2) for k in keys]
    return layout, torch.stack([torch.cat([s[k].to(dev).reshape(-1, 2) for k in keys]) for s in stats_list]).sum(0)


def _divide(layout, packed: torch.Tensor) -> Dict[str, float]:
    rows, out, at = packed.cpu().tolist(), {}, 0
    for k, n in layout:
        part, at = rows[at:at + n], at + n
        if n > 1:  # a vector-valued sum: a list of floats
            out[k] = [num for num, _ in part]
            continue
        num, den = part[0]
        out[k] = num if den == 0 else (num / den if den > 0 else 0.0)  # sum-type entries: denominator 0
    return out


def _reduce_stats(stats_list: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
    """Sum micro-batch stats, all-reduce over DP, divide."""
    if not stats_list:
        return {}
    layout, packed = _sum_stats(stats_list)
    return _divide(layout, _dp_all_reduce(packed))


def reduce_deferred(steps: List[Dict[str, float]]) -> List[Dict[str, float]]:
    """Complete the metrics of `train_step(..., defer_stats=True)` calls: one all-reduce over DP
    for all of them (the same numbers as reducing each step on its own)."""
    todo = [i for i, m in enumerate(steps) if _DEFERRED in m]
    if not todo:
        return steps
    parts = [steps[i][_DEFERRED] for i in todo]
    reduced = _dp_all_reduce(torch.cat([packed for _, packed in parts]))
    out, at = list(steps), 0
    for i, (layout, packed) in zip(todo, parts):
        m = {k: v for k, v in steps[i].items() if k != _DEFERRED}
        m.update(_divide(layout, reduced[at:at + packed.shape[0]]))
        at += packed.shape[0]
        out[i] = m
    return out


def _local_totals(batch: RolloutBatch) -> List[float]:
    mask_s = shift_left(batch.loss_mask, False)
    return [float(mask_s.sum()), float((mask_s.sum(-1) > 0).sum()), float(batch.lengths.sum())]


def dp_totals_of(model_chunks, shares: Sequence[RolloutBatch], *, max_tokens_per_micro_batch: int = 0,
                 pack_sequences: microbatch.PackMode = False) -> List[float]:
    """`train_step`'s `dp_totals` from every DP rank's share (in DP rank order), without a
    collective."""
    from megatron.core.utils import get_model_config

    mult = _pad_multiple(get_model_config(model_chunks[0]))
    sums = [sum(x) for x in zip(*(_local_totals(b) for b in shares))]
    n = max(microbatch.local_count(b, max_tokens=max_tokens_per_micro_batch, pack=pack_sequences,
                                   pad_multiple=mult) for b in shares)
    return sums + [float(n)]


def _check_batch_finite(batch: RolloutBatch) -> None:
    mask = batch.loss_mask
    adv = batch.advantages if batch.advantages.dim() == 2 else batch.advantages[:, None].expand_as(mask)
    if not bool(torch.isfinite(adv[mask]).all()):
        raise ValueError("train_step: batch.advantages is not finite on some loss tokens")


def _grads_finite(model_chunks) -> bool:
    """True when every gradient of every rank is finite. A sum is non-finite iff an element is,
    and needs no memory beyond the reduction.

    After Megatron's DDP has all-reduced the gradients (no distributed optimizer), every DP
    replica holds the same sums, and an Inf or NaN on any rank is one in the sum, so only the
    model-parallel group (TP x PP: different shards) has to agree: for a DP-only layout, no
    collective. Reduce-scattered gradients (distributed optimizer) are checked over all ranks."""
    bad = torch.zeros((), dtype=torch.float32, device=_device())
    all_reduced = True
    for chunk in model_chunks:
        ddp_config = getattr(chunk, "ddp_config", None)
        all_reduced &= ddp_config is not None and not getattr(ddp_config, "use_distributed_optimizer", False)
        buffers = list(getattr(chunk, "buffers", None) or []) + list(getattr(chunk, "expert_parallel_buffers", None) or [])
        grads = [b.grad_data for b in buffers] or [
            getattr(p, "main_grad", p.grad) for p in chunk.parameters() if getattr(p, "main_grad", p.grad) is not None]
        for g in grads:
            bad = torch.maximum(bad, (~torch.isfinite(torch.sum(g, dtype=torch.float32))).float())
    if dist.is_available() and dist.is_initialized():
        group = _ps().get_model_parallel_group() if all_reduced else None
        if dist.get_world_size(group) > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
    return float(bad) == 0.0


def train_step(model_chunks: List[torch.nn.Module], optimizer, batch: RolloutBatch, loss_cfg, *,
               micro_batch_size: int, temperature: float = 1.0, compute_entropy: bool = True,
               vocab_size: Optional[int] = None, chunk_size: Optional[int] = None,
               lr: Optional[float] = None,
               logits_hook: Optional[Callable[[int, torch.Tensor], None]] = None,
               max_tokens_per_micro_batch: int = 0, pack_sequences: microbatch.PackMode = False,
               pad_token_id: int = 0, fused_lm_head: bool = False,
               lm_head_chunk_tokens: Optional[int] = None,
               dp_totals: Optional[Sequence[float]] = None, defer_stats: bool = False) -> Dict[str, float]:
    """Forward + backward of the policy loss over `batch` (this DP rank's share) and one
    optimizer step. Returns metrics reduced over DP, identical on every rank.

    `dp_totals`: a caller that holds every DP rank's share (the RL loop does) passes their
    totals, `[loss tokens, sequences with a loss token, tokens, token-budget micro-batches of the
    largest share]` (`dp_totals_of`), and the step makes no collective before the forward.
    `defer_stats` (no pipeline parallelism): the loss metrics come back unreduced, for
    `reduce_deferred` to reduce the metrics of several steps in one all-reduce.

    Every rank of a model-parallel group (TP x PP) must pass the same `batch`; different DP ranks
    pass their own shares (`RolloutBatch.dp_shard`). `batch.old_logp=None` means on-policy
    (old = current, detached). The sequence dimension is padded to what SP / FP8 need.
    `logits_hook(micro_batch_index, logits)` is called on the last stage with the masked
    vocab-parallel logits; if it returns a tensor, that is used instead (tests return a clone
    with a gradient hook to capture d loss / d logits). `fused_lm_head`: log-probs straight from
    the hidden states (train/lm_head.py, no logits; `logits_hook` needs the materialised path).
    `max_tokens_per_micro_batch` > 0 cuts the batch into token-budget micro-batches instead of
    `micro_batch_size` rows, `pack_sequences=True` packs each micro-batch into one THD row,
    `pack_sequences="prefix"` into one row in which the samples of a prompt share it
    (`train.microbatch`; packing needs attention_backend sdpa or te, "prefix" sdpa).

    Metrics: the policy_loss metrics (loss = global loss, *_tokens = global counts, the rest
    token-weighted means), `entropy`, `rollout_logp_abs_diff` / `rollout_logp_diff` (train minus
    rollout, when rollout_logp is given), `grad_norm`, `update_successful`, `lr`,
    `num_microbatches`, `tokens` (non-pad tokens, global), `computed_tokens` (tokens the model
    ran on, padding included, global), `step_time_s`, `tokens_per_s` (tokens / step_time_s).
    """
    from megatron_dgpo.loss import policy_loss

    t0 = time.perf_counter()
    ps = _ps()
    config = prepare_model_config(model_chunks, optimizer)
    if loss_cfg.aggregation == "seq-mean-token-sum-norm" and loss_cfg.norm_length is None:
        # Dr.GRPO's constant: the batch's own length, not the layout-dependent padded length.
        loss_cfg = dataclasses.replace(loss_cfg, norm_length=batch.seq_length)
    dp = ps.get_data_parallel_world_size()
    dev = _device()
    # One DP collective before the forward: the loss normaliser's global counts and the number of
    # token-budget micro-batches every rank runs (the largest local count).
    layout = dict(max_tokens=max_tokens_per_micro_batch, pack=pack_sequences, pad_multiple=_pad_multiple(config))
    if dp_totals is not None:
        counts = [float(x) for x in dp_totals]
    else:
        counts = _dp_sum_and_max(_local_totals(batch), [float(microbatch.local_count(batch, **layout))])
    micro_batches = microbatch.split(batch, micro_batch_size=micro_batch_size, pad_token_id=pad_token_id,
                                     num_bins=int(counts[3]) if max_tokens_per_micro_batch > 0 else None, **layout)
    n_mb = len(micro_batches)
    if vocab_size is None:
        vocab_size = _vocab_size_of(model_chunks)
    if lr is not None:
        from megatron_dgpo.train.optimizer import set_lr
        set_lr(optimizer, lr)
    seq_mode = loss_cfg.aggregation != "token-mean"
    normalizer = float(counts[1] if seq_mode else counts[0])
    scale = 1.0 if getattr(config, "calculate_per_token_loss", False) else float(n_mb * dp)

    # Non-finite advantages are bad input (an error). Log-probs come from the model (old ones
    # from a forward pass): when they are non-finite the loss is, and the update is skipped.
    _check_batch_finite(batch)
    model_loss_cfg = dataclasses.replace(loss_cfg, check_finite=False)

    if fused_lm_head and logits_hook is not None:
        raise ValueError("train_step: logits_hook needs the materialised LM head (fused_lm_head=False)")
    head = LMHead(fused=fused_lm_head, temperature=temperature, with_entropy=compute_entropy,
                  chunk_tokens=lm_head_chunk_tokens, logprob_chunk=chunk_size, vocab_size=vocab_size)

    def loss_builder(idx, micro: MicroBatch, out):
        hook = functools.partial(logits_hook, idx) if logits_hook is not None else None
        logp, ent = _row_logprobs(micro, out, head, hook)
        mb = micro.rows
        mask = shift_left(mb.loss_mask, False).to(dev)
        old = logp.detach() if mb.old_logp is None else shift_left(mb.old_logp).to(dev)
        adv = mb.advantages.to(dev)
        if adv.dim() == 2:
            adv = shift_left(adv)
        loss, metrics = policy_loss(model_loss_cfg, logp, old, adv, mask, normalizer=normalizer)
        stats = _policy_stats(metrics)
        # a sum (denominator 0), reduced with the other stats: the global count of computed tokens
        stats["computed_tokens"] = torch.tensor([float(micro.computed_tokens), 0.0], dtype=torch.float64, device=dev)
        maskd = mask.double()
        n = maskd.sum()
        if ent is not None:
            stats["entropy"] = torch.stack([(ent.detach().double() * maskd).sum(), n])
        if mb.rollout_logp is not None:
            diff = (logp.detach().double() - shift_left(mb.rollout_logp).to(dev).double()) * maskd
            stats["rollout_logp_abs_diff"] = torch.stack([diff.abs().sum(), n])
            stats["rollout_logp_diff"] = torch.stack([diff.sum(), n])
        return loss * scale, torch.ones((), dtype=torch.int, device=dev), stats

    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    stats_list = _schedule(model_chunks, micro_batches, _forward_step_func(loss_builder, head),
                           forward_only=False, config=config)
    if normalizer == 0:  # no loss token anywhere: Adam's momentum would still move the weights
        update_successful, grad_norm = True, 0.0
    elif _grads_finite(model_chunks):
        update_successful, grad_norm, _ = optimizer.step()
    else:  # a non-finite loss or gradient anywhere: skip the update on every rank
        update_successful, grad_norm = False, float("nan")
        for chunk in model_chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()

    deferred = defer_stats and ps.get_pipeline_model_parallel_world_size() == 1
    if deferred:
        metrics = {_DEFERRED: _sum_stats(stats_list)}
    else:
        metrics = _reduce_stats(stats_list) if ps.is_pipeline_last_stage(ignore_virtual=True) else None
        metrics = _broadcast_from_last_stage(metrics)
    elapsed = time.perf_counter() - t0
    metrics.update(
        grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
        update_successful=float(bool(update_successful)),
        lr=float(optimizer.param_groups[0]["lr"]),
        num_microbatches=float(n_mb),
        normalizer=normalizer,
        tokens=float(counts[2]),
        step_time_s=elapsed,
        tokens_per_s=float(counts[2]) / max(elapsed, 1e-9),
    )
    return metrics


@torch.no_grad()
def forward_logprobs(model_chunks: List[torch.nn.Module], batch: RolloutBatch, *, micro_batch_size: int,
                     temperature: float = 1.0, with_entropy: bool = False,
                     vocab_size: Optional[int] = None, chunk_size: Optional[int] = None,
                     max_tokens_per_micro_batch: int = 0, pack_sequences: microbatch.PackMode = False,
                     pad_token_id: int = 0, fused_lm_head: bool = False,
                     lm_head_chunk_tokens: Optional[int] = None):
    """Token-aligned log-probs `[B, S]` (and entropies) of `batch.tokens` without gradient.

    Runs the same pipeline schedule (forward only). Position 0 gets 0. The result is float32 on
    this rank's device and identical on every rank of the model-parallel group (broadcast from
    the last pipeline stage). Use it for old log-probs: `batch.with_old_logp(logp)`.
    Micro-batch layouts as in `train_step`; rows are returned in `batch`'s order.
    """
    ps = _ps()
    config = prepare_model_config(model_chunks, None)
    s0 = batch.seq_length
    mult = _pad_multiple(config)
    micro_batches = microbatch.split(batch, micro_batch_size=micro_batch_size, max_tokens=max_tokens_per_micro_batch,
                                     pack=pack_sequences, pad_multiple=mult, pad_token_id=pad_token_id)
    dev = _device()
    if vocab_size is None:
        vocab_size = _vocab_size_of(model_chunks)
    was_training = [c.training for c in model_chunks]
    for c in model_chunks:
        c.eval()

    head = LMHead(fused=fused_lm_head, temperature=temperature, with_entropy=with_entropy,
                  chunk_tokens=lm_head_chunk_tokens, logprob_chunk=chunk_size, vocab_size=vocab_size)

    def loss_builder(idx, micro: MicroBatch, model_out):
        logp, ent = _row_logprobs(micro, model_out, head)
        out = {"logp": logp.float()}
        if ent is not None:
            out["entropy"] = ent.float()
        return torch.zeros((), device=dev), torch.ones((), dtype=torch.int, device=dev), out

    try:
        outputs = _schedule(model_chunks, micro_batches, _forward_step_func(loss_builder, head),
                            forward_only=True, config=config)
    finally:
        for c, t in zip(model_chunks, was_training):
            c.train(t)

    b, s = batch.batch_size, microbatch.round_up(s0, mult)
    names = ["logp"] + (["entropy"] if with_entropy else [])
    result = {}
    for name in names:
        shifted = torch.zeros((b, s), dtype=torch.float32, device=dev)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            for mb, o in zip(micro_batches, outputs):  # back to the batch's row order
                if mb.index.numel():
                    width = min(o[name].shape[1], s)
                    shifted[mb.index.to(dev), :width] = o[name][:, :width]
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(shifted, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        aligned = torch.zeros_like(shifted)
        aligned[:, 1:] = shifted[:, :-1]
        result[name] = aligned[:, :s0]
    return result["logp"], result.get("entropy")
