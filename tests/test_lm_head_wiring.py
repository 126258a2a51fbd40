"""train/lm_head.py on a stand-in for GPTModel's last stage (one process): the output-layer
override is used for exactly one forward, returns what the fused op returns, is cleared when a
forward failed before reaching it, and refuses MTP / MuP. The real GPTModel under TP/SP/PP:
tests/test_lm_head_dist.py."""
from __future__ import annotations

import types

import pytest
import torch

from megatron_dgpo.ops import fused_lm_head_logprobs
from megatron_dgpo.train.lm_head import LMHead, fuse_next_forward, logprobs_from_output

S, B, H, V = 6, 2, 8, 20


class Layer(torch.nn.Module):
    """ColumnParallelLinear's call signature at TP = 1."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(V, H, generator=torch.Generator().manual_seed(0)))
        self.sequence_parallel = False
        self.tp_group = None

    def forward(self, input_, weight=None, runtime_gather_output=None):
        return input_ @ (self.weight if weight is None else weight).t(), None


def stand_in(**config):
    layer = Layer()
    gpt = types.SimpleNamespace(post_process=True, output_layer=layer,
                                config=types.SimpleNamespace(mtp_num_layers=None, use_mup=False, **config))
    return gpt, layer


def test_one_forward_then_logits_again():
    gpt, layer = stand_in()
    hidden = torch.randn(S, B, H)
    target = torch.randint(0, 18, (B, S))
    head = LMHead(fused=True, temperature=0.8, with_entropy=True, chunk_tokens=5, vocab_size=18)
    fuse_next_forward(gpt, target, head)
    out, _ = layer(hidden)
    lp, en = fused_lm_head_logprobs(hidden, layer.weight, target.t(), temperature=0.8, with_entropy=True,
                                    vocab_size=18)
    assert out.shape == (S, B, 2) and torch.equal(out[..., 0], lp) and torch.equal(out[..., 1], en)
    got_lp, got_en = logprobs_from_output(out.transpose(0, 1), target, head)  # as GPTModel returns it
    assert torch.equal(got_lp, lp.t()) and torch.equal(got_en, en.t())
    logits, _ = layer(hidden)  # the override is gone
    assert logits.shape == (S, B, V)

    tied = torch.randn(V, H)  # GPTModel passes the shared embedding weight when tied
    fuse_next_forward(gpt, target, head)
    out, _ = layer(hidden, weight=tied)
    lp, _ = fused_lm_head_logprobs(hidden, tied, target.t(), temperature=0.8, vocab_size=18)
    assert torch.equal(out[..., 0], lp)


def test_stale_override_is_cleared_and_shape_checked():
    gpt, layer = stand_in()
    target = torch.randint(0, V, (B, S))
    fuse_next_forward(gpt, target, LMHead(fused=True))  # its forward never reaches the layer
    fuse_next_forward(gpt, target, LMHead(fused=False))
    assert layer(torch.randn(S, B, H))[0].shape == (S, B, V)
    with pytest.raises(RuntimeError, match="fused LM head"):
        logprobs_from_output(torch.zeros(B, S, V), target, LMHead(fused=True))


@pytest.mark.parametrize("config", [{"mtp_num_layers": 1}, {"use_mup": True}])
def test_refuses_mtp_and_mup(config):
    gpt, _ = stand_in()
    gpt.config.__dict__.update(config)
    with pytest.raises(NotImplementedError, match="fused_lm_head"):
        fuse_next_forward(gpt, torch.zeros(B, S, dtype=torch.long), LMHead(fused=True))
