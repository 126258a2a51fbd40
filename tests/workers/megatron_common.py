"""Shared by tests/test_megatron_train.py (in-process reference, world of one) and the torchrun
workers: one tiny model, one deterministic batch, and `run_layout` which trains it in a layout."""
from __future__ import annotations

import math
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron_dgpo.model.config import ModelConfig  # noqa: E402

# vocab 250 padded to 256: the last 6 ids are Megatron padding, masked by the train step.
MODEL = ModelConfig(arch="qwen2", vocab_size=250, hidden_size=32, num_layers=4, num_attention_heads=4,
                    num_query_groups=2, ffn_hidden_size=48, max_position_embeddings=64,
                    qkv_bias=True, tie_word_embeddings=False, make_vocab_size_divisible_by=64)
GLOBAL_BATCH = 8
SEQ = 14
TEMPERATURE = 0.9
LR = 2e-3
STEPS = 2


def loss_config():
    from megatron_dgpo.loss import PolicyLossConfig
    return PolicyLossConfig(name="dgpo", dgpo_n=1.0, dgpo_m=2.0)


def make_batch():
    """Variable-length right-padded rows; response tokens after a random prompt length, which
    pairs of rows share."""
    from megatron_dgpo.train import RolloutBatch

    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, MODEL.vocab_size, (GLOBAL_BATCH, SEQ), generator=g)
    lengths = torch.randint(SEQ - 5, SEQ + 1, (GLOBAL_BATCH,), generator=g)
    prompt = torch.randint(2, 5, (GLOBAL_BATCH,), generator=g)
    # rows 2k and 2k + 1 share a prompt (two samples of it: the shared-prefix layout's groups)
    prompt[1::2] = prompt[0::2]
    for i in range(1, GLOBAL_BATCH, 2):
        tokens[i, :prompt[i]] = tokens[i - 1, :prompt[i]]
    pos = torch.arange(SEQ).unsqueeze(0)
    mask = (pos >= prompt.unsqueeze(1)) & (pos < lengths.unsqueeze(1))
    tokens = torch.where(pos < lengths.unsqueeze(1), tokens, torch.zeros_like(tokens))
    adv = torch.randn(GLOBAL_BATCH, generator=g)
    adv[0] = 0.0
    rollout = -torch.rand(GLOBAL_BATCH, SEQ, generator=g) * 5
    return RolloutBatch(tokens=tokens, loss_mask=mask, advantages=adv, rollout_logp=rollout, lengths=lengths)


def perturb_old_logp(logp: torch.Tensor) -> torch.Tensor:
    """Old log-probs off-policy enough to populate LN and HP."""
    g = torch.Generator().manual_seed(99)
    return logp.cpu() + 0.6 * torch.randn(logp.shape, generator=g)


def setup(tp, pp, *, vpp=None, sp=False, dist_opt=False, seed=5, model=None, attention_backend=None,
          stages=(None, None)):
    from megatron_dgpo import distributed
    from megatron_dgpo.model.builder import build_model_chunks
    from megatron_dgpo.train import build_optimizer

    distributed.initialize(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=seed,
                           virtual_pipeline_model_parallel_size=vpp)
    chunks = build_model_chunks(model or MODEL, sequence_parallel=sp, wrap_ddp=True,
                                attention_backend=attention_backend,
                                num_layers_in_first_pipeline_stage=stages[0],
                                num_layers_in_last_pipeline_stage=stages[1],
                                ddp_config=dict(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                use_distributed_optimizer=dist_opt))
    # Adam's first update is lr * g / (|g| + eps): with a tiny eps, elements whose gradient is
    # below float32 summation noise (the gradients of two layouts agree to ~5e-7 of their max
    # here) get random +-lr updates, so weights could not be compared at 1e-5. eps=1e-4 keeps
    # the update a smooth function of the gradient for this tiny model.
    opt = build_optimizer(chunks, lr=LR, clip_grad=1.0, weight_decay=0.01, adam_eps=1e-4)
    return chunks, opt


def full_state_dict(chunks):
    """Weights of a TP=1, PP=1 model as {name: tensor} (CPU float64)."""
    from megatron_dgpo.model.builder import unwrap_model

    (m,) = unwrap_model(chunks)
    return {k: v.detach().double().cpu().clone() for k, v in m.state_dict().items()
            if not k.endswith("_extra_state")}


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def compare_weights(ours: dict, ref: dict, tol=1e-5):
    if set(ours) != set(ref):
        return False, f"keys differ: {sorted(set(ours) ^ set(ref))[:5]}"
    worst = max(((rel_err(ours[k], ref[k]), k) for k in ref))
    return worst[0] <= tol, f"max rel err {worst[0]:.2e} at {worst[1]}"


def close(a, b, tol=1e-5) -> bool:
    return abs(a - b) <= tol * max(abs(b), 1e-12) or (math.isnan(a) and math.isnan(b))


def make_reference(root: str, init_from: str | None = None) -> dict:
    """The TP1/PP1/DP1 reference in this process: initial weights (dist checkpoint `init`),
    the global batch with old log-probs (`batch.pt`) and the results of STEPS steps with 4 and
    with 1 micro-batch (`ref.pt` holds the 4-micro-batch run). `init_from`: start from the
    weights of another run's `init` checkpoint (CUDA and CPU initialise from different RNGs)."""
    from megatron_dgpo.checkpoint import load_checkpoint, save_checkpoint
    from megatron_dgpo.train import forward_logprobs, train_step

    chunks, opt = setup(1, 1)
    if init_from is not None:
        load_checkpoint(init_from, chunks, opt, load_optimizer=False)
    save_checkpoint(os.path.join(root, "init"), 0, chunks, None, save_rng=False)
    init_weights = full_state_dict(chunks)
    batch = make_batch()
    logp0, ent0 = forward_logprobs(chunks, batch, micro_batch_size=2, temperature=TEMPERATURE,
                                   with_entropy=True)
    batch = batch.with_old_logp(perturb_old_logp(logp0))
    torch.save(batch, os.path.join(root, "batch.pt"))
    runs = {}
    for n_mb in (4, 1):
        if n_mb == 1:  # restart from the same initial weights
            chunks, opt = setup(1, 1)
            load_checkpoint(os.path.join(root, "init"), chunks, opt, load_optimizer=False)
        mbs = GLOBAL_BATCH // n_mb
        metrics = [train_step(chunks, opt, batch, loss_config(), micro_batch_size=mbs,
                              temperature=TEMPERATURE) for _ in range(STEPS)]
        runs[n_mb] = {"metrics": metrics, "final": full_state_dict(chunks)}
    ref = {"metrics": runs[4]["metrics"], "final": runs[4]["final"], "logp0": logp0.cpu(),
           "entropy0": ent0.cpu(), "init": init_weights}
    torch.save(ref, os.path.join(root, "ref.pt"))
    return {"dir": root, "ref": ref, "runs": runs, "batch": batch, "chunks": chunks, "opt": opt}


if __name__ == "__main__":  # python megatron_common.py DIR: write a reference for manual runs
    make_reference(sys.argv[1])
