"""torchrun worker (4 CPU processes): HF -> Megatron (TP, PP) -> stream -> HF, for each layout.

Every check runs on all ranks; its result is the AND over ranks (details of the first failure).
Rank 0 writes {check: {"ok": bool, "detail": ...}} to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from weight_sync_common import (  # noqa: E402
    RESULTS, VARIANTS, check, hf_state, load_hf_from_tensors, reference_inference_shards, save_hf_model, tiny_config,
)

from megatron_dgpo import distributed as mdist  # noqa: E402
from megatron_dgpo.model.builder import unwrap_model  # noqa: E402
from megatron_dgpo.model.builder import build_model_chunks as build_chunks  # noqa: E402
from megatron_dgpo.weight_sync import (  # noqa: E402
    HFCheckpoint, WeightStreamer, WeightSyncIntegrityError, drain, load_hf_into_megatron, save_megatron_as_hf,
)

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


def build(cfg):
    return build_chunks(cfg)


def megatron_logits(chunks, tokens: torch.Tensor) -> torch.Tensor | None:
    """Full-vocab logits [b, s, V] on last-stage ranks (manual 1-microbatch pipeline), else None."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model = unwrap_model(chunks)[0]
    b, s = tokens.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    if not first:
        h = torch.empty(s, b, model.config.hidden_size)
        dist.recv(h, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(h)
    with torch.no_grad():
        out = model(input_ids=tokens, position_ids=pos, attention_mask=None)
    if not last:
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    return gather_from_tensor_model_parallel_region(out)


def logits_match_transformers(cfg, received: dict, chunks, tokens: torch.Tensor):
    """(ok, detail): transformers with the streamed HF tensors `received` gives Megatron's
    logits (relative 1e-5; vocab padding dropped). Ranks off the last stage pass."""
    hf = load_hf_from_tensors(cfg, received.items())
    ours = megatron_logits(chunks, tokens)
    if ours is None:
        return True, "not last stage"
    with torch.no_grad():
        theirs = hf(input_ids=tokens).logits
    err = ((ours[..., : cfg.vocab_size] - theirs).abs().max() / theirs.abs().max()).item()
    return err < 1e-5, f"max rel err {err:.2e}"


def shards_match(got: dict, want: dict):
    """The received inference shards equal the reference ones, bitwise, with no name extra or missing."""
    bad = [n for n in want if n not in got or not torch.equal(got[n], want[n])]
    return not bad and set(got) == set(want), f"bad={bad[:3]}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    mdist.initialize(1, 1, timeout_minutes=3)
    rank, world = dist.get_rank(), dist.get_world_size()
    work = Path(os.getcwd())
    refs = {}
    for v in VARIANTS:
        folder = work / f"hf_{v}"
        if rank == 0:
            # a sharded source folder for one variant: exercises the index path
            save_hf_model(tiny_config(v), folder, seed=list(VARIANTS).index(v),
                          max_shard_size="100KB" if v == "llama" else None)
            (folder / "tokenizer_config.json").write_text('{"model_max_length": 128}')
        dist.barrier()
    for v in VARIANTS:
        with HFCheckpoint(work / f"hf_{v}") as ck:
            refs[v] = {n: ck.read(n) for n in ck.names()}
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 200, (2, 12), generator=g)

    for tp, pp in LAYOUTS:
        mdist.initialize(tp, pp, timeout_minutes=3)
        lay = f"tp{tp}pp{pp}"
        for v in VARIANTS:
            cfg = tiny_config(v)
            ref = refs[v]
            chunks = build(cfg)
            for c in chunks:
                c.eval()
            check(f"{lay}/{v}/load", lambda: (load_hf_into_megatron(chunks, work / f"hf_{v}", cfg), True)[1])

            received = {}

            def round_trip():
                st = WeightStreamer(chunks, cfg, bucket_bytes=12_000)
                for bkt in st.stream():
                    received.update({n: t.clone() for n, t in bkt.named_tensors()})
                bad = [n for n in ref if n not in received or not torch.equal(received[n], ref[n])]
                extra = set(received) - set(ref)
                return (not bad and not extra and len(st.buckets) > 3,
                        f"bad={bad[:3]} extra={sorted(extra)[:3]} buckets={len(st.buckets)}")
            check(f"{lay}/{v}/round_trip_bitexact", round_trip)

            check(f"{lay}/{v}/logits_match_transformers",
                  lambda: logits_match_transformers(cfg, received, chunks, tokens))

            def bf16():
                got = {}
                for bkt in WeightStreamer(chunks, cfg, dtype=torch.bfloat16, receivers=[world - 1]).stream():
                    got.update(bkt.named_tensors())
                if rank != world - 1:
                    return not got, "non-receiver got tensors" if got else ""
                bad = [n for n in ref if not torch.equal(got[n], ref[n].bfloat16())]
                return not bad and set(got) == set(ref), f"bad={bad[:3]}"
            check(f"{lay}/{v}/bf16_to_one_receiver", bf16)

            def inference_tp2():
                receivers = [3, 1]  # inference rank 0 on global rank 3, rank 1 on global rank 1
                st = WeightStreamer(chunks, cfg, receivers=receivers, target_tp=2, bucket_bytes=8_000)
                got = {}
                for bkt in st.stream():
                    assert bkt.inference_rank == receivers.index(rank)
                    got.update({n: t.clone() for n, t in bkt.named_tensors()})
                if rank not in receivers:
                    return not got, ""
                ok, detail = shards_match(got, reference_inference_shards(cfg, ref, 2, receivers.index(rank)))
                return ok, f"{detail} sent={st.stats.sent_bytes}"
            check(f"{lay}/{v}/inference_tp2_shards", inference_tp2)

            if v == "qwen2":
                def corrupted():
                    st = WeightStreamer(chunks, cfg, bucket_bytes=12_000)
                    last = len(st.buckets) - 1
                    src = st.buckets[last].src

                    def flip(bi, buf):
                        if bi == last:
                            buf[5] ^= 1
                    try:
                        drain(st.stream(fault_injector=flip))
                        ok1, d1 = rank == src, "no error raised" if rank != src else "source does not verify"
                    except WeightSyncIntegrityError as e:
                        ok1, d1 = rank != src, str(e)[:200]
                    # point-to-point path (inference shards): only receivers that got bytes over the wire check
                    receivers = [3, 1]
                    st = WeightStreamer(chunks, cfg, receivers=receivers, target_tp=2, bucket_bytes=12_000)
                    last = len(st.buckets) - 1
                    src = st.buckets[last].src
                    should_raise = rank in receivers and rank != src
                    try:
                        drain(st.stream(fault_injector=flip))
                        ok2, d2 = not should_raise, "p2p: no error"
                    except WeightSyncIntegrityError as e:
                        ok2, d2 = should_raise, "p2p: " + str(e)[:200]
                    return ok1 and ok2, f"{d1} | {d2}"
                check(f"{lay}/{v}/corrupted_bucket_raises", corrupted)

            if v in ("qwen2_tied", "llama") or (tp, pp) == (2, 2):
                def export():
                    out = work / f"out_{lay}_{v}"
                    res = save_megatron_as_hf(chunks, cfg, out, source_dir=work / f"hf_{v}", bucket_bytes=20_000,
                                              max_shard_bytes=150_000)
                    if rank != 0:
                        return res is None, ""
                    from transformers import AutoModelForCausalLM
                    m = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
                    st = hf_state(m)
                    bad = [n for n in ref if not torch.equal(st[n], ref[n])]
                    tok = (out / "tokenizer_config.json").read_text() == '{"model_max_length": 128}'
                    leftovers = [p.name for p in work.iterdir() if ".tmp-" in p.name]
                    return not bad and tok and not leftovers and set(st) == set(ref), \
                        f"bad={bad[:3]} tok={tok} leftovers={leftovers}"
                check(f"{lay}/{v}/export_hf_folder", export)
            del chunks

    # DDP-wrapped model (TP=2, DP=2): the stream follows in-place updates (what an optimizer step does).
    mdist.initialize(2, 1, timeout_minutes=3)
    v, lay = "qwen2", "tp2pp1_ddp"
    cfg, ref = tiny_config(v), refs[v]
    chunks = build_chunks(cfg, wrap_ddp=True)
    load_hf_into_megatron(chunks, work / f"hf_{v}", cfg)

    def ddp_updates():
        st = WeightStreamer(chunks, cfg, bucket_bytes=16_000)
        first = {n: t.clone() for b in st.stream() for n, t in b.named_tensors()}
        ok0 = all(torch.equal(first[n], ref[n]) for n in ref)
        with torch.no_grad():
            for name, p in unwrap_model(chunks)[0].named_parameters():
                if name.endswith("layers.1.mlp.linear_fc1.weight"):
                    p.add_(1.0)  # every element of gate and up of layer 1 (both TP shards)
        second = {n: t.clone() for b in st.stream() for n, t in b.named_tensors()}
        changed = {n for n in ref if not torch.equal(second[n], first[n])}
        want = {"model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"}
        ok1 = changed == want and all(torch.equal(second[n], first[n] + 1.0) for n in want)
        return ok0 and ok1, f"changed={sorted(changed)}"
    check(f"{lay}/{v}/stream_follows_updates", ddp_updates)
    del chunks

    # Virtual pipeline (interleaved): PP=2 x VPP=2, one layer per chunk.
    mdist.initialize(1, 2, virtual_pipeline_model_parallel_size=2, timeout_minutes=3)
    from megatron.core import parallel_state as ps
    v, lay = "qwen2", "tp1pp2vpp2"
    cfg, ref = tiny_config(v), refs[v]
    chunks = build(cfg)
    check(f"{lay}/{v}/load", lambda: (load_hf_into_megatron(chunks, work / f"hf_{v}", cfg), True)[1])

    def placement():
        # Megatron's interleaved assignment: chunk c of PP rank p holds global layer c*L/vpp + p*L/(pp*vpp)
        L, pp_, vpp = cfg.num_layers, 2, 2
        p = ps.get_pipeline_model_parallel_rank()
        bad = []
        for c, chunk in enumerate(unwrap_model(chunks)):
            g = c * L // vpp + p * L // (pp_ * vpp)
            w = chunk.decoder.layers[0].mlp.linear_fc2.weight
            if not torch.equal(w, ref[f"model.layers.{g}.mlp.down_proj.weight"]):
                bad.append((c, g))
        return not bad, f"misplaced (chunk, layer): {bad}"
    check(f"{lay}/{v}/layer_placement", placement)

    def round_trip_vpp():
        got = {}
        for bkt in WeightStreamer(chunks, cfg, bucket_bytes=12_000).stream():
            got.update({n: t.clone() for n, t in bkt.named_tensors()})
        bad = [n for n in ref if n not in got or not torch.equal(got[n], ref[n])]
        return not bad and set(got) == set(ref), f"bad={bad[:3]}"
    check(f"{lay}/{v}/round_trip_bitexact", round_trip_vpp)

    def inference_vpp():
        receivers = [0, 2]
        got = {}
        for bkt in WeightStreamer(chunks, cfg, receivers=receivers, target_tp=2).stream():
            got.update({n: t.clone() for n, t in bkt.named_tensors()})
        if rank not in receivers:
            return not got, ""
        return shards_match(got, reference_inference_shards(cfg, ref, 2, receivers.index(rank)))
    check(f"{lay}/{v}/inference_tp2_shards", inference_vpp)

    if rank == 0:
        Path(args.out).write_text(json.dumps(RESULTS, indent=1))
    dist.barrier()
    mdist.destroy()


if __name__ == "__main__":
    main()
