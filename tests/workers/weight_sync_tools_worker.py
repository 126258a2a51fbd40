"""torchrun worker (2 CPU processes) for tools/convert_*.py: HF -> dist ckpt (TP2) -> HF (PP2)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from weight_sync_common import RESULTS, check, hf_state, save_hf_model, tiny_config  # noqa: E402

from megatron_dgpo import distributed as mdist  # noqa: E402
from megatron_dgpo.weight_sync import CheckpointError  # noqa: E402

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    h2m, m2h = _tool("convert_hf_to_megatron"), _tool("convert_megatron_to_hf")
    mdist.initialize(1, 1, timeout_minutes=3)
    rank = dist.get_rank()
    work = Path(os.getcwd())
    refs = {}
    for v, seed in (("qwen2_tied", 3), ("llama", 4), ("qwen3", 5)):
        if rank == 0:
            save_hf_model(tiny_config(v), work / f"hf_{v}", seed=seed, max_shard_size="100KB")
            (work / f"hf_{v}" / "tokenizer_config.json").write_text('{"model_max_length": 77}')
        dist.barrier()
        refs[v] = hf_state(save_hf_model(tiny_config(v), work / f"scratch_{v}_{rank}", seed=seed))

    for v, (tp1, pp1), (tp2, pp2) in (("qwen2_tied", (2, 1), (1, 2)), ("llama", (1, 2), (2, 1))):
        ck = work / f"ckpt_{v}"
        mdist.initialize(tp1, pp1, timeout_minutes=3)

        def to_megatron():
            path = h2m.convert_hf_to_megatron(work / f"hf_{v}", ck)
            return (Path(path).name == "step_00000000" and (ck / "latest").is_file()
                    and (ck / "hf_files" / "tokenizer_config.json").is_file()), path
        check(f"{v}/hf_to_megatron_tp{tp1}pp{pp1}", to_megatron)

        mdist.initialize(tp2, pp2, timeout_minutes=3)
        for dtype in (None, torch.bfloat16):
            out = work / f"back_{v}_{dtype}"

            def to_hf():
                res = m2h.convert_megatron_to_hf(ck, out, dtype=dtype, max_shard_bytes=120_000)
                if rank != 0:
                    return res is None, ""
                from transformers import AutoModelForCausalLM
                m = AutoModelForCausalLM.from_pretrained(str(out), dtype=dtype or torch.float32)
                got = hf_state(m)
                ref = {k: (t if dtype is None else t.to(dtype)) for k, t in refs[v].items()}
                bad = [k for k in ref if not torch.equal(got[k], ref[k])]
                tok = json.loads((out / "tokenizer_config.json").read_text()) == {"model_max_length": 77}
                cfg_dtype = json.loads((out / "config.json").read_text()).get("torch_dtype")
                leftovers = [p.name for p in work.iterdir() if ".tmp" in p.name]
                ok = not bad and set(got) == set(ref) and tok and not leftovers and \
                    cfg_dtype == ("bfloat16" if dtype else "float32")
                return ok, f"bad={bad[:3]} tok={tok} dtype={cfg_dtype} leftovers={leftovers}"
            check(f"{v}/megatron_to_hf_tp{tp2}pp{pp2}_{'bf16' if dtype else 'fp32'}", to_hf)

    # bf16 parameters (Float16Module), converted at TP=1/PP=2 both ways
    def bf16_params():
        ck = work / "ckpt_bf16"
        h2m.convert_hf_to_megatron(work / "hf_llama", ck, params_dtype=torch.bfloat16)
        out = work / "back_bf16_params"
        res = m2h.convert_megatron_to_hf(ck, out, params_dtype=torch.bfloat16)
        if rank != 0:
            return res is None, ""
        from transformers import AutoModelForCausalLM
        got = hf_state(AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16))
        bad = [k for k, t in refs["llama"].items() if not torch.equal(got[k], t.bfloat16())]
        return not bad, f"bad={bad[:3]}"
    check("llama/bf16_params_round_trip", bf16_params)

    # an fp32 checkpoint loaded into a bf16 model: the export holds the bf16-rounded values
    def fp32_ckpt_as_bf16():
        out = work / "back_fp32_as_bf16"
        res = m2h.convert_megatron_to_hf(work / "ckpt_llama", out, params_dtype=torch.bfloat16)
        if rank != 0:
            return res is None, ""
        from transformers import AutoModelForCausalLM
        got = hf_state(AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16))
        bad = [k for k, t in refs["llama"].items() if not torch.equal(got[k], t.bfloat16())]
        return not bad, f"bad={bad[:3]}"
    check("llama/fp32_ckpt_loaded_as_bf16", fp32_ckpt_as_bf16)

    # Qwen3 with uneven pipeline stages both ways: 4 layers as 1+3 (save) and 3+1 (load)
    mdist.initialize(1, 2, timeout_minutes=3)

    def qwen3_uneven():
        ck, out = work / "ckpt_qwen3", work / "back_qwen3"
        h2m.convert_hf_to_megatron(work / "hf_qwen3", ck, num_layers_in_first_pipeline_stage=1)
        res = m2h.convert_megatron_to_hf(ck, out, num_layers_in_last_pipeline_stage=1)
        if rank != 0:
            return res is None, ""
        from transformers import AutoModelForCausalLM
        got = hf_state(AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32))
        bad = [k for k, t in refs["qwen3"].items() if not torch.equal(got[k], t)]
        return not bad and set(got) == set(refs["qwen3"]), f"bad={bad[:3]}"
    check("qwen3/uneven_pp2_both_ways", qwen3_uneven)

    def bad_inputs():
        notckpt = work / "notckpt"
        if rank == 0:
            notckpt.mkdir(exist_ok=True)
            (notckpt / "README.md").write_text("x")
        dist.barrier()
        msgs = []
        for fn in (lambda: h2m.convert_hf_to_megatron(notckpt, work / "o1"),
                   lambda: m2h.convert_megatron_to_hf(notckpt, work / "o2")):
            try:
                fn()
                msgs.append("no error")
            except CheckpointError as e:
                msgs.append(str(e))
        ok = "no config.json" in msgs[0] and str(notckpt) in msgs[0] and "not a megatron_dgpo checkpoint" in msgs[1]
        return ok and not (work / "o1").exists() and not (work / "o2").exists(), " | ".join(msgs)
    check("bad_inputs", bad_inputs)

    if rank == 0:
        Path(args.out).write_text(json.dumps(RESULTS, indent=1))
    dist.barrier()
    mdist.destroy()


if __name__ == "__main__":
    main()
