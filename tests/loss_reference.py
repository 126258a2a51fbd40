"""Independent float64 reference: the gradient weights W_logp of dgpo-math.md's tables, written
directly from the tables (no shared code with megatron_dgpo.loss). Scalars in, scalar out."""
from __future__ import annotations

import math


def w_logp(name: str, r: float, a: float, *, eps_low=0.2, eps_high=0.2, n=1.0, m=2.0, c=None,
           beta1=0.5, beta2=1.0) -> float:
    L, U = 1.0 - eps_low, 1.0 + eps_high
    if name == "dgpo":
        if r < L and a < 0:
            return r ** (n + 1) / L ** n
        if r > U and a > 0:
            return U ** (1.0 / m) * r ** (1.0 - 1.0 / m)
        if c is not None and a < 0 and r > c:
            return 0.0
        return r
    if name == "grpo":
        c = 3.0 if c is None else c
        if a > 0:
            return r if r <= U else 0.0
        if a < 0:
            return r if L <= r <= c else 0.0
        return r
    if name == "cispo":
        lo = L if L > 0 else 0.0
        return min(max(r, lo), U)
    if name in ("gppo", "ce_gppo"):
        if c is None:
            c = 10.0 if name == "gppo" else 3.0
        bl, bu = (1.0, 1.0) if name == "gppo" else (beta1, beta2)
        if a > 0:
            return r if r <= U else bu * U
        if a < 0:
            if r < L:
                return bl * L
            return r if r <= c else 0.0
        return r
    if name == "aspo":
        c = 3.0 if c is None else c
        if a > 0:
            if r < 1.0 / c:
                return c
            return 1.0 / r if r <= U else 0.0
        if a < 0:
            if r < L:
                return 0.0
            return r if r <= c else c
        return r
    raise ValueError(name)


def w_p(name: str, r: float, a: float, pi_old: float, **kw) -> float:
    """W_p = W_logp / pi with pi = r * pi_old."""
    return w_logp(name, r, a, **kw) / (r * pi_old)


def gspo_token_weight(seq_log_ratios, a, eps_low, eps_high):
    """GSPO: s_i = exp(mean_t log r); every token of an unclipped sequence has W_logp = s_i."""
    s = math.exp(sum(seq_log_ratios) / len(seq_log_ratios))
    if (a > 0 and s > 1 + eps_high) or (a < 0 and s < 1 - eps_low):
        return 0.0
    return s
