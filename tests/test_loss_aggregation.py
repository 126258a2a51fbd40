"""Split invariance: with the global normalizer, the micro-batch losses and gradients add up to
those of the whole batch, for every aggregation and every method."""
import pytest
import torch

from megatron_dgpo.loss import AGGREGATIONS, PolicyLossConfig, aggregate, policy_loss, registered_losses


def _batch(seed=0, B=8, S=11, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, S, generator=g, dtype=dtype) * 4
    old = logp + torch.randn(B, S, generator=g, dtype=dtype) * 0.4
    adv = torch.randn(B, generator=g, dtype=dtype)
    lengths = torch.randint(0, S + 1, (B,), generator=g)
    lengths[0] = 0  # an empty sequence must not count as a sequence
    start = torch.randint(0, 3, (B,), generator=g)
    pos = torch.arange(S)
    mask = (pos >= start[:, None]) & (pos < (start + lengths)[:, None])
    return logp, old, adv, mask


def _normalizer(mask, mode):
    return mask.sum() if mode == "token-mean" else (mask.sum(-1) > 0).sum()


@pytest.mark.parametrize("mode", AGGREGATIONS)
@pytest.mark.parametrize("name", registered_losses())
@pytest.mark.parametrize("splits", [[8], [1, 7], [3, 3, 2], [1] * 8])
def test_split_invariance(mode, name, splits):
    logp, old, adv, mask = _batch()
    cfg = PolicyLossConfig(name=name, aggregation=mode, norm_length=11,
                           **({"eps_low": 0.05, "eps_high": 0.05} if name == "gspo" else {}))
    full = logp.clone().requires_grad_()
    whole, _ = policy_loss(cfg, full, old, adv, mask)
    whole.backward()

    part = logp.clone().requires_grad_()
    total = 0.0
    norm = _normalizer(mask, mode)
    for idx in torch.split(torch.arange(logp.shape[0]), splits):
        loss, _ = policy_loss(cfg, part[idx], old[idx], adv[idx], mask[idx], normalizer=norm)
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(total, whole.detach(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(part.grad, full.grad, rtol=1e-12, atol=1e-15)


def test_token_mean_gradient_is_minus_a_w_over_n():
    logp, old, adv, mask = _batch(1)
    logp.requires_grad_()
    cfg = PolicyLossConfig(name="dgpo")
    loss, _ = policy_loss(cfg, logp, old, adv, mask, normalizer=1000)
    loss.backward()
    r = torch.exp(logp.detach() - old)
    a = adv[:, None].expand_as(r)
    inner = ~(((r < 0.8) & (a < 0)) | ((r > 1.2) & (a > 0)))
    want = torch.where(mask & inner, -a * r / 1000, 0.0)
    torch.testing.assert_close(torch.where(inner, logp.grad, 0.0), want)
    assert torch.all(logp.grad[~mask] == 0)


def test_aggregation_values_by_hand():
    t = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert float(aggregate(t, mask, "token-mean")) == pytest.approx(10 / 4)
    assert float(aggregate(t, mask, "seq-mean-token-mean")) == pytest.approx((2 + 4) / 2)
    assert float(aggregate(t, mask, "seq-mean-token-sum")) == pytest.approx((6 + 4) / 2)
    assert float(aggregate(t, mask, "seq-mean-token-sum-norm")) == pytest.approx(10 / (2 * 4))
    assert float(aggregate(t, mask, "seq-mean-token-sum-norm", norm_length=10)) == pytest.approx(10 / 20)
    assert float(aggregate(t, mask, "token-mean", normalizer=20)) == pytest.approx(0.5)
