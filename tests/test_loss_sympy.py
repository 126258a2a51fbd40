"""Gradient weights derived symbolically from each surrogate (stop-gradient factors as constants)
and compared with autograd at random points of every region."""
import math

import numpy as np
import pytest
import sympy as sp

from megatron_dgpo.loss import PolicyLossConfig
from tests.test_loss_reference_grid import autograd_weights

lp, lo, R, n, m = sp.symbols("lp lo R n m", real=True)
r = sp.exp(lp - lo)
L, U, C, B1, B2 = sp.Rational(4, 5), sp.Rational(6, 5), sp.Symbol("c", positive=True), sp.Symbol("b1"), sp.Symbol("b2")

# (method, advantage sign, region predicate on r, surrogate s). R stands for sg(r).
CASES = [
    ("dgpo", -1, lambda x, c: x < 0.8, r * R ** n / L ** n),
    ("dgpo", +1, lambda x, c: x > 1.2, r * R ** (-1 / m) * U ** (1 / m)),
    ("dgpo", +1, lambda x, c: x < 1.2, r),
    ("dgpo", -1, lambda x, c: x > 0.8, r),
    ("grpo", +1, lambda x, c: x > 1.2, U + 0 * lp),
    ("grpo", -1, lambda x, c: x < 0.8, L + 0 * lp),
    ("grpo", -1, lambda x, c: x > c, C + 0 * lp),
    ("grpo", +1, lambda x, c: x < 1.2, r),
    ("grpo", -1, lambda x, c: 0.8 < x < c, r),
    ("cispo", +1, lambda x, c: True, sp.Min(sp.Max(R, L), U) * lp),
    ("cispo", -1, lambda x, c: True, sp.Min(sp.Max(R, L), U) * lp),
    ("gppo", -1, lambda x, c: x < 0.8, L * r / R),
    ("gppo", +1, lambda x, c: x > 1.2, U * r / R),
    ("gppo", -1, lambda x, c: x > c, C + 0 * lp),
    ("gppo", -1, lambda x, c: 0.8 < x < c, r),
    ("ce_gppo", -1, lambda x, c: x < 0.8, B1 * L * r / R),
    ("ce_gppo", +1, lambda x, c: x > 1.2, B2 * U * r / R),
    ("ce_gppo", -1, lambda x, c: x > c, C + 0 * lp),
    ("aspo", +1, lambda x, c: x < 1 / c, C * lp),
    ("aspo", +1, lambda x, c: 1 / c < x < 1.2, r / R ** 2),
    ("aspo", +1, lambda x, c: x > 1.2, 1 / U + 0 * lp),
    ("aspo", -1, lambda x, c: x < 0.8, L + 0 * lp),
    ("aspo", -1, lambda x, c: 0.8 < x < c, r),
    ("aspo", -1, lambda x, c: x > c, C * lp),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{'pos' if c[1] > 0 else 'neg'}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("nm", [(1, 2), (2, 3)])
def test_symbolic_weight_matches_autograd(case, nm):
    name, sign, region, surrogate = case
    cfg = PolicyLossConfig(name=name, dgpo_n=nm[0], dgpo_m=nm[1], ce_beta1=0.6, ce_beta2=0.9)
    c = cfg.dual_clip_c if cfg.dual_clip_c is not None else float("inf")
    w_expr = sp.diff(surrogate, lp)
    rng = np.random.default_rng(hash(case[0]) % 2**32)
    rs = [x for x in np.exp(rng.uniform(-8, 8, 4000)) if region(x, c)][:25]
    assert rs, "region not sampled"
    old = -3.0
    subs = {n: nm[0], m: nm[1], C: c if math.isfinite(c) else 0, B1: 0.6, B2: 0.9, lo: old}
    want = []
    for x in rs:
        val = w_expr.subs(subs).subs(lp, old + math.log(x)).subs(R, x)
        want.append(float(sp.N(val, 30)))
    got, _ = autograd_weights(cfg, np.log(rs), np.full(len(rs), float(sign)), old_logp=np.full(len(rs), old))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-300)


def test_gspo_symbolic():
    import torch
    from megatron_dgpo.loss import policy_loss

    S = sp.Symbol("S", positive=True)
    w_expr = sp.diff(S * r / R, lp)  # GSPO-token: sg(s_i) * r_t / sg(r_t)
    rng = np.random.default_rng(5)
    log_r = rng.normal(0, 0.02, size=(3, 6))
    adv = np.array([1.0, -1.0, 0.5])
    cfg = PolicyLossConfig(name="gspo", eps_low=0.1, eps_high=0.1)
    logp = torch.tensor(log_r - 2.0, requires_grad=True)
    loss, _ = policy_loss(cfg, logp, torch.full((3, 6), -2.0, dtype=torch.float64), torch.tensor(adv),
                          torch.ones(3, 6, dtype=torch.bool))
    loss.backward()
    for i in range(3):
        s_i = math.exp(log_r[i].mean())
        for t in range(6):
            want = float(w_expr.subs({S: s_i, lo: -2.0}).subs(lp, log_r[i, t] - 2.0).subs(R, math.exp(log_r[i, t])))
            # seq-mean-token-mean over 3 sequences of 6 tokens: dLoss/dlogp = -A * W / (3 * 6)
            assert float(-logp.grad[i, t] * 18 / adv[i]) == pytest.approx(want, rel=1e-10)
