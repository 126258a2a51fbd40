"""The LN / HP diagnostics of policy_loss (loss/diagnostics.py) against an independent float64
computation from the formulas of dgpo-math.md on a hand-built batch, and their additivity over
any split of the batch (what makes the micro-batch / DP / mini-batch reduction exact; the DP=2
vs DP=1 check of the summed keys runs in tests/workers/megatron_train.py)."""
import math

import numpy as np
import pytest
import torch

from megatron_dgpo.loss import PolicyLossConfig, policy_loss
from megatron_dgpo.loss import diagnostics as D

L, U = 0.8, 1.2



def _floats(metrics):
    """policy_loss's metrics as train_step returns them: floats, lists for the histograms."""
    return {k: (v.tolist() if v.numel() > 1 else float(v)) for k, v in metrics.items()}

def _batch(seed=0, b=6, s=40):
    g = torch.Generator().manual_seed(seed)
    old = torch.log(torch.rand(b, s, generator=g, dtype=torch.float64) * 0.999 + 1e-6)
    old[1, :8] = math.log(1e-4)  # pi_old < 1e-3: the tokens whose soft-clip weight L / pi explodes
    logp = old + torch.randn(b, s, generator=g, dtype=torch.float64) * 1.5
    logp = torch.minimum(logp, torch.zeros(()))  # a probability
    old[1, 8:12], logp[1, 8:12] = math.log(0.01), math.log(5e-4)  # LN with pi < 1e-3 <= pi_old
    adv = torch.tensor([1.0, -1.0, 0.5, -0.7, 1.3, -1.1], dtype=torch.float64)
    mask = torch.rand(b, s, generator=g) > 0.15
    return logp, old, adv, mask


def _reference(name, logp, old, adv, mask, n=1.0, m=2.0):
    """float64 numpy: regions, W_logp per method (dgpo-math.md), W_p = W_logp / pi."""
    lp, o, msk = logp.numpy(), old.numpy(), mask.numpy()
    a = np.broadcast_to(adv.numpy()[:, None], lp.shape)
    r = np.exp(lp - o)
    ln, hp = (r < L) & (a < 0) & msk, (r > U) & (a > 0) & msk
    if name == "dgpo":
        w = np.where(ln, r ** (n + 1) / L ** n, np.where(hp, U ** (1 / m) * r ** (1 - 1 / m), r))
    elif name == "cispo":
        w = np.clip(r, L, U)
    elif name == "grpo":
        w = np.where(ln | hp, 0.0, r)
        w = np.where((a < 0) & (r > 3.0), 0.0, w)  # dual clip c = 3
    wp = w / np.exp(lp)
    return dict(ln=ln, hp=hp, w=w, wp=wp, a=a, pi=np.exp(lp), old=o, mask=msk)


def _ref_bins(wp):
    out = np.zeros(D.NUM_BINS)
    for v in wp:
        if v == 0:
            i = 0
        else:
            i = int(math.floor((math.log10(v) - D.LOG10_LO) * D.BINS_PER_DECADE))
            i = min(max(i, 0), D.NUM_BINS - 2) + 1
        out[i] += 1
    return out


@pytest.mark.parametrize("name", ["dgpo", "cispo", "grpo"])
def test_diagnostics_match_float64_reference(name):
    logp, old, adv, mask = _batch()
    cfg = PolicyLossConfig(name=name)
    _, metrics = policy_loss(cfg, logp, old, adv, mask)
    ref = _reference(name, logp, old, adv, mask)
    assert ref["ln"].sum() >= 10 and ref["hp"].sum() >= 10  # the batch exercises both regions
    for region in D.REGIONS:
        sel = ref[region]
        bins = np.array(metrics[D.hist_key(region)].tolist())
        np.testing.assert_array_equal(bins, _ref_bins(ref["wp"][sel]))
    lowp = (ref["ln"] & (ref["old"] < math.log(1e-3))).sum()
    assert lowp > 0 and float(metrics["diag_ln_lowp_tokens"]) == lowp
    mass = np.where(ref["mask"], np.abs(ref["a"]) * np.abs(ref["w"]) * (1 - ref["pi"]), 0.0)
    for key, sel in (("all", ref["mask"]), ("ln", ref["ln"]), ("hp", ref["hp"])):
        assert float(metrics[f"diag_gmass_{key}_tokens"]) == pytest.approx(mass[sel].sum(), rel=1e-12, abs=1e-300)

    row = D.summarize(_floats(metrics))
    step = 10 ** (1 / D.BINS_PER_DECADE)
    for region in D.REGIONS:
        vals = ref["wp"][ref[region]]
        for q in D.QUANTILES:
            got, want = row[f"wp_{region}_p{round(q * 100)}"], float(np.quantile(vals, q))
            if want == 0:
                assert got == 0
            else:  # within one bin (log-linear interpolation inside the bin)
                assert want / step <= got <= want * step, (region, q, got, want)
        got_max, want_max = row[f"wp_{region}_max"], float(vals.max())
        assert (got_max == 0 and want_max == 0) or want_max <= got_max <= want_max * step
        assert row[f"grad_share_{region}"] == pytest.approx(mass[ref[region]].sum() / mass.sum(), rel=1e-12)
    assert row["ln_lowp_frac"] == pytest.approx(lowp / ref["ln"].sum())
    assert not any(k.startswith("diag_") for k in row)


def test_soft_clip_weights_explode_and_dgpo_stays_bounded():
    """The mechanism the diagnostics show: on the same LN tokens CISPO's W_p reaches L / pi, DGPO's
    stays <= 1/pi_old (P2, P5)."""
    logp, old, adv, mask = _batch()
    rows = {}
    for name in ("dgpo", "cispo"):
        _, m = policy_loss(PolicyLossConfig(name=name), logp, old, adv, mask)
        rows[name] = D.summarize(_floats(m))
    ln = _reference("dgpo", logp, old, adv, mask)["ln"]
    bound = float(np.exp(-old.numpy())[ln].max())
    assert rows["dgpo"]["wp_ln_max"] <= bound * 10 ** (1 / D.BINS_PER_DECADE)
    assert rows["cispo"]["wp_ln_max"] > 5 * rows["dgpo"]["wp_ln_max"]


def test_diagnostics_add_up_over_any_split():
    """Sums over a split (micro-batches, DP ranks, mini-batches) == the sums of the whole batch."""
    logp, old, adv, mask = _batch(seed=3)
    cfg = PolicyLossConfig(name="dgpo")
    _, whole = policy_loss(cfg, logp, old, adv, mask)
    parts = [policy_loss(cfg, logp[i:j], old[i:j], adv[i:j], mask[i:j])[1] for i, j in ((0, 1), (1, 4), (4, 6))]
    for key in whole:
        if key.startswith("diag_"):
            total = sum(p[key] for p in parts)
            torch.testing.assert_close(total, whole[key], rtol=1e-12, atol=1e-12, msg=key)


def test_summarize_step_level_keys():
    updates = [{"grad_norm": 2.0, "update_successful": 1.0}, {"grad_norm": float("nan"), "update_successful": 0.0},
               {"grad_norm": 7.5, "update_successful": 1.0}]
    row = D.summarize({"loss": 1.0}, updates)
    assert row["grad_norm_max"] == 7.5 and row["nonfinite_updates"] == 1.0
    # no LN/HP token anywhere: quantiles undefined (NaN), shares 0
    empty = {D.hist_key(r): [0.0] * D.NUM_BINS for r in D.REGIONS}
    empty.update(diag_gmass_all_tokens=1.0, diag_gmass_ln_tokens=0.0, diag_gmass_hp_tokens=0.0,
                 diag_ln_lowp_tokens=0.0, ln_tokens=0.0)
    row = D.summarize(empty)
    assert math.isnan(row["wp_ln_p50"]) and math.isnan(row["wp_hp_max"]) and row["grad_share_ln"] == 0.0
