"""Properties P2-P10 of dgpo-math.md, checked on the implementation's autograd gradients."""
import math

import numpy as np
import pytest
import torch

from megatron_dgpo.loss import PolicyLossConfig, policy_loss, registered_losses
from tests.test_loss_reference_grid import autograd_weights

PI_OLD = 0.01
LOG_OLD = math.log(PI_OLD)


def weights(cfg, r, a):
    """(W_logp, W_p, metrics) at ratios r for advantage a (scalar), with pi_old = 0.01."""
    r = np.asarray(r, dtype=np.float64)
    w, metrics = autograd_weights(cfg, np.log(r), np.full(r.shape, a), old_logp=np.full(r.shape, LOG_OLD))
    w = w.numpy()
    return w, w / (r * PI_OLD), metrics


def values(cfg, r, a):
    """Per-token surrogate value s = loss_t / (-A) (token-mean with N = 1 per call)."""
    out = []
    for ri in np.atleast_1d(r):
        logp = torch.tensor([[LOG_OLD + math.log(ri)]], dtype=torch.float64)
        loss, _ = policy_loss(cfg, logp, torch.tensor([[LOG_OLD]], dtype=torch.float64),
                              torch.tensor([a], dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool))
        out.append(float(loss) / -a)
    return np.array(out)


LEFT = np.logspace(-8, math.log10(0.79), 40)  # r < L
RIGHT = np.logspace(math.log10(1.21), 8, 40)  # r > U


def test_p2_soft_clipping_diverges():
    for name in ("cispo", "gppo"):
        _, wp, _ = weights(PolicyLossConfig(name=name), LEFT, -1.0)
        np.testing.assert_allclose(wp * LEFT * PI_OLD, 0.8, rtol=1e-12)  # W_p = L / pi
        assert np.all(np.diff(wp) < 0) and wp[0] > 1e9  # unbounded as pi -> 0
    r = np.logspace(math.log10(1 / 3) + 0.01, math.log10(1.19), 20)
    _, wp, _ = weights(PolicyLossConfig(name="aspo"), r, 1.0)
    pi = r * PI_OLD
    np.testing.assert_allclose(wp, PI_OLD / pi ** 2, rtol=1e-12)


def test_p3_grpo_hard_clipping():
    cfg = PolicyLossConfig(name="grpo")
    assert np.all(weights(cfg, LEFT, -1.0)[1] == 0)
    assert np.all(weights(cfg, RIGHT, 1.0)[1] == 0)
    assert np.all(weights(cfg, [3.5, 10, 1e4], -1.0)[1] == 0)  # dual clip, c = 3
    for edge, a in ((0.8, -1.0), (1.2, 1.0), (3.0, -1.0)):
        inside = edge * (1 + 1e-9) if edge == 0.8 else edge * (1 - 1e-9)
        outside = edge * (1 - 1e-9) if edge == 0.8 else edge * (1 + 1e-9)
        w_in, _, _ = weights(cfg, [inside], a)
        w_out, _, _ = weights(cfg, [outside], a)
        assert w_in[0] == pytest.approx(edge, rel=1e-6) and w_out[0] == 0  # a jump at the edge


@pytest.mark.parametrize("n,m", [(1, 2), (2, 2), (0.5, 4)])
def test_p4_dgpo_continuity(n, m):
    cfg = PolicyLossConfig(name="dgpo", dgpo_n=n, dgpo_m=m)
    for edge, a in ((0.8, -1.0), (1.2, 1.0)):
        r = np.array([edge * (1 - 1e-9), edge, edge * (1 + 1e-9)])
        wl, wp, _ = weights(cfg, r, a)
        np.testing.assert_allclose(wp, 1 / PI_OLD, rtol=1e-7)
        np.testing.assert_allclose(wl, edge, rtol=1e-7)
        v = values(cfg, r, a)
        np.testing.assert_allclose(v, edge, rtol=1e-7)


@pytest.mark.parametrize("n,m", [(1, 2), (2, 2), (3, 1), (0, 5)])
@pytest.mark.parametrize("a", [-1.0, 1.0])
def test_p5_p9_dgpo_bounded_and_nonnegative(n, m, a):
    cfg = PolicyLossConfig(name="dgpo", dgpo_n=n, dgpo_m=m)
    r = np.logspace(-8, 8, 400)
    r = r[np.abs(np.log(r)) <= 20]
    wl, wp, _ = weights(cfg, r, a)
    assert np.all(wl >= 0) and np.all(wp >= 0)
    assert np.all(wp <= (1 / PI_OLD) * (1 + 1e-12))
    assert np.all(wl <= r * (1 + 1e-12))


@pytest.mark.parametrize("n,m", [(1, 2), (2, 3)])
def test_p6_decay(n, m):
    cfg = PolicyLossConfig(name="dgpo", dgpo_n=n, dgpo_m=m)
    _, wp, _ = weights(cfg, LEFT, -1.0)
    np.testing.assert_allclose(wp / LEFT ** n, wp[0] / LEFT[0] ** n, rtol=1e-9)  # W_p ∝ r^n
    _, wp, _ = weights(cfg, RIGHT, 1.0)
    np.testing.assert_allclose(wp * RIGHT ** (1 / m), wp[0] * RIGHT[0] ** (1 / m), rtol=1e-9)  # ∝ r^(-1/m)
    assert np.all(wp >= 1.2 / (RIGHT * PI_OLD) * (1 - 1e-12))  # gentler than soft clipping
    assert wp[-1] < 1e-2 * wp[0]  # decays to 0


def test_p7_limits():
    wl, _, _ = weights(PolicyLossConfig(name="dgpo", dgpo_n=0), LEFT, -1.0)
    np.testing.assert_allclose(wl, LEFT, rtol=1e-12)  # n = 0: vanilla IS on LN
    d1, _, _ = weights(PolicyLossConfig(name="dgpo", dgpo_m=1), RIGHT, 1.0)
    for other in (PolicyLossConfig(name="gppo"), PolicyLossConfig(name="ce_gppo", ce_beta2=1.0)):
        o, _, _ = weights(PolicyLossConfig(name=other.name, ce_beta2=1.0, eps_high=0.2), RIGHT, 1.0)
        np.testing.assert_allclose(d1, o, rtol=1e-12)  # m = 1: GPPO on HP
    r = np.logspace(math.log10(1.21), 2, 20)
    big, _, _ = weights(PolicyLossConfig(name="dgpo", dgpo_m=1e7), r, 1.0)
    np.testing.assert_allclose(big, r, rtol=1e-5)  # m -> inf: vanilla


def test_p8_no_bias_outside_boundaries():
    inner = np.logspace(math.log10(0.81), math.log10(1.19), 15)
    for a, r in ((1.0, LEFT), (-1.0, RIGHT[RIGHT < 1e8]), (1.0, inner), (-1.0, inner)):
        r = r[np.abs(np.log(r)) < 20]
        _, wp, m = weights(PolicyLossConfig(name="dgpo"), r, a)
        np.testing.assert_allclose(wp, 1 / PI_OLD, rtol=1e-12)
        assert float(m["ln_frac"]) == 0 and float(m["hp_frac"]) == 0
    # CISPO biases reverse tokens (A > 0 below L gets L, A < 0 above U gets U).
    wl, _, _ = weights(PolicyLossConfig(name="cispo"), LEFT, 1.0)
    np.testing.assert_allclose(wl, 0.8)
    wl, _, _ = weights(PolicyLossConfig(name="cispo"), RIGHT, -1.0)
    np.testing.assert_allclose(wl, 1.2)
    # ASPO: 1/r for every positive token on [1/c, U].
    wl, _, _ = weights(PolicyLossConfig(name="aspo"), inner, 1.0)
    np.testing.assert_allclose(wl, 1 / inner, rtol=1e-12)


@pytest.mark.parametrize("name", registered_losses())
def test_p10_on_policy(name):
    cfg = PolicyLossConfig(name=name, eps_low=0.2, eps_high=0.2)
    for a in (-1.0, 1.0):
        wl, _, m = weights(cfg, np.ones(8), a)
        np.testing.assert_allclose(wl, 1.0, rtol=1e-12)
        assert float(m["ln_frac"]) == 0 and float(m["hp_frac"]) == 0


def test_metrics_counts():
    cfg = PolicyLossConfig(name="dgpo")
    r = np.array([0.5, 0.5, 1.0, 2.0, 2.0, 2.0, 0.5, 2.0])
    a = np.array([-1, -1, 1, 1, 1, -1, 1, 1.0])
    w, m = autograd_weights(cfg, np.log(r), a)
    assert float(m["ln_frac"]) == pytest.approx(2 / 8) and float(m["hp_frac"]) == pytest.approx(3 / 8)
    assert float(m["ln_tokens"]) == 2 and float(m["hp_tokens"]) == 3
    assert float(m["w_ln_mean"]) == pytest.approx(0.25 / 0.8)
    assert float(m["w_hp_mean"]) == pytest.approx(math.sqrt(1.2 * 2))
    assert float(m["approx_kl"]) == pytest.approx(float(np.mean(-np.log(r))))
    assert float(m["dual_clip_frac"]) == 0
    m2 = autograd_weights(PolicyLossConfig(name="grpo"), np.log([4.0, 4.0, 1.0, 1.0]), [-1, 1, 1, 1.0])[1]
    assert float(m2["dual_clip_frac"]) == pytest.approx(0.25)
