"""torchrun worker: layout invariance, logits-gradient exactness, checkpoint resume / reshard.

    python -m torch.distributed.run --nproc_per_node=N megatron_train.py --out F --ref DIR --mode two|four

DIR holds the single-process reference written by tests/test_megatron_train.py: `init` (the
initial weights as a dist checkpoint), `batch.pt` (global batch with old log-probs) and
`ref.pt` (per-step loss / grad norm and final weights of the TP1/PP1/DP1 run).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import megatron_common as C  # noqa: E402

RESULTS = {}


def check(name, ok, detail=""):
    RESULTS[name] = {"ok": bool(ok), "detail": detail}


def share(obj, src):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_logits_grads(captured, ps):
    """Full-vocab, global-batch logits and their grads on the last stage (float64, CPU)."""
    tp_group, dp_group = ps.get_tensor_model_parallel_group(), ps.get_data_parallel_group()

    def full(t):
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(tp_group))]
        dist.all_gather(parts, t.contiguous(), group=tp_group)
        t = torch.cat(parts, -1)
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(dp_group))]
        dist.all_gather(parts, t, group=dp_group)
        return torch.cat(parts, 0).double()

    logits = torch.cat([captured[i]["logits"] for i in sorted(captured)], 0)
    grads = torch.cat([captured[i]["grad"] for i in sorted(captured)], 0)
    return full(logits), full(grads)


def float64_reference_grad(logits, batch):
    from megatron_dgpo.loss import policy_loss
    from megatron_dgpo.train.batch import shift_left

    x = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(x / C.TEMPERATURE, -1).gather(-1, shift_left(batch.tokens).unsqueeze(-1)).squeeze(-1)
    loss, _ = policy_loss(C.loss_config(), logp, shift_left(batch.old_logp).double(),
                          batch.advantages.double(), shift_left(batch.loss_mask, False))
    loss.backward()
    return loss.item(), x.grad


# Token-budget and packed layouts of the same steps (train/microbatch.py): the reference batch's
# rows are 9-14 tokens long, so a 30-token budget gives micro-batches of 1-3 rows of different
# lengths (variable shapes between pipeline stages) and a different count per DP rank before
# equalisation; packing with 40 tokens puts 3-4 sequences in a row.
BUDGET = dict(max_tokens_per_micro_batch=30)
PACKED = dict(max_tokens_per_micro_batch=40, pack_sequences=True, attention_backend="sdpa")
# Shared prompt prefixes: the pairs of rows with one prompt (megatron_common.make_batch) share it;
# 40 tokens hold 2-3 pairs.
PREFIX = dict(max_tokens_per_micro_batch=40, pack_sequences="prefix", attention_backend="sdpa")


def train_layout(name, tp, pp, ref, refdir, tmp, *, mbs, vpp=None, sp=False, dist_opt=False,
                 logits_check=False, resume_check=False, layout=None, stages=(None, None)):
    from megatron.core import parallel_state as ps

    from megatron_dgpo.checkpoint import load_checkpoint, save_checkpoint
    from megatron_dgpo.train import forward_logprobs, train_step

    from megatron_dgpo.train.microbatch import dp_partition, prompt_group_partition

    layout = dict(layout or {})
    backend = layout.pop("attention_backend", None)
    chunks, opt = C.setup(tp, pp, vpp=vpp, sp=sp, dist_opt=dist_opt, attention_backend=backend, stages=stages)
    load_checkpoint(os.path.join(refdir, "init"), chunks, opt, load_optimizer=False)
    full_batch = torch.load(os.path.join(refdir, "batch.pt"), weights_only=False)
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    if layout.get("pack_sequences") == "prefix":  # whole prompt groups, as rl.policy deals them
        rows = torch.tensor(prompt_group_partition(full_batch, dp)[dp_rank])
    elif layout:  # token-balanced DP shares, as rl.policy deals them
        rows = torch.tensor(dp_partition(full_batch.lengths.tolist(), dp)[dp_rank])
    else:
        per = C.GLOBAL_BATCH // dp
        rows = torch.arange(dp_rank * per, (dp_rank + 1) * per)
    batch = full_batch.select(rows)

    lp, _ = forward_logprobs(chunks, batch, micro_batch_size=mbs, temperature=C.TEMPERATURE, **layout)
    ref_lp = ref["logp0"][rows]
    err = C.rel_err(lp * batch.loss_mask, ref_lp * batch.loss_mask)
    check(f"{name}/forward_logprobs", err < 1e-5, f"rel err {err:.2e}")

    captured = {}

    def hook(idx, logits):
        # Hook a clone: registering a hook on the in-place-masked logits segfaulted inside
        # torch under the interleaved schedule (torch 2.13 CPU).
        captured[idx] = {"logits": logits.detach().clone()}
        y = logits.clone()
        y.register_hook(lambda g: captured[idx].__setitem__("grad", g.detach().clone()))
        return y

    metrics = []
    for step in range(C.STEPS):
        if resume_check and step == 1:
            save_checkpoint(os.path.join(tmp, f"resume_{name}"), 1, chunks, opt)
        metrics.append(train_step(chunks, opt, batch, C.loss_config(), micro_batch_size=mbs,
                                  temperature=C.TEMPERATURE,
                                  logits_hook=hook if (logits_check and step == 0) else None, **layout))
        if step == 0:
            grads0 = local_grads(chunks)
        r = ref["metrics"][step]
        for key in ("loss", "grad_norm", "entropy", "ln_tokens", "hp_tokens", "w_ln_mean", "rollout_logp_abs_diff"):
            check(f"{name}/step{step}/{key}", C.close(metrics[-1][key], r[key]),
                  f"{metrics[-1][key]!r} vs reference {r[key]!r}")
        # LN/HP diagnostics (W_p histogram, gradient mass; loss/diagnostics.py): summed over
        # micro-batches and ranks like the token counts, so equal to the one-process reference.
        diag = [k for k in r if k.startswith("diag_")]
        def close_any(a, b):  # the W_p histograms are lists of counts
            if isinstance(b, list):
                return isinstance(a, list) and len(a) == len(b) and all(C.close(x, y) for x, y in zip(a, b))
            return C.close(a, b)
        bad = [(k, metrics[-1].get(k), r[k]) for k in diag if not close_any(metrics[-1].get(k, float("nan")), r[k])]
        check(f"{name}/step{step}/diagnostics", diag and not bad and any(any(r[k]) for k in diag if "_wp_ln_" in k),
              f"{len(diag)} keys; differ: {bad[:4]}")

    if name.startswith("prefix_"):  # the pairs' prompts were computed once: fewer tokens than the rows hold
        m0 = metrics[0]
        check(f"{name}/shares_prompts", m0["computed_tokens"] < m0["tokens"],
              f"computed {m0['computed_tokens']} vs real {m0['tokens']}")

    if logits_check:
        last = ps.is_pipeline_last_stage(ignore_virtual=True)
        detail = None
        if last:
            logits, grads = gather_logits_grads(captured, ps)
            ref_loss, ref_grad = float64_reference_grad(logits, full_batch)
            gerr = C.rel_err(grads, ref_grad)
            detail = (gerr, ref_loss)
        gerr, ref_loss = share(detail, src=dist.get_world_size() - 1)
        check(f"{name}/logits_grad_vs_float64", gerr < 1e-5, f"rel err {gerr:.2e}")
        check(f"{name}/loss_vs_float64", C.close(metrics[0]["loss"], ref_loss, 1e-5),
              f"{metrics[0]['loss']!r} vs {ref_loss!r}")

    final = os.path.join(tmp, f"final_{name}")
    save_checkpoint(final, C.STEPS, chunks, opt)
    if layout:  # after the save: it rebuilds the parallel state
        same_layout_check(name, tp, pp, refdir, batch, grads0, chunks, mbs=mbs, vpp=vpp, sp=sp, dist_opt=dist_opt)

    if resume_check:
        chunks2, opt2 = C.setup(tp, pp, vpp=vpp, sp=sp, dist_opt=dist_opt, seed=77)
        step = load_checkpoint(os.path.join(tmp, f"resume_{name}"), chunks2, opt2)
        m = train_step(chunks2, opt2, batch, C.loss_config(), micro_batch_size=mbs, temperature=C.TEMPERATURE)
        same = all(m[k] == metrics[1][k] for k in ("loss", "grad_norm", "entropy"))
        check(f"{name}/resume_metrics", step == 1 and same,
              f"step {step}; loss {m['loss']!r} vs {metrics[1]['loss']!r}; gn {m['grad_norm']!r} vs {metrics[1]['grad_norm']!r}")
        # dist_checkpointing of the resumed model == the uninterrupted one: compare local weights.
        a = [p.detach() for c in chunks for p in c.parameters()]
        b = [p.detach() for c in chunks2 for p in c.parameters()]
        diff = max(float((x - y).abs().max()) for x, y in zip(a, b))
        diff = torch.tensor(diff)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        check(f"{name}/resume_weights", float(diff) == 0.0, f"max abs diff {float(diff):.3e}")
    return final


def local_grads(chunks):
    return [(n, p.main_grad.detach().clone()) for c in chunks for n, p in c.named_parameters()
            if getattr(p, "main_grad", None) is not None]


def worst_rel_err(a, b):
    """Max over tensors of max|a - b| / max|b|, over all ranks."""
    worst = max(C.rel_err(x, y) for (_, x), (_, y) in zip(a, b))
    t = torch.tensor(worst)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def same_layout_check(name, tp, pp, refdir, batch, grads0, chunks, *, mbs, vpp, sp, dist_opt):
    """The padded path (fixed micro_batch_size rows, local attention) in the same TP/PP/DP
    layout on the same rows: gradients of step 0 and weights after the last step agree to 1e-5.
    (Against the TP1 reference, Adam amplifies the layouts' own float32 rounding on tiny qkv-bias
    gradients to ~1e-5 already in the padded TP2 layout, so weights are also compared here.)"""
    from megatron_dgpo.checkpoint import load_checkpoint
    from megatron_dgpo.train import train_step

    twin, opt = C.setup(tp, pp, vpp=vpp, sp=sp, dist_opt=dist_opt)
    load_checkpoint(os.path.join(refdir, "init"), twin, opt, load_optimizer=False)
    for step in range(C.STEPS):
        train_step(twin, opt, batch, C.loss_config(), micro_batch_size=mbs, temperature=C.TEMPERATURE)
        if step == 0:
            gerr = worst_rel_err(grads0, local_grads(twin))
    werr = worst_rel_err([(n, p.detach()) for c in chunks for n, p in c.named_parameters()],
                         [(n, p.detach()) for c in twin for n, p in c.named_parameters()])
    check(f"{name}/grads_vs_padded", gerr < 1e-5, f"max rel err {gerr:.2e}")
    check(f"{name}/weights_vs_padded", werr < 1e-5, f"max rel err {werr:.2e}")


def tied_check(refdir, tmp):
    """Tied embeddings (Qwen2.5-1.5B style) with PP=2 == the same model at TP1/PP1 (DP=2)."""
    import dataclasses

    from megatron_dgpo.checkpoint import load_checkpoint, save_checkpoint
    from megatron_dgpo.train import train_step

    tied = dataclasses.replace(C.MODEL, tie_word_embeddings=True)
    full_batch = torch.load(os.path.join(refdir, "batch.pt"), weights_only=False)
    chunks, opt = C.setup(1, 1, model=tied)
    init = os.path.join(tmp, "tied_init")
    save_checkpoint(init, 0, chunks, None, save_rng=False)
    runs = {}
    for name, pp in (("dp2", 1), ("pp2", 2)):
        if pp == 2:
            chunks, opt = C.setup(1, 2, model=tied)
            load_checkpoint(init, chunks, opt, load_optimizer=False)
        batch = full_batch.dp_shard()
        runs[name] = [train_step(chunks, opt, batch, C.loss_config(), micro_batch_size=2,
                                 temperature=C.TEMPERATURE) for _ in range(C.STEPS)]
    for step in range(C.STEPS):
        for key in ("loss", "grad_norm"):
            a, b = runs["pp2"][step][key], runs["dp2"][step][key]
            check(f"tied_pp2/step{step}/{key}", C.close(a, b), f"{a!r} vs {b!r}")


RESHARD_CASES = (("distopt_tp2dp2_to_pp2dp2", 1, 2), ("distopt_tp2dp2_to_tp1dp4", 1, 1))


def reshard_optimizer(refdir, ref, tmp, finals):
    """The distributed-optimizer state saved at TP2/DP2 after step 0 (fully_reshardable) continues
    in other TP / PP / DP layouts: step 1 there gives the reference metrics, and (checked by
    reload_full) the reference weights, which need the Adam moments and step count of step 0."""
    from megatron_dgpo.checkpoint import load_checkpoint, save_checkpoint
    from megatron_dgpo.train import train_step

    full_batch = torch.load(os.path.join(refdir, "batch.pt"), weights_only=False)
    for name, tp, pp in RESHARD_CASES:
        chunks, opt = C.setup(tp, pp, dist_opt=True, seed=91)
        step = load_checkpoint(os.path.join(tmp, "resume_tp2dp2_sp_distopt"), chunks, opt)
        m = train_step(chunks, opt, full_batch.dp_shard(), C.loss_config(), micro_batch_size=1,
                       temperature=C.TEMPERATURE)
        r = ref["metrics"][1]
        for key in ("loss", "grad_norm"):
            check(f"{name}/step1/{key}", step == 1 and C.close(m[key], r[key]),
                  f"step {step}: {m[key]!r} vs reference {r[key]!r}")
        finals[name] = save_checkpoint(os.path.join(tmp, f"final_{name}"), C.STEPS, chunks, opt)


def reload_full(name, ckpt, ref):
    """Load a checkpoint written in another layout into TP1/PP1 (DP=world) and compare weights.
    Token-budget / packed layouts: 2e-5 (see same_layout_check for the 1e-5 comparison)."""
    from megatron_dgpo.checkpoint import load_checkpoint

    chunks, _ = C.setup(1, 1)
    step = load_checkpoint(ckpt, chunks, None)
    tol = 2e-5 if name.startswith(("budget_", "packed_", "prefix_")) else 1e-5
    ok, detail = C.compare_weights(C.full_state_dict(chunks), ref["final"], tol=tol)
    check(f"{name}/final_weights", ok and step == C.STEPS, detail)


def main():
    # dist_checkpointing.save starts a multiprocessing Manager (a spawned server process that
    # inherits stdout/stderr). If torchrun SIGTERMs this rank after another rank failed, exit
    # through Python so multiprocessing's atexit hook stops the Manager; an orphaned Manager
    # keeps the pipes of the launcher open and the test would hang instead of failing.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--ref", required=True)
    ap.add_argument("--mode", choices=["two", "four"], required=True)
    args = ap.parse_args()

    from megatron_dgpo import distributed

    distributed.initialize()  # the process group; layouts are (re)initialised per case
    ref = torch.load(os.path.join(args.ref, "ref.pt"), weights_only=False)
    world = dist.get_world_size()
    tmp = tempfile.mkdtemp(prefix="mdgpo_ckpt_") if dist.get_rank() == 0 else None
    tmp = share(tmp, src=0)
    if args.mode == "two":
        cases = [("tp2", 2, 1, dict(mbs=2, logits_check=True)),
                 ("pp2", 1, 2, dict(mbs=1, resume_check=True)),
                 ("pp2_uneven_1_3", 1, 2, dict(mbs=1, stages=(1, None))),  # 4 layers as 1 + 3
                 ("dp2", 1, 1, dict(mbs=2, logits_check=True)),
                 ("budget_tp2_sp", 2, 1, dict(mbs=2, sp=True, layout=BUDGET)),
                 ("budget_pp2", 1, 2, dict(mbs=1, layout=BUDGET)),
                 ("budget_dp2", 1, 1, dict(mbs=2, layout=BUDGET)),
                 ("packed_tp2_sp", 2, 1, dict(mbs=2, sp=True, layout=PACKED)),
                 ("packed_pp2", 1, 2, dict(mbs=2, layout=PACKED)),
                 ("packed_dp2", 1, 1, dict(mbs=2, layout=PACKED)),
                 ("prefix_tp2_sp", 2, 1, dict(mbs=2, sp=True, layout=PREFIX)),
                 ("prefix_pp2", 1, 2, dict(mbs=2, layout=PREFIX)),
                 ("prefix_dp2", 1, 1, dict(mbs=2, layout=PREFIX))]
    else:
        cases = [("tp2pp2", 2, 2, dict(mbs=2, logits_check=True, resume_check=True)),
                 ("tp2dp2_sp_distopt", 2, 1, dict(mbs=1, sp=True, dist_opt=True, resume_check=True)),
                 ("pp2dp2_vpp2", 1, 2, dict(mbs=1, vpp=2, logits_check=True)),
                 ("budget_tp2pp2_sp", 2, 2, dict(mbs=2, sp=True, layout=BUDGET)),
                 ("budget_pp2dp2", 1, 2, dict(mbs=1, layout=BUDGET)),
                 ("packed_tp2dp2_sp_distopt", 2, 1, dict(mbs=1, sp=True, dist_opt=True, layout=PACKED)),
                 ("prefix_tp2pp2_sp", 2, 2, dict(mbs=2, sp=True, layout=PREFIX))]
    finals = {}
    for name, tp, pp, kw in cases:
        try:
            finals[name] = train_layout(name, tp, pp, ref, args.ref, tmp, **kw)
        except Exception:
            check(f"{name}/runs", False, traceback.format_exc()[-3000:])
            raise
        else:
            check(f"{name}/runs", True, f"world {world}")
    if args.mode == "four":
        reshard_optimizer(args.ref, ref, tmp, finals)
    for name, ckpt in finals.items():
        reload_full(name, ckpt, ref)
    if args.mode == "two":
        tied_check(args.ref, tmp)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(RESULTS, f, indent=1)
    distributed.destroy()


if __name__ == "__main__":
    main()
