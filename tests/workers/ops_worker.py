"""torchrun worker for tests/test_ops_logprobs.py: vocab_parallel_logprobs under CPU gloo TP.

Every rank builds the same full logits from a seed, takes its vocab shard, runs the op, and
compares the replicated outputs and its own shard's gradient with a float64 single-process
reference on the full logits. Rank 0 writes {check_name: {"ok": bool, "detail": ...}} to --out.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import traceback

import torch
import torch.distributed as dist

from megatron_dgpo.ops import vocab_parallel_logprobs
from tests.logprob_reference import bf16_store_rtol, reference, upstream_loss, value_tol

V = 96  # divisible by 2 and 4
LEAD = (2, 53)  # 106 tokens >= V, so every valid id appears as a target; 106 % 7 != 0
CHUNKS = (7, None)


def make_case(seed: int, dtype: torch.dtype, pad: int, offset: float = 0.0):
    """Full logits [*LEAD, V] (ids >= V - pad are -inf padding) and targets covering every valid id."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*LEAD, V, generator=g) * 3.0 + offset).to(dtype)
    n = LEAD[0] * LEAD[1]
    valid = V - pad
    if pad:
        logits[..., valid:] = float("-inf")
    ids = torch.cat([torch.arange(valid), torch.randint(0, valid, (n - valid,), generator=g)])
    target = ids[torch.randperm(n, generator=g)].view(LEAD)
    g1 = torch.randn(LEAD, generator=g)
    g2 = torch.randn(LEAD, generator=g)
    return logits, target, g1, g2


def tolerances(logits, temperature, dtype, backend=None):
    grad_rtol = 1e-4 + (bf16_store_rtol(backend) if dtype == torch.bfloat16 else 0.0)
    return value_tol(logits, temperature), grad_rtol


def compare(name, got, ref, atol, rtol=0.0):
    got = got.double()
    bad = torch.isnan(got).any().item()
    ok_inf = torch.equal(torch.isinf(got), torch.isinf(ref)) and torch.equal(got[torch.isinf(got)], ref[torch.isinf(ref)])
    fin = torch.isfinite(ref)
    err = (got[fin] - ref[fin]).abs()
    lim = atol + rtol * ref[fin].abs()
    ok = (not bad) and ok_inf and bool((err <= lim).all())
    return ok, f"{name}: max_err={float(err.max()) if err.numel() else 0.0:.3g} nan={bad} inf_match={ok_inf}"


def run_case(group, tp, tp_rank, dtype, temperature, chunk, pad, seed, mode="both", tp_group_arg="explicit",
             backend=None, offset=0.0):
    """One op call on this rank's shard vs the reference; returns (ok, detail, logp, ent)."""
    logits, target, g1, g2 = make_case(seed, dtype, pad, offset)
    if mode == "logp":
        g2 = None
    elif mode == "entropy":
        g1 = None
    vl = V // tp
    shard = logits[..., tp_rank * vl:(tp_rank + 1) * vl].clone().requires_grad_(True)
    before = shard.detach().clone()
    kwargs = dict(temperature=temperature, with_entropy=(mode != "logp"), chunk_size=chunk, backend=backend)
    if tp_group_arg == "explicit":
        kwargs["tp_group"] = group
    logp, ent = vocab_parallel_logprobs(shard, target, **kwargs)
    upstream_loss(logp, ent, g1, g2).backward()

    r_logp, r_ent, r_grad = reference(logits, target, temperature, g1, g2)
    val_tol, grad_rtol = tolerances(logits, temperature, dtype, backend)
    gscale = max(float(g.abs().max()) for g in (g1, g2) if g is not None)
    oks, details = [], []
    for ok, d in (
        compare("logp", logp, r_logp, val_tol),
        compare("entropy", ent, r_ent, val_tol) if ent is not None else (True, "entropy: n/a"),
        compare("grad", shard.grad, r_grad[..., tp_rank * vl:(tp_rank + 1) * vl], 4 * val_tol * gscale / temperature, grad_rtol),
    ):
        oks.append(ok)
        details.append(d)
    if shard.grad.dtype != dtype:
        oks.append(False)
        details.append(f"grad dtype {shard.grad.dtype}")
    if pad:
        masked = torch.isinf(shard.detach())
        if masked.any() and not bool((shard.grad[masked] == 0).all()):
            oks.append(False)
            details.append("nonzero grad on -inf entries")
    if not torch.equal(shard.detach(), before):
        oks.append(False)
        details.append("input logits modified")
    if (ent is None) != (mode == "logp") or logp.dtype != torch.float32:
        oks.append(False)
        details.append("output types")
    return all(oks), "; ".join(details), logp.detach(), (ent.detach() if ent is not None else None)


def replicated(group, *tensors) -> bool:
    """Outputs bitwise identical across the ranks of `group`."""
    ok = True
    for t in tensors:
        if t is None:
            continue
        gathered = [torch.empty_like(t) for _ in range(dist.get_world_size(group=group))]
        dist.all_gather(gathered, t.contiguous(), group=group)
        ok &= all(torch.equal(x, gathered[0]) for x in gathered)
    return ok


def case_grid(group, tp, tp_rank, dtype, temperature, tp_group_arg="explicit", modes=("both",), backend=None):
    oks, details = [], []
    seed = 0
    for mode in modes:
        for chunk in (CHUNKS if backend != "triton" else (None,)):  # Triton ignores the chunk size
            # No padding, part of the last shard, the whole last shard (also with every valid logit
            # far below 0, where a shard's "max" of -inf must not become a reference of 0).
            for pad, offset in ((0, 0.0), (10, 0.0), (V // tp, 0.0), (V // tp, -1e4)):
                seed += 1
                ok, d, logp, ent = run_case(group, tp, tp_rank, dtype, temperature, chunk, pad, seed, mode, tp_group_arg,
                                            backend, offset)
                rep = replicated(group, logp, ent)
                oks.append(ok and rep)
                details.append(f"[{mode} chunk={chunk} pad={pad} offset={offset}] {d}{'' if rep else ' NOT REPLICATED'}")
    return all(oks), details


def megatron_checks(tp, world, rank):
    """Via megatron parallel_state (tp_group=None) and against megatron's vocab_parallel_cross_entropy."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    try:
        group = ps.get_tensor_model_parallel_group()
        tp_rank = ps.get_tensor_model_parallel_rank()
        out = {}
        out[f"megatron_ps_tp{tp}_fp32_T0.7"] = case_grid(group, tp, tp_rank, torch.float32, 0.7, tp_group_arg="none")
        out[f"megatron_ps_tp{tp}_bf16_T1.0"] = case_grid(group, tp, tp_rank, torch.bfloat16, 1.0, tp_group_arg="none")

        # Same log-probs and same per-shard gradient as megatron's cross entropy (loss = -logp).
        oks, details = [], []
        for dtype in (torch.float32, torch.bfloat16):
            logits, target, g1, _ = make_case(123, dtype, pad=0)
            vl = V // tp
            shard = logits[..., tp_rank * vl:(tp_rank + 1) * vl]
            ours_in = shard.clone().requires_grad_(True)
            logp, _ = vocab_parallel_logprobs(ours_in, target, chunk_size=5)
            (logp * g1).sum().backward()
            mg_in = shard.clone().requires_grad_(True)
            # megatron overwrites float32 input in place: feed it a private copy (via an identity op).
            loss = vocab_parallel_cross_entropy(mg_in * 1, target)
            (-(loss * g1)).sum().backward()
            v_err = float((logp + loss.float()).abs().max())
            g_err = float((ours_in.grad.float() - mg_in.grad.float()).abs().max())
            g_tol = 1e-5 if dtype == torch.float32 else 2.0**-7 * float(mg_in.grad.float().abs().max())
            oks.append(v_err < 1e-4 and g_err <= g_tol)
            details.append(f"{dtype}: |logp+ce|={v_err:.3g} |dgrad|={g_err:.3g} (tol {g_tol:.3g})")
        out[f"megatron_ce_agrees_tp{tp}"] = (all(oks), details)
        return out
    finally:
        ps.destroy_model_parallel()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU processes: Triton kernels run in its interpreter
    dist.init_process_group(backend="gloo", timeout=datetime.timedelta(seconds=120))
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.set_num_threads(1)

    local: dict[str, tuple[bool, object]] = {}

    def guarded(name, fn):
        try:
            local[name] = fn()
        except Exception:  # a failure on one rank may hang the others: the gloo timeout bounds it
            local[name] = (False, traceback.format_exc()[-3000:])

    # TP = world through the explicit WORLD group.
    g = dist.group.WORLD
    for dtype, dname in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        for t in (1.0, 0.7):
            guarded(f"explicit_tp{world}_{dname}_T{t}", lambda dtype=dtype, t=t: case_grid(g, world, rank, dtype, t))
    guarded(
        f"explicit_tp{world}_logp_only_and_entropy_only",
        lambda: case_grid(g, world, rank, torch.float32, 0.7, modes=("logp", "entropy")),
    )
    if importlib.util.find_spec("triton") is not None:  # the per-rank stats combine of the Triton backend
        for dtype, dname, t in ((torch.float32, "fp32", 0.7), (torch.bfloat16, "bf16", 1.0)):
            guarded(f"triton_tp{world}_{dname}_T{t}",
                    lambda dtype=dtype, t=t: case_grid(g, world, rank, dtype, t, backend="triton"))
        guarded(f"triton_tp{world}_logp_only_and_entropy_only",
                lambda: case_grid(g, world, rank, torch.float32, 0.7, modes=("logp", "entropy"), backend="triton"))

    # TP2 subgroups inside a larger world: the vocab offset comes from the rank within the group.
    if world > 2 and world % 2 == 0:
        groups = [dist.new_group(ranks=list(range(i, i + 2))) for i in range(0, world, 2)]
        sub = groups[rank // 2]
        for dtype, dname in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            guarded(
                f"explicit_subgroup_tp2_of{world}_{dname}",
                lambda dtype=dtype: case_grid(sub, 2, dist.get_rank(group=sub), dtype, 0.7),
            )

    # Megatron's parallel_state, tp_group=None.
    for tp in sorted({world, 2}):
        try:
            for name, res in megatron_checks(tp, world, rank).items():
                local[name] = res
        except Exception:
            local[f"megatron_ps_tp{tp}"] = (False, traceback.format_exc()[-3000:])

    gathered = [None] * world
    dist.all_gather_object(gathered, local)
    if rank == 0:
        names = sorted(set().union(*[d.keys() for d in gathered]))
        results = {}
        for name in names:
            per_rank = [d.get(name, (False, "missing on this rank")) for d in gathered]
            results[name] = {
                "ok": all(ok for ok, _ in per_rank),
                "detail": {f"rank{r}": det for r, (_, det) in enumerate(per_rank)},
            }
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
