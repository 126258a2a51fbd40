"""Token-budget / packed micro-batch planning (train/microbatch.py) and the SDPA core attention
(model/attention.py) against Megatron's local DotProductAttention, in one process.

The multi-process exactness of the train step in these layouts (TP/PP/DP/SP) is in
tests/test_megatron_train.py (budget_* and packed_* checks)."""
import pytest
import torch

from megatron_dgpo.train import RolloutBatch
from megatron_dgpo.train.microbatch import dp_partition, first_fit_decreasing, round_up, split


def _batch(lengths, width=None, prompt=2):
    g = torch.Generator().manual_seed(0)
    width = width or max(lengths)
    b = len(lengths)
    lengths = torch.tensor(lengths)
    pos = torch.arange(width)[None, :]
    tokens = torch.where(pos < lengths[:, None], torch.randint(1, 50, (b, width), generator=g), 0)
    mask = (pos >= prompt) & (pos < lengths[:, None])
    return RolloutBatch(tokens=tokens, loss_mask=mask, advantages=torch.randn(b, generator=g),
                        old_logp=-torch.rand(b, width, generator=g), lengths=lengths)


def test_first_fit_decreasing_respects_budget_and_covers_all():
    lengths = [9, 3, 14, 7, 7, 2, 11, 5]
    cost = lambda n, longest, total: n * longest  # noqa: E731
    bins = first_fit_decreasing(lengths, 20, cost)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    for b in bins:
        assert len(b) == 1 or cost(len(b), max(lengths[i] for i in b), 0) <= 20
    # a sequence over the budget gets a bin of its own
    assert [0] in first_fit_decreasing([30, 2, 2], 20, cost)


def test_dp_partition_equal_counts_balanced_tokens():
    lengths = [100, 1, 1, 1, 90, 2, 3, 80]
    shares = dp_partition(lengths, 2)
    assert [len(s) for s in shares] == [4, 4]
    assert sorted(i for s in shares for i in s) == list(range(8))
    tokens = [sum(lengths[i] for i in s) for s in shares]
    assert max(tokens) - min(tokens) <= 100  # contiguous halves would be 103 vs 175
    assert abs(tokens[0] - tokens[1]) < abs(sum(lengths[:4]) - sum(lengths[4:]))
    with pytest.raises(ValueError):
        dp_partition([1, 2, 3], 2)


def test_token_budget_micro_batches_pad_only_to_their_own_longest():
    batch = _batch([12, 3, 4, 11, 2, 5], width=16)
    mbs = split(batch, micro_batch_size=2, max_tokens=24, pad_multiple=2)
    seen = torch.cat([mb.index for mb in mbs]).sort().values
    assert seen.tolist() == list(range(6))
    for mb in mbs:
        n, width = mb.rows.tokens.shape
        assert width == round_up(int(batch.lengths[mb.index].max()), 2) and n * width <= 24 or n == 1
        torch.testing.assert_close(mb.rows.tokens, batch.tokens[mb.index, :width])
        torch.testing.assert_close(mb.rows.loss_mask, batch.loss_mask[mb.index, :width])
    assert sum(mb.computed_tokens for mb in mbs) < batch.tokens.numel()


def test_packed_rows_layout_and_unpack():
    batch = _batch([5, 3, 4], width=8)
    (mb,) = split(batch, micro_batch_size=3, pack=True, pad_multiple=4)
    p = mb.packing
    assert p.tokens.shape == (1, 12) and p.cu_seqlens.tolist() == [0, 5, 8, 12] and p.max_seqlen == 5
    assert p.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]
    # a value per packed position p (= p), unpacked to row i, position t: start_i + t where the
    # next token is in the same sequence, 0 elsewhere
    rows = p.unpack(torch.arange(12.0)[None])
    starts = [0, 5, 8]
    for i, ln in enumerate([5, 3, 4]):
        want = [float(starts[i] + t) if t < ln - 1 else 0.0 for t in range(rows.shape[1])]
        assert rows[i].tolist() == want
    # padding to the SP multiple is its own segment: a 12-token pack with multiple 8 gets 4 more
    (mb8,) = split(batch, micro_batch_size=3, pack=True, pad_multiple=8)
    assert mb8.packing.cu_seqlens.tolist() == [0, 5, 8, 12, 16]


def test_equalised_micro_batch_count_splits_or_adds_empty(monkeypatch):
    import megatron_dgpo.train.microbatch as M

    batch = _batch([4, 4, 3, 3], width=4)
    monkeypatch.setattr(M, "_dp_max", lambda n: 3)
    mbs = split(batch, micro_batch_size=1, max_tokens=100)
    assert len(mbs) == 3 and sorted(torch.cat([m.index for m in mbs]).tolist()) == [0, 1, 2, 3]
    monkeypatch.setattr(M, "_dp_max", lambda n: 5)
    single = _batch([4, 3], width=4)
    mbs = split(single, micro_batch_size=1, max_tokens=100)
    assert len(mbs) == 5 and sum(m.index.numel() for m in mbs) == 2
    assert not any(bool(m.rows.loss_mask.any()) for m in mbs if m.index.numel() == 0)


def test_loss_mask_beyond_length_is_rejected():
    batch = _batch([3, 4], width=6)
    batch.loss_mask[0, 5] = True
    with pytest.raises(ValueError, match="beyond"):
        split(batch, micro_batch_size=1, max_tokens=10)


# ---- SDPA core attention vs Megatron's DotProductAttention -------------------------------------

@pytest.fixture(scope="module")
def megatron_world():
    from megatron_dgpo import distributed

    distributed.initialize(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, seed=3)
    yield
    distributed.destroy()


def _attn_config():
    from megatron_dgpo.model.builder import transformer_config
    from megatron_dgpo.model.config import ModelConfig

    cfg = ModelConfig(arch="qwen2", vocab_size=64, hidden_size=32, num_layers=1, num_attention_heads=4,
                      num_query_groups=2, ffn_hidden_size=48, max_position_embeddings=64)
    return transformer_config(cfg)


def _modules(config):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_dgpo.model.attention import SDPAttention

    kw = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return DotProductAttention(**kw), SDPAttention(**kw)


def test_sdpa_matches_local_attention_on_padded_rows(megatron_world):
    config = _attn_config()
    local, sdpa = _modules(config)
    g = torch.Generator().manual_seed(1)
    s, b = 7, 3
    q = torch.randn(s, b, 4, 8, generator=g, dtype=torch.float64).float().requires_grad_()
    k = torch.randn(s, b, 2, 8, generator=g).requires_grad_()
    v = torch.randn(s, b, 2, 8, generator=g).requires_grad_()
    want = local(q, k, v, None)
    got = sdpa(q, k, v, None)
    assert got.shape == want.shape == (s, b, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    gw = torch.autograd.grad(want.square().sum(), (q, k, v))
    gg = torch.autograd.grad(got.square().sum(), (q, k, v))
    for a, c in zip(gg, gw):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_sdpa_packed_equals_each_sequence_alone(megatron_world):
    """THD: one packed row [T, heads, d] with cu_seqlens == every sequence through the local
    attention on its own (block-diagonal causal), values and gradients."""
    from megatron.core.packed_seq_params import PackedSeqParams

    config = _attn_config()
    local, sdpa = _modules(config)
    lens = [5, 1, 3, 4]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    t = sum(lens)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(t, 4, 8, generator=g).requires_grad_()
    k = torch.randn(t, 2, 8, generator=g).requires_grad_()
    v = torch.randn(t, 2, 8, generator=g).requires_grad_()
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lens),
                             max_seqlen_kv=max(lens))
    got = sdpa(q, k, v, None, packed_seq_params=params)
    parts = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        parts.append(local(q[a:b, None], k[a:b, None], v[a:b, None], None)[:, 0])
    want = torch.cat(parts, 0)
    torch.testing.assert_close(got.reshape(t, -1), want, rtol=1e-5, atol=1e-6)
    gw = torch.autograd.grad(want.square().sum(), (q, k, v))
    gg = torch.autograd.grad(got.square().sum(), (q, k, v))
    for a, c in zip(gg, gw):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_block_causal_mask():
    from megatron_dgpo.model.attention import block_causal_mask

    m = block_causal_mask(torch.tensor([0, 2, 5]), 5, "cpu")
    want = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]).bool()
    assert torch.equal(m, want)


def test_attention_backend_config_checks():
    from megatron_dgpo.config import ParallelConfig, TrainConfig, AlgoConfig
    from megatron_dgpo.model.builder import resolve_attention_backend

    assert resolve_attention_backend("local", "auto") == "local"
    assert resolve_attention_backend("transformer_engine", "auto") == "te"
    with pytest.raises(ValueError, match="parallel.attention_backend"):
        ParallelConfig(attention_backend="sdpa", transformer_impl="transformer_engine")
    with pytest.raises(ValueError, match="pack_sequences"):
        TrainConfig(algo=AlgoConfig(pack_sequences=True))
    TrainConfig(algo=AlgoConfig(pack_sequences=True), parallel=ParallelConfig(attention_backend="sdpa"))
