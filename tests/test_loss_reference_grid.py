"""P1 (autograd W_logp == the tables) against the independent float64 reference, and the
numerical grid of dgpo-math.md."""
import math

import numpy as np
import pytest
import torch

from megatron_dgpo.loss import PolicyLossConfig, policy_loss
from tests.loss_reference import gspo_token_weight, w_logp, w_p

METHODS = ["dgpo", "grpo", "cispo", "gppo", "ce_gppo", "aspo"]


def autograd_weights(cfg, log_r, adv, old_logp=None, dtype=torch.float64):
    """-dLoss/dlogp * N / A per token for token-mean: exactly W_logp."""
    log_r = torch.as_tensor(log_r, dtype=dtype).reshape(1, -1)
    old = torch.full_like(log_r, -2.0) if old_logp is None else torch.as_tensor(old_logp, dtype=dtype).reshape(1, -1)
    adv = torch.as_tensor(adv, dtype=dtype).reshape(1, -1)
    logp = (old + log_r).requires_grad_()
    mask = torch.ones_like(logp, dtype=torch.bool)
    loss, metrics = policy_loss(cfg, logp, old, adv, mask)
    loss.backward()
    n = logp.numel()
    return (-logp.grad * n / adv).reshape(-1), metrics


def _kw(cfg):
    return dict(eps_low=cfg.eps_low, eps_high=cfg.eps_high, n=cfg.dgpo_n, m=cfg.dgpo_m,
                c=cfg.dual_clip_c, beta1=cfg.ce_beta1, beta2=cfg.ce_beta2)


def _away_from_boundaries(r, cfg, rel=1e-3):
    edges = [cfg.lower, cfg.upper, 1.0]
    if cfg.dual_clip_c is not None:
        edges += [cfg.dual_clip_c, 1.0 / cfg.dual_clip_c]
    return all(abs(r - e) > rel * e for e in edges)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("n,m", [(1.0, 2.0), (2.0, 2.0), (0.5, 3.0)])
def test_p1_autograd_weight_matches_table(name, n, m):
    cfg = PolicyLossConfig(name=name, dgpo_n=n, dgpo_m=m)
    rng = np.random.default_rng(0)
    log_r = rng.uniform(-6, 6, size=400)
    log_r = np.concatenate([log_r, np.log([0.5, 0.79, 0.81, 1.19, 1.21, 2.5, 3.5, 9, 11, 0.3])])
    adv = rng.choice([-1.5, -0.3, 0.7, 2.0], size=log_r.size)
    keep = [i for i, lr in enumerate(log_r) if _away_from_boundaries(math.exp(lr), cfg)]
    log_r, adv = log_r[keep], adv[keep]
    got, _ = autograd_weights(cfg, log_r, adv)
    want = torch.tensor([w_logp(name, math.exp(lr), a, **_kw(cfg)) for lr, a in zip(log_r, adv)], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-5)])
@pytest.mark.parametrize("name", METHODS)
def test_p1_float32(name, dtype, rtol):
    cfg = PolicyLossConfig(name=name)
    rng = np.random.default_rng(1)
    log_r = rng.uniform(-3, 3, size=300)
    adv = rng.choice([-1.0, 1.0], size=log_r.size)
    keep = [i for i, lr in enumerate(log_r) if _away_from_boundaries(math.exp(lr), cfg, rel=1e-2)]
    log_r, adv = log_r[keep], adv[keep]
    got, _ = autograd_weights(cfg, log_r, adv, dtype=dtype)
    want = torch.tensor([w_logp(name, math.exp(lr), a, **_kw(cfg)) for lr, a in zip(log_r, adv)], dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=1e-6)


def test_p1_gspo_sequence_weight():
    cfg = PolicyLossConfig(name="gspo", eps_low=0.05, eps_high=0.05, aggregation="token-mean")
    rng = np.random.default_rng(2)
    B, S = 6, 5
    log_r = rng.normal(0, 0.08, size=(B, S))
    adv = rng.choice([-1.0, 1.0], size=B)
    logp = torch.tensor(log_r - 1.0, requires_grad=True)
    old = torch.full((B, S), -1.0, dtype=torch.float64)
    mask = torch.ones(B, S, dtype=torch.bool)
    loss, _ = policy_loss(cfg, logp, old, torch.tensor(adv), mask)
    loss.backward()
    for i in range(B):
        w = gspo_token_weight(list(log_r[i]), adv[i], cfg.eps_low, cfg.eps_high)
        torch.testing.assert_close(-logp.grad[i] * B * S / adv[i], torch.full((S,), w, dtype=torch.float64))


# dgpo-math.md's grid: pi_old = 0.01, eps 0.2, n = 1, m = 2, beta1 = 0.5; (W_logp, W_p) per method.
GRID = {
    (-1.0, 1e-4): {"grpo": (0, 0), "cispo": (0.8, 8e5), "gppo": (0.8, 8e5), "ce_gppo": (0.4, 4e5),
                   "aspo": (0, 0), "dgpo": (1.25e-8, 0.0125)},
    (1.0, 10.0): {"grpo": (0, 0), "cispo": (1.2, 12), "gppo": (1.2, 12), "ce_gppo": (1.2, 12),
                  "aspo": (0, 0), "dgpo": (3.46, 34.6)},
}


@pytest.mark.parametrize("point", list(GRID))
@pytest.mark.parametrize("name", METHODS)
def test_paper_grid(point, name):
    a, r = point
    pi_old = 0.01
    cfg = PolicyLossConfig(name=name, ce_beta1=0.5)
    got, _ = autograd_weights(cfg, [math.log(r)], [a], old_logp=[math.log(pi_old)])
    got_wlogp = float(got[0])
    got_wp = got_wlogp / (r * pi_old)
    want_wlogp, want_wp = GRID[point][name]
    ref_wlogp = w_logp(name, r, a, c=cfg.dual_clip_c, beta1=0.5)
    # The reference and the implementation agree to 1e-6 relative; the doc's printed numbers
    # (3.46 / 34.6) are rounded to three digits.
    assert got_wlogp == pytest.approx(ref_wlogp, rel=1e-6, abs=1e-300)
    assert got_wp == pytest.approx(w_p(name, r, a, pi_old, c=cfg.dual_clip_c, beta1=0.5), rel=1e-6, abs=1e-300)
    doc_rel = 1e-6 if name != "dgpo" or a < 0 else 2e-3
    assert got_wlogp == pytest.approx(want_wlogp, rel=doc_rel, abs=1e-300)
    assert got_wp == pytest.approx(want_wp, rel=doc_rel, abs=1e-300)
