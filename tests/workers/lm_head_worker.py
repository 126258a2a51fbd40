"""torchrun worker (2 processes, CPU gloo) for tests/test_lm_head_dist.py: the fused LM head.

1. The op under TP=2, sequence parallelism on/off, temperature 1 and 0.7, a padded vocabulary and
   tiles that divide neither the tokens nor the vocabulary shard: log-probs, entropy, d hidden
   (this rank's, after the all-reduce or reduce-scatter) and d weight (this rank's shard) against
   a float64 full-vocabulary reference.
2. Megatron train steps, fused vs materialised from the same initial weights, in the layouts
   TP=2, TP=2+SP, PP=2 (last stage fused), each with untied and tied embeddings, and PP=2 with
   two virtual stages (interleaved schedule; only the last virtual stage fused): old log-probs
   and entropies (forward only), per-step metrics, every main_grad after the first step (the
   output/embedding weight's included) and the weights after two optimizer steps, relative 1e-5.
3. The main job (RLTrainer on the embedded engine), TP=2: algo.fused_lm_head true vs false, the
   per-step metrics of three steps within 1e-5.
Rank 0 writes {check: {"ok": bool, "detail": str}} to --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import megatron_common as C  # noqa: E402
from results import check, run_cases  # noqa: E402
from megatron_dgpo.ops import fused_lm_head_logprobs  # noqa: E402
from tests.logprob_reference import reference, upstream_loss  # noqa: E402

METRICS = ("loss", "grad_norm", "entropy", "ln_frac", "hp_frac", "approx_kl", "rollout_logp_abs_diff")




def world_max(x: float) -> float:
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    fin = torch.isfinite(b)
    if not torch.equal(torch.isinf(a), torch.isinf(b)):
        return float("inf")
    return float((a[fin] - b[fin]).abs().max() / b[fin].abs().max().clamp(min=1e-30)) if fin.any() else 0.0


# ---- 1. the op under TP=2 ---------------------------------------------------------------------
def op_case(sp: bool, temperature: float):
    tp, r = dist.get_world_size(), dist.get_rank()
    s, b, h, v, vocab = 10, 3, 16, 64, 59  # ids 59..63 are padding (rank 1's shard)
    g = torch.Generator().manual_seed(21)
    x = torch.randn(s, b, h, generator=g)
    w = torch.randn(v, h, generator=g) * 0.4
    tgt = torch.randint(0, vocab, (s, b), generator=g)
    g1, g2 = torch.randn(s, b, generator=g), torch.randn(s, b, generator=g)
    vl, sl = v // tp, s // tp
    xr = (x[r * sl:(r + 1) * sl] if sp else x).clone().requires_grad_(True)
    wr = w[r * vl:(r + 1) * vl].clone().requires_grad_(True)
    logp, ent = fused_lm_head_logprobs(xr, wr, tgt, tp_group=dist.group.WORLD, temperature=temperature,
                                       with_entropy=True, chunk_tokens=7, chunk_vocab=5, vocab_size=vocab,
                                       sequence_parallel=sp)
    upstream_loss(logp, ent, g1, g2).backward()

    logits = x.double().reshape(-1, h) @ w.double().t()
    logits[:, vocab:] = float("-inf")
    r_lp, r_en, grad = reference(logits, tgt.reshape(-1), temperature, g1.double().reshape(-1), g2.double().reshape(-1))
    grad = torch.nan_to_num(grad)
    r_dx = (grad @ w.double()).view(s, b, h)
    r_dw = grad.t() @ x.double().reshape(-1, h)
    errs = {
        "logp": float((logp.double().reshape(-1) - r_lp).abs().max()),
        "entropy": float((ent.double().reshape(-1) - r_en).abs().max()),
        "d_hidden": rel(xr.grad, r_dx[r * sl:(r + 1) * sl] if sp else r_dx),
        "d_weight": rel(wr.grad, r_dw[r * vl:(r + 1) * vl]),
    }
    worst = world_max(max(errs.values()))
    check(f"op_tp2_sp{int(sp)}_T{temperature}", worst <= 1e-5, errs)


# ---- 2. train steps, fused vs materialised ------------------------------------------------------
def local_params(chunks):
    return [p for c in chunks for p in c.parameters()]


def train_run(tp, pp, sp, vpp, model, init, batch, fused):
    from megatron_dgpo.train import forward_logprobs, train_step

    chunks, opt = C.setup(tp, pp, sp=sp, vpp=vpp, model=model)
    with torch.no_grad():
        for p, q in zip(local_params(chunks), init):
            p.copy_(q)
    kw = dict(fused_lm_head=fused, lm_head_chunk_tokens=5 if fused else None)  # 5 divides no micro-batch
    lp, en = forward_logprobs(chunks, batch, micro_batch_size=4, temperature=C.TEMPERATURE, with_entropy=True, **kw)
    batch = batch.with_old_logp(C.perturb_old_logp(lp))
    metrics, grads = [], None
    for step in range(C.STEPS):
        metrics.append(train_step(chunks, opt, batch, C.loss_config(), micro_batch_size=4,
                                  temperature=C.TEMPERATURE, **kw))
        if step == 0:
            grads = [p.main_grad.detach().clone() for p in local_params(chunks)]
    final = [p.detach().clone() for p in local_params(chunks)]
    return dict(logp=lp, entropy=en, metrics=metrics, grads=grads, final=final)


def layout_case(name, tp, pp, sp, tied, vpp=None):
    model = dataclasses.replace(C.MODEL, tie_word_embeddings=tied)
    chunks, _ = C.setup(tp, pp, sp=sp, vpp=vpp, model=model)
    init = [p.detach().clone() for p in local_params(chunks)]
    batch = C.make_batch()
    a = train_run(tp, pp, sp, vpp, model, init, batch, fused=False)
    b = train_run(tp, pp, sp, vpp, model, init, batch, fused=True)
    errs = {
        "logp": rel(b["logp"], a["logp"]),
        "entropy": rel(b["entropy"], a["entropy"]),
        "metrics": max(abs(mb[k] - ma[k]) / max(abs(ma[k]), 1e-12)
                       for ma, mb in zip(a["metrics"], b["metrics"]) for k in METRICS),
        "main_grad": max(rel(gb, ga) for ga, gb in zip(a["grads"], b["grads"])),
        "weights": max(rel(wb, wa) for wa, wb in zip(a["final"], b["final"])),
    }
    moved = max(float((w - i).abs().max()) for w, i in zip(a["final"], init))
    worst = world_max(max(errs.values()))
    moved = world_max(moved)
    check(f"train_{name}", worst <= 1e-5 and moved > 1e-4,
          {**errs, "worst_all_ranks": worst, "weights_moved": moved, "loss": [m["loss"] for m in a["metrics"]]})


# ---- 3. the main job --------------------------------------------------------------------------
def main_job(root):
    import rl_loop

    rows = {}
    for fused in (False, True):
        out = os.path.join(root, f"job_fused{int(fused)}")
        cfg = rl_loop.make_cfg(out, **{"algo.steps": 3, "algo.fused_lm_head": fused,
                                       "warmstart.cache_dir": os.path.join(root, "job_cache")})
        tr = rl_loop.trainer(cfg)
        rows[fused] = [tr.step(s) for s in range(3)]
        tr.close()
    keys = ("reward_mean", "loss", "grad_norm", "entropy", "ln_frac", "hp_frac")
    diffs = {k: [abs(b.get(k, float("nan")) - a.get(k, float("nan"))) / max(abs(a.get(k, 0.0)), 1e-12)
                 for a, b in zip(rows[False], rows[True])] for k in keys}
    worst = max(max(v) for v in diffs.values())
    trained = all("loss" in r for r in rows[False] + rows[True])
    check("main_job_tp2_fused_equals_materialised", trained and worst <= 1e-5, {"worst": worst, **diffs})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    root = os.path.dirname(os.path.abspath(args.out))
    from megatron_dgpo import distributed

    distributed.initialize(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, seed=5)
    cases = [(f"op_sp{int(sp)}_T{t}", lambda sp=sp, t=t: op_case(sp, t)) for sp in (False, True) for t in (1.0, 0.7)]
    for name, tp, pp, sp in (("tp2", 2, 1, False), ("tp2_sp", 2, 1, True), ("pp2", 1, 2, False)):
        for tied in (False, True):
            label = f"{name}_{'tied' if tied else 'untied'}"
            cases.append((label, lambda n=label, tp=tp, pp=pp, sp=sp, tied=tied: layout_case(n, tp, pp, sp, tied)))
    cases.append(("pp2_vpp2_untied", lambda: layout_case("pp2_vpp2_untied", 1, 2, False, False, vpp=2)))
    cases.append(("main_job", lambda: main_job(root)))
    run_cases(cases, out=args.out)


if __name__ == "__main__":
    main()
    sys.exit(0)
