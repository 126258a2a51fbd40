"""Per-token diagnostics of the gradient weights on the trust-region boundary (LN / HP tokens),
as additive sums, so that they reduce exactly over micro-batches, data-parallel ranks and the
mini-batches of an RL step through the same path as the token counts (keys ending in `_tokens`
are summed by train.step and trainer._merge_updates; no extra collective).

Per token everything is known without the vocabulary: pi = exp(logp), pi_old, A, W_logp and the
region masks. What is summed:
- a histogram of log10 W_p (W_p = W_logp / pi, dgpo-math.md) on LN and on HP tokens, with
  BINS_PER_DECADE fixed bins on [10^LOG10_LO, 10^LOG10_HI) (smaller positive values go to the first),
  one bin for W_p = 0 (GRPO's hard-clipped tokens) and one from 10^LOG10_HI up. `summarize` reads quantiles from it by log-linear interpolation
  inside the bin (error below one bin, a factor 10^(1/BINS_PER_DECADE)) and the max as the upper
  edge of the highest non-empty bin (an upper bound within one bin). Exact quantiles would need the
  tokens gathered across ranks, a collective per optimizer step; the counts are exact.
- LN tokens with pi_old < LOW_PI_OLD (the tokens whose soft-clip weight L/pi explodes).
- the gradient mass |A| * W_logp * (1 - pi) of all / LN / HP tokens: the norm of a token's
  gradient with respect to its logits is |A| * W_logp * ||e_y - softmax||, which lies between
  (1 - pi) and sqrt(2) (1 - pi) times |A| W_logp, so the LN (HP) share of this L1 mass estimates
  the share of the logit gradient that comes from LN (HP) tokens within a factor sqrt(2) per token
  (it ignores cancellation between tokens in the parameter gradient).
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List

import torch

BINS_PER_DECADE = 4
LOG10_LO, LOG10_HI = -4, 12
NUM_BINS = (LOG10_HI - LOG10_LO) * BINS_PER_DECADE + 2  # + the zero bin and the overflow bin
LOW_PI_OLD = 1e-3
QUANTILES = (0.5, 0.9, 0.99)
REGIONS = ("ln", "hp")


def hist_key(region: str) -> str:
    """The key of a region's W_p histogram: one [NUM_BINS] vector of token counts (a sum, like
    every `_tokens` key: train.step reduces vectors in the same all-reduce as scalars)."""
    return f"diag_wp_{region}_hist_tokens"


def bin_index(wp: torch.Tensor) -> torch.Tensor:
    """Histogram bin of each W_p (>= 0): 0 for W_p = 0, NUM_BINS - 1 from 10^LOG10_HI."""
    x = (torch.log10(wp.clamp(min=1e-300)) - LOG10_LO) * BINS_PER_DECADE
    idx = torch.floor(x).clamp(0, NUM_BINS - 2).long() + 1
    return torch.where(wp > 0, idx, torch.zeros_like(idx))


def token_sums(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, w_logp: torch.Tensor,
               mask: torch.Tensor, ln: torch.Tensor, hp: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The summable diagnostics of one batch of tokens (all inputs [batch, seq], detached here).
    No host synchronisation: scatter_add instead of bincount or boolean indexing."""
    lp, old, a, w = (t.detach() for t in (logp, old_logp, adv, w_logp))
    pi = torch.exp(lp)
    wp = torch.where(mask, w.abs() / pi.clamp(min=torch.finfo(pi.dtype).tiny), 0.0)
    idx = bin_index(wp).reshape(-1)
    out = {}
    for region, sel in (("ln", ln), ("hp", hp)):
        hist = torch.zeros(NUM_BINS, dtype=lp.dtype, device=lp.device)
        out[hist_key(region)] = hist.scatter_add_(0, idx, sel.reshape(-1).to(lp.dtype))
    out["diag_ln_lowp_tokens"] = (ln & (old < math.log(LOW_PI_OLD))).sum().to(lp.dtype)
    mass = torch.where(mask, a.abs() * w.abs() * (1.0 - pi).clamp(min=0.0), 0.0)
    out["diag_gmass_all_tokens"] = mass.sum()
    out["diag_gmass_ln_tokens"] = (mass * ln).sum()
    out["diag_gmass_hp_tokens"] = (mass * hp).sum()
    return out


def _quantile(counts: List[float], q: float) -> float:
    total = sum(counts)
    target = q * total
    cum = 0.0
    for i, c in enumerate(counts):
        if c > 0 and cum + c >= target:
            if i == 0:
                return 0.0
            if i == NUM_BINS - 1:
                return 10.0 ** LOG10_HI  # above the range: its lower edge, a lower bound
            frac = (target - cum) / c
            return 10.0 ** (LOG10_LO + (i - 1 + frac) / BINS_PER_DECADE)
        cum += c
    return float("nan")


def _max(counts: List[float]) -> float:
    top = max((i for i, c in enumerate(counts) if c > 0), default=None)
    if top is None:
        return float("nan")
    if top == 0:
        return 0.0
    if top == NUM_BINS - 1:
        return 10.0 ** LOG10_HI  # above the range: its lower edge, a lower bound
    return 10.0 ** (LOG10_LO + top / BINS_PER_DECADE)


def summarize(merged: Dict[str, float], updates: Iterable[Dict[str, float]] = ()) -> Dict[str, float]:
    """An RL step's metrics with the summed diagnostics replaced by what is logged:
    wp_{ln,hp}_p50/p90/p99/max (NaN without such tokens), grad_share_{ln,hp}, ln_lowp_frac,
    and from the step's optimizer steps grad_norm_max and nonfinite_updates."""
    out = {k: v for k, v in merged.items() if not k.startswith("diag_")}
    if hist_key("ln") in merged:
        for region in REGIONS:
            counts = [float(c) for c in merged[hist_key(region)]]
            for q in QUANTILES:
                out[f"wp_{region}_p{round(q * 100)}"] = _quantile(counts, q) if sum(counts) else float("nan")
            out[f"wp_{region}_max"] = _max(counts)
        total = float(merged["diag_gmass_all_tokens"])
        for region in REGIONS:
            out[f"grad_share_{region}"] = float(merged[f"diag_gmass_{region}_tokens"]) / total if total > 0 else 0.0
        n_ln = float(merged.get("ln_tokens", 0.0))
        out["ln_lowp_frac"] = float(merged["diag_ln_lowp_tokens"]) / n_ln if n_ln > 0 else float("nan")
    updates = list(updates)
    if updates:
        norms = [u.get("grad_norm", float("nan")) for u in updates]
        finite = [g for g in norms if math.isfinite(g)]
        out["grad_norm_max"] = max(finite) if finite else float("nan")
        out["nonfinite_updates"] = float(sum(u.get("update_successful", 1.0) < 1 for u in updates))
    return out
