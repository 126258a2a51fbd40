"""Shared-prompt-prefix packing (train/microbatch.py `pack="prefix"`, model/rope_positions.py):
the packed row's structure, and one process's log-probs, loss, gradients and weights against the
padded layout of the same rows (Megatron GPTModel, SDPA attention). TP/PP/DP/SP invariance of the
layout runs in tests/workers/megatron_train.py (prefix_* checks)."""
import copy

import pytest
import torch

from megatron_dgpo.train import RolloutBatch
from megatron_dgpo.train.microbatch import prompt_group_partition, prompt_groups, split


def _grouped_batch(groups=((3, 4), (5, 2), (2, 3)), width=12, vocab=60, seed=0):
    """Rows of `groups` = (prompt length, samples): each group's rows share their prompt."""
    g = torch.Generator().manual_seed(seed)
    rows, masks, lens = [], [], []
    for p, k in groups:
        prompt = torch.randint(1, vocab, (p,), generator=g)
        for _ in range(k):
            n = int(torch.randint(1, width - p + 1, (1,), generator=g))
            rows.append(torch.cat([prompt, torch.randint(1, vocab, (n,), generator=g),
                                   torch.zeros(width - p - n, dtype=torch.long)]))
            masks.append((torch.arange(width) >= p) & (torch.arange(width) < p + n))
            lens.append(p + n)
    b = len(rows)
    return RolloutBatch(tokens=torch.stack(rows), loss_mask=torch.stack(masks),
                        advantages=torch.randn(b, generator=g), old_logp=-torch.rand(b, width, generator=g),
                        lengths=torch.tensor(lens))


def test_prompt_groups_and_partition():
    batch = _grouped_batch()
    assert prompt_groups(batch) == [[0, 1, 2, 3], [4, 5], [6, 7, 8]]
    # interleaved rows are still grouped by prompt, in order of first appearance
    perm = torch.tensor([4, 0, 6, 1, 5, 2, 7, 3, 8])
    got = prompt_groups(batch.select(perm))
    assert sorted(i for grp in got for i in grp) == list(range(9)) and len(got) == 3
    assert got[0] == [0, 4] and got[1] == [1, 3, 5, 7] and got[2] == [2, 6, 8]
    one = _grouped_batch(groups=((3, 4), (5, 4)))
    assert prompt_group_partition(one, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError):
        prompt_group_partition(batch, 2)


@pytest.mark.parametrize("pad_multiple", [1, 8])
def test_every_token_sees_its_own_row(pad_multiple):
    """For every row i and position t, the packed position of (i, t) sees exactly the packed
    positions of (i, 0..t), which hold row i's tokens at positions 0..t; the prompt is stored once
    per group."""
    batch = _grouped_batch()
    (mb,) = split(batch, micro_batch_size=9, pack="prefix", pad_multiple=pad_multiple)
    p = mb.packing
    tokens, pos, seen = p.tokens[0], p.position_ids[0], ~p.attention_mask
    t_total = tokens.numel()
    assert t_total % pad_multiple == 0
    shared = sum(pl - 1 for pl, k in ((3, 4), (5, 2), (2, 3))) + sum(int(x) for x in batch.lengths) \
        - sum((pl - 1) * k for pl, k in ((3, 4), (5, 2), (2, 3)))
    assert t_total == -(-shared // pad_multiple) * pad_multiple  # each prompt once (but its last token)
    for i in range(batch.batch_size):
        ln = int(batch.lengths[i])
        where = p.gather[i, :ln]
        assert torch.equal(tokens[where], batch.tokens[i, :ln])
        assert torch.equal(pos[where], torch.arange(ln))
        for t in range(ln):
            vis = seen[where[t]].nonzero().flatten()
            assert torch.equal(vis, where[:t + 1].sort().values), (i, t)
        assert p.valid[i].tolist() == [t < ln - 1 for t in range(batch.seq_length)]
        # the packed next token of (i, t) is row i's token t + 1 wherever a prediction is used
        for t in range(ln - 1):
            assert int(tokens[where[t] + 1]) == int(batch.tokens[i, t + 1]), (i, t)
    assert mb.rope_positions is not None and torch.equal(mb.rope_positions, pos)
    with pytest.raises(ValueError, match="pack="):
        split(batch, micro_batch_size=9, pack="prefx")
    assert mb.model_inputs("cpu")["attention_mask"].shape == (1, 1, t_total, t_total)


@pytest.fixture(scope="module")
def megatron_world():
    from megatron_dgpo import distributed

    distributed.initialize(seed=3)
    yield
    distributed.destroy()


def _model_and_opt(seed):
    from megatron_dgpo import distributed
    from megatron_dgpo.model.builder import build_model_chunks
    from megatron_dgpo.model.config import ModelConfig
    from megatron_dgpo.train import build_optimizer

    distributed.initialize(seed=seed)
    cfg = ModelConfig(arch="qwen2", vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4,
                      num_query_groups=2, ffn_hidden_size=64, max_position_embeddings=32, qkv_bias=True,
                      make_vocab_size_divisible_by=32)
    chunks = build_model_chunks(cfg, wrap_ddp=True, attention_backend="sdpa",
                                ddp_config=dict(grad_reduce_in_fp32=True, overlap_grad_reduce=False))
    # eps 1e-4: Adam's first step is ~lr * sign(g) where |g| is at float32 noise; see megatron_common.setup
    opt = build_optimizer(chunks, lr=2e-3, clip_grad=1.0, adam_eps=1e-4)
    return chunks, opt


def _weights(chunks):
    return {k: v.detach().clone() for k, v in chunks[0].module.state_dict().items() if torch.is_tensor(v)}


@pytest.mark.parametrize("fused_lm_head", [False, True])
def test_prefix_layout_equals_padded_rows(megatron_world, fused_lm_head):
    from megatron_dgpo.loss import PolicyLossConfig
    from megatron_dgpo.train import forward_logprobs, train_step

    batch = _grouped_batch()
    loss = PolicyLossConfig(name="dgpo", dgpo_n=1.0, dgpo_m=2.0)
    out = {}
    for name, layout in (("padded", dict()), ("prefix", dict(max_tokens_per_micro_batch=64, pack_sequences="prefix"))):
        chunks, opt = _model_and_opt(seed=7)
        lp, _ = forward_logprobs(chunks, batch, micro_batch_size=9, fused_lm_head=fused_lm_head, **layout)
        m = train_step(chunks, opt, batch.with_old_logp(lp.cpu() - 0.3 * batch.loss_mask), loss, micro_batch_size=9,
                       fused_lm_head=fused_lm_head, **layout)
        out[name] = (lp * batch.loss_mask, m, _weights(chunks))
    (lp_a, m_a, w_a), (lp_b, m_b, w_b) = out["padded"], out["prefix"]
    torch.testing.assert_close(lp_b, lp_a, rtol=1e-5, atol=1e-6)
    assert m_b["computed_tokens"] < m_a["computed_tokens"]
    for key in ("loss", "grad_norm"):
        assert abs(m_b[key] - m_a[key]) <= 1e-5 * abs(m_a[key]) + 1e-7, (key, m_a[key], m_b[key])
    for k in w_a:
        torch.testing.assert_close(w_b[k], w_a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_wrong_positions_would_change_the_logits(megatron_world):
    """The RoPE override matters: dropping it (positions = packed index) changes a branch's
    log-probs, so the equality above checks the hook."""
    from megatron_dgpo.train import forward_logprobs
    import megatron_dgpo.train.step as step

    batch = _grouped_batch()
    chunks, _ = _model_and_opt(seed=7)
    layout = dict(max_tokens_per_micro_batch=64, pack_sequences="prefix")
    good, _ = forward_logprobs(chunks, batch, micro_batch_size=9, **layout)
    orig = step.next_forward_positions
    try:
        step.next_forward_positions = lambda model, pos: orig(model, None)
        bad, _ = forward_logprobs(chunks, batch, micro_batch_size=9, **layout)
    finally:
        step.next_forward_positions = orig
    assert not torch.allclose(bad, good, rtol=1e-5, atol=1e-6)  # the equality test's tolerance


def test_config_needs_sdpa():
    from megatron_dgpo.config import AlgoConfig, ParallelConfig, TrainConfig

    with pytest.raises(ValueError, match="share_prompt_prefix"):
        TrainConfig(algo=AlgoConfig(share_prompt_prefix=True))
    TrainConfig(algo=AlgoConfig(share_prompt_prefix=True), parallel=ParallelConfig(attention_backend="sdpa"))
