#!/usr/bin/env python
"""Every registered policy loss on one batch of random tokens whose ratios have drifted off-policy:
loss value, LN / HP fractions, mean gradient weights and the gradient norm w.r.t. the log-probs."""
from __future__ import annotations

import argparse

import torch

from megatron_dgpo.loss import PolicyLossConfig, policy_loss, registered_losses


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--drift", type=float, default=0.5, help="std of log(pi / pi_old)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    g = torch.Generator().manual_seed(args.seed)
    old = torch.log(torch.rand(args.batch, args.seq, generator=g).clamp(min=1e-6))
    logp0 = old + torch.randn(args.batch, args.seq, generator=g) * args.drift
    logp0 = logp0.clamp(max=0.0)
    adv = torch.randn(args.batch, generator=g)
    lengths = torch.randint(args.seq // 4, args.seq + 1, (args.batch,), generator=g)
    mask = torch.arange(args.seq)[None, :] < lengths[:, None]

    header = f"{'method':<9}{'loss':>10}{'LN frac':>9}{'HP frac':>9}{'W_logp LN':>11}{'W_logp HP':>11}{'dual':>7}{'|grad|':>11}"
    print(f"{int(mask.sum())} tokens, log-ratio std {args.drift}, paper defaults per method\n")
    print(header)
    print("-" * len(header))
    for name in registered_losses():
        cfg = PolicyLossConfig.paper_defaults(name)
        logp = logp0.clone().requires_grad_()
        loss, m = policy_loss(cfg, logp, old, adv, mask)
        loss.backward()
        print(f"{name:<9}{float(m['loss']):>10.4f}{float(m['ln_frac']):>9.3f}{float(m['hp_frac']):>9.3f}"
              f"{float(m['w_ln_mean']):>11.4f}{float(m['w_hp_mean']):>11.4f}{float(m['dual_clip_frac']):>7.3f}"
              f"{float(logp.grad.norm()):>11.3e}")
    print("\nLoss values are not comparable across methods (DGPO reports r^(n+1)/L^n on LN); the")
    print("gradient weights are what differ: see docs/gradient_weights.png.")


if __name__ == "__main__":
    main()
