#!/usr/bin/env python
"""Plot W_p and W_logp against the ratio r for every method, on the LN (A < 0) and HP (A > 0)
sides: the analogue of Figure 1 of the DGPO paper. Weights come from the library's autograd
gradients, not from re-typed formulas."""
from __future__ import annotations

import argparse
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from megatron_dgpo.loss import PolicyLossConfig, policy_loss  # noqa: E402

METHODS = ["grpo", "cispo", "gppo", "ce_gppo", "aspo", "dgpo"]
# Several baselines coincide on parts of each side; dashes keep every curve visible.
STYLES = {"grpo": "-", "cispo": "--", "gppo": "-.", "ce_gppo": ":", "aspo": (0, (5, 1, 1, 1)), "dgpo": "-"}


def gradient_weights(cfg: PolicyLossConfig, r: np.ndarray, adv: float, pi_old: float):
    """(W_logp, W_p) per ratio, read from d loss / d logp of a token-mean loss."""
    old = torch.full((1, r.size), math.log(pi_old), dtype=torch.float64)
    logp = (old + torch.from_numpy(np.log(r)).reshape(1, -1)).requires_grad_()
    loss, _ = policy_loss(cfg, logp, old, torch.full((1,), adv, dtype=torch.float64),
                          torch.ones_like(old, dtype=torch.bool))
    loss.backward()
    w_logp = (-logp.grad * r.size / adv).reshape(-1).numpy()
    return w_logp, w_logp / (r * pi_old)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="docs/gradient_weights.png")
    p.add_argument("--pi-old", type=float, default=0.01)
    p.add_argument("--n", type=float, default=1.0)
    p.add_argument("--m", type=float, default=2.0)
    args = p.parse_args(argv)

    sides = {"LN side: A < 0": (-1.0, np.logspace(-4, 0.5, 400)),
             "HP side: A > 0": (1.0, np.logspace(-0.5, 2, 400))}
    fig, axes = plt.subplots(2, 2, figsize=(12, 9), constrained_layout=True)
    for col, (title, (adv, r)) in enumerate(sides.items()):
        for name in METHODS:
            cfg = PolicyLossConfig(name=name, dgpo_n=args.n, dgpo_m=args.m)
            w_logp, w_p = gradient_weights(cfg, r, adv, args.pi_old)
            style = dict(lw=3 if name == "dgpo" else 1.8, ls=STYLES[name], label=name.upper().replace("_", "-"))
            # Zero weights (hard clipping) cannot be drawn on log axes: show them at the bottom.
            floor_p, floor_l = 1e-2, 1e-6
            axes[0, col].plot(r, np.maximum(w_p, floor_p), **style)
            axes[1, col].plot(r, np.maximum(w_logp, floor_l), **style)
        for row, (ylabel, floor) in enumerate((("W_p (weight on ∇π)", 1e-2), ("W_logp (weight on ∇log π)", 1e-6))):
            ax = axes[row, col]
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_ylim(bottom=floor)
            for edge in (0.8, 1.2):
                ax.axvline(edge, color="gray", ls=":", lw=1)
            ax.set_xlabel("r = π / π_old")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{title} (π_old = {args.pi_old}, n = {args.n:g}, m = {args.m:g})")
            ax.grid(True, which="both", alpha=0.2)
            ax.legend(fontsize=8)
    fig.suptitle("Gradient weights of DGPO and soft/hard clipping baselines (zero weights drawn at the floor)")
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
