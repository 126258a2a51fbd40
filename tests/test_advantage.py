import math

import pytest
import torch

from megatron_dgpo.advantage import group_advantages, tis_weights


def _hand(rewards, G, scale, eps, unbiased=True):
    out = []
    for s in range(0, len(rewards), G):
        grp = rewards[s:s + G]
        m = sum(grp) / G
        var = sum((x - m) ** 2 for x in grp) / ((G - 1) if unbiased else G)
        sd = math.sqrt(var)
        out += [(x - m) / (sd + eps) if scale == "std" else x - m for x in grp]
    return out


R = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.25, 0.0, 2.0]


@pytest.mark.parametrize("scale", ["std", "none"])
@pytest.mark.parametrize("unbiased", [True, False])
def test_against_hand_computed(scale, unbiased):
    adv, keep, stats = group_advantages(R, 4, scale=scale, eps=1e-6, unbiased_std=unbiased, dtype=torch.float64)
    expect = torch.tensor(_hand(R, 4, scale, 1e-6, unbiased), dtype=torch.float64)
    torch.testing.assert_close(adv, expect, rtol=0, atol=1e-12)
    assert keep.all() and keep.dtype == torch.bool
    assert stats["adv/zero_variance_groups"] == 1 and stats["adv/num_groups"] == 3


def test_known_values():
    # group [1,0,0,1]: mean .5, unbiased std sqrt(1/3)
    adv, _, _ = group_advantages([1, 0, 0, 1], 4, eps=0.0, dtype=torch.float64)
    s = math.sqrt(1 / 3)
    torch.testing.assert_close(adv, torch.tensor([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s], dtype=torch.float64))
    adv, _, _ = group_advantages([1, 0, 0, 1], 4, scale="none", dtype=torch.float64)
    assert adv.tolist() == [0.5, -0.5, -0.5, 0.5]


def test_filter_zero_variance():
    adv, keep, stats = group_advantages(R, 4, filter_zero_variance=True)
    assert keep.tolist() == [True] * 4 + [False] * 4 + [True] * 4
    assert (adv[4:8] == 0).all()
    assert stats["adv/kept_samples"] == 8 and stats["adv/zero_variance_frac"] == pytest.approx(1 / 3)
    assert adv.dtype == torch.float32


def test_errors():
    with pytest.raises(ValueError):
        group_advantages([1.0, 2.0, 3.0], 2)
    with pytest.raises(ValueError):
        group_advantages([1.0, 2.0], 1)
    adv, _, _ = group_advantages([1.0, 2.0], 1, scale="none")
    assert adv.tolist() == [0.0, 0.0]


def test_tis_weights():
    train = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    roll = torch.tensor([[-1.5, -1.0, -0.5]], dtype=torch.float64)
    w = tis_weights(train, roll, cap=1.5)
    expect = torch.tensor([[min(math.exp(0.5), 1.5), math.exp(-1.0), 1.0]], dtype=torch.float64)
    torch.testing.assert_close(w, expect, rtol=0, atol=1e-15)
    assert not w.requires_grad
    assert tis_weights(train, roll, cap=None)[0, 0].item() == pytest.approx(math.exp(0.5))
    wb = tis_weights(train.detach().bfloat16(), roll.bfloat16(), cap=10.0)
    assert wb.dtype == torch.float32
    with pytest.raises(ValueError):
        tis_weights(train, roll[:, :2])
